"""Privacy accounting for Poisson-subsampled Gaussian mechanisms (DP-SGD), for tree aggregation
(DP-FTRL), for matrix-factorization mechanisms (DP-MF) and for banded ones amplified by cyclic
Poisson sampling, through dp_accounting.

Host-side (plain Python/numpy): never call from jitted code.

References:
  Mironov, "Renyi Differential Privacy", CSF 2017 (RDP accountant);
  Koskela et al., "Computing Tight Differential Privacy Guarantees Using FFT", AISTATS 2020, and
  Doroshenko et al., "Connect the Dots: Tighter Discrete Approximations of Privacy Loss
  Distributions", PETS 2022 (PLD accountant);
  Kairouz et al., "Practical and Private (Deep) Learning without Sampling or Shuffling", ICML
  2021 (DP-FTRL's tree aggregation with restarts);
  Choquette-Choo et al., "Multi-Epoch Matrix Factorization Mechanisms for Private Machine
  Learning", ICML 2023 (the sensitivity of a factorization under participation every k steps);
  Choquette-Choo, Ganesh, McKenna, McMahan, Rush, Thakurta and Xu, "(Amplified) Banded Matrix
  Factorization: A unified approach to private training", NeurIPS 2023 (amplified BandMF).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
from typing import Sequence

from absl import logging
import dp_accounting
import numpy as np
from dp_accounting import pld, rdp

ACCOUNTANTS = ("pld", "rdp")


def validate(*, noise_multiplier=None, sampling_rate=None, steps=None, delta=None,
             accountant=None, target_epsilon=None):
  """Raises ValueError naming the first argument outside its domain (None = not checked)."""
  if noise_multiplier is not None and not noise_multiplier >= 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier=}")
  if sampling_rate is not None and not 0.0 < sampling_rate <= 1.0:
    raise ValueError(f"sampling_rate must lie in (0, 1], got {sampling_rate=}")
  if steps is not None and (int(steps) != steps or steps < 0):
    raise ValueError(f"steps must be a non-negative integer, got {steps=}")
  if delta is not None and not 0.0 < delta < 1.0:
    raise ValueError(f"delta must lie in (0, 1), got {delta=}")
  if accountant is not None and accountant not in ACCOUNTANTS:
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant=}")
  if target_epsilon is not None and not target_epsilon > 0:
    raise ValueError(f"target_epsilon must be positive, got {target_epsilon=}")


def make_accountant(accountant: str = "pld", *,
                    pld_grid: float | None = None) -> dp_accounting.PrivacyAccountant:
  """A fresh dp_accounting accountant (add/remove-one neighbouring relation).

  `pld_grid` is the PLD accountant's value discretization interval (None: dp_accounting's
  default, 1e-4, which every reported epsilon uses). Its pessimistic discretization makes any
  grid an upper bound on the true epsilon; a coarser grid is looser and much faster.
  """
  validate(accountant=accountant)
  if accountant == "pld":
    if pld_grid is None:
      return pld.PLDAccountant()
    return pld.PLDAccountant(value_discretization_interval=pld_grid)
  return rdp.RdpAccountant()


def dp_sgd_event(noise_multiplier: float, sampling_rate: float, steps: int) -> dp_accounting.DpEvent:
  """The DpEvent of `steps` Poisson-subsampled Gaussian steps."""
  validate(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps)
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(sampling_rate,
                                          dp_accounting.GaussianDpEvent(noise_multiplier)),
      int(steps))


@contextlib.contextmanager
def _quiet_rdp():
  """dp_accounting's RDP code logs a warning for every fractional order it drops (orders near 1
  at small sigma); the dropped orders only make its bound more conservative."""
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(level)


def _epsilon_of_event(event: dp_accounting.DpEvent, delta: float, accountant: str,
                      pld_grid: float | None = None) -> float:
  acc = make_accountant(accountant, pld_grid=pld_grid)
  with _quiet_rdp():
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def epsilon(*, noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
            accountant: str = "pld", pld_grid: float | None = None) -> float:
  """Epsilon of DP-SGD after `steps` Poisson-sampled steps (inf if noise_multiplier == 0)."""
  validate(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps,
            delta=delta, accountant=accountant)
  if steps == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  return _epsilon_of_event(dp_sgd_event(noise_multiplier, sampling_rate, steps), delta, accountant,
                           pld_grid)


def tree_depth(steps_per_tree: int) -> int:
  """ceil(log2(T + 1)): the most released nodes of a T-leaf tree (restarted each epoch) that one
  example's leaf adds to, as dp_accounting's tree-aggregation RDP counts them."""
  if int(steps_per_tree) != steps_per_tree or steps_per_tree < 1:
    raise ValueError(f"steps_per_tree must be a positive integer, got {steps_per_tree=}")
  return int(steps_per_tree).bit_length()


def dp_ftrl_event(noise_multiplier: float, steps_per_tree: int,
                  trees: int) -> dp_accounting.DpEvent:
  """The DpEvent of `trees` epochs of DP-FTRL, one tree of `steps_per_tree` steps per epoch and
  each example in at most one step per epoch (Kairouz et al. 2021, Appendix D). Only an RDP
  accountant with the REPLACE_SPECIAL relation composes it (`dp_ftrl_epsilon`)."""
  validate(noise_multiplier=noise_multiplier, steps=trees)
  tree_depth(steps_per_tree)
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.SingleEpochTreeAggregationDpEvent(noise_multiplier, int(steps_per_tree)),
      int(trees))


def _gaussian_pld_epsilon(multiplier: float, delta: float) -> float:
  """Epsilon of one Gaussian mechanism with noise std / L2 sensitivity = `multiplier`, from its
  privacy loss distribution on the default grid."""
  return float(pld.privacy_loss_distribution.from_gaussian_mechanism(
      standard_deviation=multiplier,
      value_discretization_interval=_PLD_GRID).get_epsilon_for_delta(delta))


def dp_ftrl_epsilon(*, noise_multiplier: float, steps_per_tree: int, trees: int, delta: float,
                    accountant: str = "pld") -> float:
  """Epsilon of `trees` epochs of DP-FTRL under "replace one example with a zero example".

  Each epoch's release is a Gaussian mechanism with sensitivity sqrt(depth) (in units of C), so
  `trees` of them are one Gaussian mechanism with multiplier sigma / sqrt(depth * trees) (Gaussian
  mechanisms compose adaptively into a Gaussian). "pld" is that Gaussian's privacy loss
  distribution (exact up to the grid's pessimistic rounding); "rdp" is dp_accounting's
  tree-aggregation RDP (`dp_ftrl_event`), the paper's accounting, looser by the RDP-to-DP
  conversion.
  """
  validate(noise_multiplier=noise_multiplier, steps=trees, delta=delta, accountant=accountant)
  ledger = PrivacyLedger()
  ledger.record_tree(noise_multiplier=noise_multiplier, steps_per_tree=steps_per_tree,
                     steps=int(trees) * int(steps_per_tree))
  return ledger.epsilon(delta, accountant)


def calibrate_dp_ftrl_noise_multiplier(*, target_epsilon: float, steps_per_tree: int, trees: int,
                                       delta: float, accountant: str = "pld",
                                       tol: float = 1e-3) -> float:
  """Smallest node noise multiplier, to relative precision `tol`, whose `dp_ftrl_epsilon` is
  <= target_epsilon (the upper end of a bisection bracket; its lower end exceeds the target)."""
  validate(steps=trees, delta=delta, accountant=accountant, target_epsilon=target_epsilon)
  if trees < 1:
    raise ValueError(f"trees must be >= 1 to calibrate, got {trees=}")
  return _smallest_passing(lambda sigma: dp_ftrl_epsilon(
      noise_multiplier=sigma, steps_per_tree=steps_per_tree, trees=trees, delta=delta,
      accountant=accountant), math.sqrt(tree_depth(steps_per_tree) * int(trees)),
                           target_epsilon=target_epsilon, delta=delta, tol=tol)


def _smallest_passing(epsilon_of, start: float, *, target_epsilon: float, delta: float,
                      tol: float) -> float:
  """The smallest sigma, to relative precision `tol`, with epsilon_of(sigma) <= target_epsilon
  (epsilon falls as sigma grows): doubling from `start` until one passes, halving until one
  fails, then bisection; the bracket's upper end, which passes."""
  if not 0 < tol < 0.5:
    raise ValueError(f"tol must lie in (0, 0.5), got {tol=}")
  ok = lambda sigma: target_epsilon >= epsilon_of(sigma)
  hi = start
  while not ok(hi):
    hi *= 2.0
    if hi > 1e6 * start:
      raise ValueError(f"no noise multiplier reaches {target_epsilon=} at {delta=}")
  lo = hi / 2.0
  while ok(lo):
    hi, lo = lo, lo / 2.0
  while hi - lo > tol * hi:
    mid = 0.5 * (lo + hi)
    lo, hi = (lo, mid) if ok(mid) else (mid, hi)
  return hi


def mf_sensitivity(coefficients: Sequence[float], steps: int, separation: int,
                   row_noise: Sequence[float] | None = None) -> float:
  """The L2 sensitivity, in units of the clip norm, of a matrix-factorization mechanism's release
  C G + Z over `steps` steps, when C is the lower-triangular banded Toeplitz matrix with first
  column `coefficients` (c_0 .. c_{b-1}, non-negative) and each example takes part once every
  `separation` steps, always at the same position (the data in one fixed order, a batch of it
  per step: the example of batch t0 is in steps t0, t0 + k, t0 + 2k, ...).

  With `row_noise` (sigma_t per step, > 0) the rows are divided by it first: the result mu is
  then the whole release's Gaussian multiplier, 1 / mu (`mf_epsilon`). Without, sigma_t = 1.

  Exact, not a bound: with non-negative C every column pair has a non-negative inner product, so
  over per-step contributions of norm <= 1 the worst case puts them all along one direction, and
  the sensitivity is max over t0 of || D^-1 sum_e C[:, t0 + e k] ||. When b <= k the columns of
  one example do not overlap and this is sqrt(sum_e ||D^-1 C[:, t0 + e k]||^2); otherwise each
  t0's column sum is formed by a convolution. (Choquette-Choo et al., ICML 2023, Section 3, for
  the participation pattern; Denisov et al., NeurIPS 2022, Theorem 2.1, for why the sensitivity
  of fixed data streams covers gradients that depend on the earlier releases.)
  """
  c = np.asarray(coefficients, np.float64)
  if c.ndim != 1 or c.size < 1 or not np.all(np.isfinite(c)) or np.any(c < 0) or not c[0] > 0:
    raise ValueError(f"coefficients must be a non-empty 1-D sequence of finite non-negative "
                     f"numbers with c_0 > 0, got {coefficients!r}")
  validate(steps=steps)
  if int(separation) != separation or separation < 1:
    raise ValueError(f"separation must be a positive integer, got {separation=}")
  n, k, b = int(steps), int(separation), c.size
  if n == 0:
    return 0.0
  sigmas = np.ones(n) if row_noise is None else np.asarray(row_noise, np.float64)
  if sigmas.shape != (n,) or not np.all(np.isfinite(sigmas)) or np.any(sigmas <= 0):
    raise ValueError(f"row_noise must hold {n} finite positive numbers, one per step")
  inv = 1.0 / sigmas
  if b <= k:  # disjoint columns: ||D^-1 C[:, t]||^2 = sum_j c_j^2 / sigma_{t+j}^2
    col = np.correlate(np.concatenate([inv ** 2, np.zeros(b - 1)]), c ** 2, mode="valid")
    per_t0 = np.bincount(np.arange(n) % k, weights=col, minlength=k)
    return float(math.sqrt(per_t0.max()))
  best = 0.0
  for t0 in range(min(k, n)):
    ind = np.zeros(n)
    ind[t0::k] = 1.0
    v = np.convolve(ind, c)[:n] * inv
    best = max(best, float(v @ v))
  return math.sqrt(best)


def mf_epsilon(*, noise_multiplier: float, coefficients: Sequence[float], steps: int,
               separation: int, delta: float, accountant: str = "pld") -> float:
  """Epsilon of `steps` steps of a matrix-factorization mechanism (`mf_sensitivity`'s setting)
  with noise std sigma * C on every row of C G, under "replace one example with a zero example".

  The release is one Gaussian mechanism with multiplier sigma / sensitivity: "pld" is its privacy
  loss distribution, "rdp" dp_accounting's RDP of that Gaussian (looser by the conversion)."""
  validate(noise_multiplier=noise_multiplier, steps=steps, delta=delta, accountant=accountant)
  ledger = PrivacyLedger()
  ledger.record_mf(noise_multiplier=noise_multiplier, coefficients=coefficients,
                   steps_per_epoch=separation, steps=steps)
  return ledger.epsilon(delta, accountant)


def calibrate_mf_noise_multiplier(*, target_epsilon: float, coefficients: Sequence[float],
                                  steps: int, separation: int, delta: float,
                                  accountant: str = "pld", tol: float = 1e-3) -> float:
  """Smallest noise multiplier, to relative precision `tol`, whose `mf_epsilon` is <=
  target_epsilon (`_smallest_passing`, starting from the sensitivity)."""
  validate(steps=steps, delta=delta, accountant=accountant, target_epsilon=target_epsilon)
  if steps < 1:
    raise ValueError(f"steps must be >= 1 to calibrate, got {steps=}")
  return _smallest_passing(lambda sigma: mf_epsilon(
      noise_multiplier=sigma, coefficients=coefficients, steps=steps, separation=separation,
      delta=delta, accountant=accountant), mf_sensitivity(coefficients, steps, separation),
                           target_epsilon=target_epsilon, delta=delta, tol=tol)


def amplified_mf_participations(steps: int, groups: int, first_step: int = 0) -> np.ndarray:
  """How many of steps first_step .. first_step + steps - 1 sample group g, for each g (int
  [groups]): under cyclic Poisson sampling an example of group g can take part only in those."""
  validate(steps=steps)
  if int(groups) != groups or groups < 1:
    raise ValueError(f"groups must be a positive integer, got {groups=}")
  g = np.arange(groups)
  return (first_step + steps - 1 - g) // groups - (first_step - 1 - g) // groups


def amplified_mf_epsilon(*, noise_multiplier: float, sampling_rate: float,
                         coefficients: Sequence[float], steps: int, delta: float,
                         accountant: str = "pld") -> float:
  """Epsilon of `steps` steps of amplified banded MF (`dp_mf.AmplifiedMFConfig`): C b-banded,
  cyclic Poisson sampling over b = len(coefficients) groups at rate q, noise std sigma * C on
  every row of C G, under add/remove one example.

  An example's participations are at least b steps apart, so their columns of C have disjoint
  supports: the release is ceil(steps / b) adaptively composed Poisson-subsampled Gaussian
  mechanisms, each of sensitivity at most ||c|| (a column of C), i.e. DP-SGD's accounting with
  multiplier sigma / ||c|| over ceil(steps / b) steps (the amplification result for b-banded
  C of Choquette-Choo et al., NeurIPS 2023). ||c|| is the exact column norm for all but the
  last b - 1 steps (shorter columns), so it is a bound, tight when steps >= b."""
  validate(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps,
           delta=delta, accountant=accountant)
  ledger = PrivacyLedger()
  ledger.record_amplified_mf(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate,
                             coefficients=coefficients, steps=steps)
  return ledger.epsilon(delta, accountant)


def calibrate_amplified_mf_noise_multiplier(*, target_epsilon: float, sampling_rate: float,
                                            coefficients: Sequence[float], steps: int,
                                            delta: float, accountant: str = "pld",
                                            tol: float = 1e-3) -> float:
  """Smallest noise multiplier, to relative precision `tol`, whose `amplified_mf_epsilon` is
  <= target_epsilon: ||c|| times DP-SGD's (`calibrate_noise_multiplier`) for ceil(steps / b)
  steps at rate q, raised by float rounding's margin and checked on the ledger's epsilon."""
  validate(steps=steps, delta=delta, accountant=accountant, target_epsilon=target_epsilon)
  if steps < 1:
    raise ValueError(f"steps must be >= 1 to calibrate, got {steps=}")
  norm = _column_norm(coefficients)
  sigma = norm * calibrate_noise_multiplier(
      target_epsilon=target_epsilon, sampling_rate=sampling_rate,
      steps=-(-int(steps) // len(coefficients)), delta=delta, accountant=accountant, tol=tol)
  sigma *= 1.0 + 1e-9
  while amplified_mf_epsilon(noise_multiplier=sigma, sampling_rate=sampling_rate,
                             coefficients=coefficients, steps=steps, delta=delta,
                             accountant=accountant) > target_epsilon:
    sigma *= 1.0 + tol / 4
  return sigma


def _column_norm(coefficients: Sequence[float]) -> float:
  """||c||, the longest column's norm of the banded Toeplitz C (validated as `mf_sensitivity`'s)."""
  return mf_sensitivity(coefficients, len(coefficients), len(coefficients))


# The PLD grid of calibration's coarse search: about 20x faster than the default 1e-4 and, on
# DP-SGD events, within 1e-4 of its epsilon; the answer is then checked on the default grid.
_COARSE_PLD_GRID = 2e-3


def calibrate_noise_multiplier(*, target_epsilon: float, sampling_rate: float, steps: int,
                               delta: float, accountant: str = "pld", tol: float = 1e-3) -> float:
  """Smallest noise multiplier, to relative precision `tol`, whose epsilon is <= target_epsilon.

  Sound: the returned sigma is the upper end of a bracket whose epsilon, on the accountant that
  reports it (PLD on its default grid, or RDP), is at most `target_epsilon`; tight: the lower
  end, at least sigma * (1 - tol), exceeds the target on that same accountant. The search is
  cheap to expensive: RDP (whose epsilon upper-bounds PLD's, so its sigma is feasible) brackets
  and bisects, PLD on a coarse grid bisects inside that, and the default PLD grid (about a
  second per evaluation) only checks the two ends of the final bracket, moving it where the
  coarse answer was off.
  """
  validate(sampling_rate=sampling_rate, steps=steps, delta=delta, accountant=accountant,
            target_epsilon=target_epsilon)
  if steps < 1:
    raise ValueError(f"steps must be >= 1 to calibrate, got {steps=}")
  if not 0 < tol < 0.5:
    raise ValueError(f"tol must lie in (0, 0.5), got {tol=}")
  return _calibrate(float(target_epsilon), float(sampling_rate), int(steps), float(delta),
                    accountant, float(tol))


@functools.lru_cache(maxsize=256)
def _calibrate(target_epsilon: float, sampling_rate: float, steps: int, delta: float,
               accountant: str, tol: float) -> float:
  """`calibrate_noise_multiplier` on validated arguments; a pure function of them, so cached
  (an audit's rerun, or a test's, asks again for the same sigma: 4-13 s each on a CPU)."""

  def ok(sigma: float, acc: str, grid: float | None = None) -> bool:
    return epsilon(noise_multiplier=sigma, sampling_rate=sampling_rate, steps=steps, delta=delta,
                   accountant=acc, pld_grid=grid) <= target_epsilon

  def bisect(lo: float, hi: float, width: float, *args) -> float:
    """The feasible end of [lo (infeasible), hi (feasible)] once narrower than width * hi."""
    while hi - lo > width * hi:
      mid = 0.5 * (lo + hi)
      lo, hi = (lo, mid) if ok(mid, *args) else (mid, hi)
    return hi

  # RDP bracket by doubling/halving, then bisection.
  hi = 1.0
  while not ok(hi, "rdp"):
    hi *= 2.0
    if hi > 1e6:
      raise ValueError(f"no noise multiplier reaches {target_epsilon=} at {delta=}")
  lo = hi / 2.0
  while ok(lo, "rdp") and lo > 1e-3:
    hi, lo = lo, lo / 2.0
  sigma = bisect(lo, hi, tol, "rdp")
  if accountant == "rdp":
    return sigma
  # coarse PLD below the RDP answer (PLD's epsilon is the smaller, so sigma only moves down)
  lo = 0.8 * sigma
  while ok(lo, "pld", _COARSE_PLD_GRID):
    sigma, lo = lo, 0.8 * lo
  sigma = bisect(lo, sigma, tol / 4, "pld", _COARSE_PLD_GRID)
  # the default grid: a bracket of width tol around the coarse answer, moved until it holds
  step = 1.0 + tol / 2
  hi = sigma * step
  while not ok(hi, "pld"):
    hi *= step * step
  lo = hi / step ** 2
  while ok(lo, "pld"):
    hi, lo = lo, lo / step ** 2
  return bisect(lo, hi, tol, "pld")


def epsilon_curve(*, noise_multiplier: float, sampling_rate: float, steps: Sequence[int],
                  delta: float, accountant: str = "pld") -> list[float]:
  """`epsilon(...)` after each step count in `steps` (a budget's growth over a run), with PLD
  composing one cached one-step PLD (as `PrivacyLedger.epsilon` does) instead of building it
  again per point."""
  validate(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, delta=delta,
           accountant=accountant)
  out = []
  for t in steps:
    validate(steps=t)
    if accountant == "rdp" or t == 0 or noise_multiplier == 0:
      out.append(epsilon(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate,
                         steps=int(t), delta=delta, accountant=accountant))
      continue
    one = _subsampled_gaussian_pld(float(noise_multiplier), float(sampling_rate), _PLD_GRID)
    out.append(float(one.self_compose(int(t)).get_epsilon_for_delta(delta)))
  return out


def rdp_curve(*, noise_multiplier: float, sampling_rate: float, steps: int,
              orders: Sequence[float]) -> list[float]:
  """The RDP of DP-SGD at each order (for inspection and custom conversions)."""
  acc = rdp.RdpAccountant(list(orders))
  acc.compose(dp_sgd_event(noise_multiplier, sampling_rate, steps))
  return [float(x) for x in acc._rdp]  # pylint: disable=protected-access


_PLD_GRID = 1e-4  # dp_accounting's PLDAccountant default: every reported epsilon uses it


@functools.lru_cache(maxsize=16)
def _subsampled_gaussian_pld(noise_multiplier: float, sampling_rate: float, grid: float):
  """The PLD of one Poisson-subsampled Gaussian step, as PLDAccountant builds it (add/remove
  one neighbours); immutable (compose and self_compose return new objects), so cached."""
  return pld.privacy_loss_distribution.from_gaussian_mechanism(
      standard_deviation=noise_multiplier, value_discretization_interval=grid,
      sampling_prob=sampling_rate,
      neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)


def _composed_pld_epsilon(parts: Sequence[tuple[float, float, int]], delta: float) -> float:
  """Epsilon of the composition of (sigma, q, steps) Poisson-subsampled Gaussian runs, with PLD
  on the default grid (each one-step PLD built once per process)."""
  out = pld.privacy_loss_distribution.identity(value_discretization_interval=_PLD_GRID)
  for sigma, q, steps in parts:
    if steps:
      out = out.compose(_subsampled_gaussian_pld(sigma, q, _PLD_GRID).self_compose(steps))
  return float(out.get_epsilon_for_delta(delta))


# The PLD grid of group accounting: its pessimistic rounding keeps every bound valid; on the
# character LM's DP-SGD run (sigma 0.517, q 0.0105, 286 steps) the group epsilons at 1e-3 and
# at 1e-2 differ by 0.004 for 1, 4 and 16 copies, and a group of 16 takes 14 s at 1e-3.
_GROUP_PLD_GRID = 1e-3


@functools.lru_cache(maxsize=16)
def _group_step_pld(noise_multiplier: float, sampling_rate: float, group_size: int,
                    grid: float):
  """One Poisson-sampled DP-SGD step for a group of `group_size` examples: each member in the
  batch independently with probability q, each clipped to norm 1, so the step's sum moves by i
  clip norms with probability Binomial(i; r, q). Its dominating pair is N(0, sigma^2) against
  the mixture sum_i Binomial(i; r, q) N(i, sigma^2), in both directions (Ganesh, "Tight
  Group-Level DP Guarantees for DP-SGD with Sampling via Mixture of Gaussians Mechanisms",
  2024); dp_accounting's mixture-of-Gaussians PLD (Choquette-Choo et al., "Privacy
  Amplification for Matrix Mechanisms", ICLR 2024) builds it. For r = 1 it is the
  Poisson-subsampled Gaussian."""
  r, q = int(group_size), float(sampling_rate)
  if q == 1.0:  # every member in every batch: one Gaussian of sensitivity r
    return pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, sensitivity=float(r),
        value_discretization_interval=grid)
  probs = [math.comb(r, i) * q ** i * (1.0 - q) ** (r - i) for i in range(r + 1)]
  return pld.privacy_loss_distribution.from_mixture_gaussian_mechanism(
      standard_deviation=noise_multiplier, sensitivities=[float(i) for i in range(r + 1)],
      sampling_probs=probs, value_discretization_interval=grid)


def _check_group(group_size: int) -> int:
  if int(group_size) != group_size or group_size < 1:
    raise ValueError(f"group_size must be a positive integer, got {group_size=}")
  return int(group_size)


@dataclasses.dataclass
class LedgerEntry:
  """`steps` steps of one mechanism: Poisson-subsampled Gaussian (DP-SGD; `steps_per_tree` 0 and
  no `coefficients`), DP-FTRL's tree aggregation (`steps_per_tree` T > 0, sampling_rate 1, the
  run's steps first_step .. first_step + steps - 1, step s in tree s // T) or a banded
  matrix factorization (DP-MF: `coefficients` c_0 .. c_{b-1} of C, `steps_per_epoch` k, the
  data in one fixed order; sampling_rate 1), or amplified banded MF (`cyclic_poisson`: the
  coefficients, cyclic Poisson sampling at `sampling_rate` over b groups, the run's steps
  first_step .. first_step + steps - 1)."""

  noise_multiplier: float
  sampling_rate: float
  steps: int
  overflow_probability: float = 0.0  # per-step truncation bound (see privacy.sampling)
  steps_per_tree: int = 0
  first_step: int = 0
  coefficients: list = dataclasses.field(default_factory=list)
  steps_per_epoch: int = 0
  cyclic_poisson: bool = False

  @property
  def trees(self) -> int:
    """The trees (epochs) this entry's steps fall in, partial ones counted whole."""
    if not self.steps_per_tree or not self.steps:
      return 0
    t = self.steps_per_tree
    return (self.first_step + self.steps - 1) // t - self.first_step // t + 1


@dataclasses.dataclass
class PrivacyLedger:
  """Every privacy-consuming step a run has taken. Saved with each checkpoint so that a resumed
  run reports the true total, not the budget of its last segment.

  Consecutive steps with the same mechanism are stored as one entry with a count.
  """

  entries: list[LedgerEntry] = dataclasses.field(default_factory=list)

  @property
  def kind(self) -> str:
    """"dp_sgd", "dp_ftrl", "dp_mf" or "amplified_mf": the mechanism of the ledger's steps
    ("dp_sgd" when empty)."""
    if any(e.cyclic_poisson for e in self.entries):
      return "amplified_mf"
    if any(e.coefficients for e in self.entries):
      return "dp_mf"
    return "dp_ftrl" if any(e.steps_per_tree for e in self.entries) else "dp_sgd"

  @property
  def is_tree(self) -> bool:
    """Whether the ledger holds DP-FTRL (tree aggregation) steps."""
    return self.kind == "dp_ftrl"

  def _check_kind(self, kind: str) -> None:
    if self.entries and self.kind != kind:
      raise ValueError(f"this PrivacyLedger holds {self.kind} steps and cannot take {kind} ones: "
                       "a ledger holds DP-SGD steps (Poisson sampling, add/remove one example), "
                       "amplified MF steps (cyclic Poisson sampling, add/remove), DP-FTRL steps "
                       "(tree aggregation) or DP-MF steps (matrix factorization; both replace "
                       "one example with a zero one), one kind per ledger")

  def record_tree(self, *, noise_multiplier: float, steps_per_tree: int, steps: int = 1) -> None:
    """Records the run's next `steps` DP-FTRL steps (tree aggregation, `steps_per_tree` steps per
    tree): they are the ledger's steps `self.steps` onward, so the ledger must hold every earlier
    step of the run (it is saved with each checkpoint)."""
    validate(noise_multiplier=noise_multiplier, steps=steps)
    tree_depth(steps_per_tree)
    self._check_kind("dp_ftrl")
    self._extend(steps, noise_multiplier, steps_per_tree=int(steps_per_tree))

  def record_mf(self, *, noise_multiplier: float, coefficients: Sequence[float],
                steps_per_epoch: int, steps: int = 1) -> None:
    """Records the run's next `steps` DP-MF steps: rows `self.steps` onward of C G + Z, C banded
    Toeplitz with first column `coefficients`, each example once every `steps_per_epoch` steps.
    Every entry of a ledger must share C and the epoch (the noise is correlated across all the
    run's steps; a run that changes them is a different mechanism); sigma may change."""
    validate(noise_multiplier=noise_multiplier, steps=steps)
    coefficients = [float(x) for x in coefficients]
    mf_sensitivity(coefficients, 1, steps_per_epoch)  # validates both
    self._check_kind("dp_mf")
    if self.entries and (self.entries[0].coefficients, self.entries[0].steps_per_epoch) != (
        coefficients, steps_per_epoch):
      raise ValueError("every DP-MF step of a run must use the same factorization and epoch: "
                       f"the ledger has {len(self.entries[0].coefficients)} bands and "
                       f"steps_per_epoch={self.entries[0].steps_per_epoch}, this step "
                       f"{len(coefficients)} bands and {steps_per_epoch=}")
    self._extend(steps, noise_multiplier, coefficients=coefficients,
                 steps_per_epoch=int(steps_per_epoch))

  def record_amplified_mf(self, *, noise_multiplier: float, sampling_rate: float,
                         coefficients: Sequence[float], steps: int = 1,
                         overflow_probability: float = 0.0) -> None:
    """Records the run's next `steps` steps of amplified banded MF (`amplified_mf_epsilon`):
    steps `self.steps` onward, so the ledger must hold every earlier step of the run. Every
    entry shares C (hence the groups); sigma and q may change."""
    validate(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps)
    coefficients = [float(x) for x in coefficients]
    _column_norm(coefficients)  # validates them
    self._check_kind("amplified_mf")
    if self.entries and self.entries[0].coefficients != coefficients:
      raise ValueError("every amplified MF step of a run must use the same factorization: the "
                       f"ledger has {len(self.entries[0].coefficients)} bands, this step "
                       f"{len(coefficients)} (or other coefficients)")
    self._extend(steps, noise_multiplier, sampling_rate, overflow_probability,
                 coefficients=coefficients, cyclic_poisson=True)

  def amplified_participations(self) -> list[tuple[int, ...]]:
    """Amplified MF ledgers: the steps per entry in which one example can take part, for each
    group whose tuple is not dominated by another group's (usually one tuple: the groups sampled
    ceil(steps / b) times)."""
    b = len(self.entries[0].coefficients)
    counts = np.stack([amplified_mf_participations(e.steps, b, e.first_step)
                       for e in self.entries], axis=1)
    rows = {tuple(int(x) for x in r) for r in counts}
    return sorted(r for r in rows
                  if not any(o != r and all(x >= y for x, y in zip(o, r)) for o in rows))

  def _amplified_events(self) -> list[dp_accounting.DpEvent]:
    norm = _column_norm(self.entries[0].coefficients)
    return [dp_accounting.ComposedDpEvent(
        [dp_sgd_event(e.noise_multiplier / norm, e.sampling_rate, k)
         for e, k in zip(self.entries, counts)]) for counts in self.amplified_participations()]

  def record(self, *, noise_multiplier: float, sampling_rate: float, steps: int = 1,
             overflow_probability: float = 0.0) -> None:
    validate(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps)
    self._check_kind("dp_sgd")
    self._extend(steps, noise_multiplier, sampling_rate, overflow_probability, first_step=0)

  def _extend(self, steps: int, noise_multiplier: float, sampling_rate: float = 1.0,
              overflow_probability: float = 0.0, **fields) -> None:
    """Adds `steps` steps to the last entry when it has the same parameters, or a new entry
    (first_step: the ledger's steps so far, unless `fields` sets it)."""
    last = self.entries[-1] if self.entries else None
    same = {k: v for k, v in fields.items() if k != "first_step"}
    if last and (last.noise_multiplier, last.sampling_rate, last.overflow_probability) == (
        noise_multiplier, sampling_rate, overflow_probability) and all(
            getattr(last, k) == v for k, v in same.items()):
      last.steps += int(steps)
    else:
      self.entries.append(LedgerEntry(float(noise_multiplier), float(sampling_rate), int(steps),
                                      float(overflow_probability),
                                      **{"first_step": self.steps, **fields}))

  @property
  def steps(self) -> int:
    return sum(e.steps for e in self.entries)

  def mf_multiplier(self) -> float:
    """DP-MF ledgers: the whole release's Gaussian multiplier, 1 / `mf_sensitivity` of C with
    each step's rows divided by its sigma."""
    row_noise = np.concatenate([np.full(e.steps, e.noise_multiplier) for e in self.entries])
    first = self.entries[0]
    return 1.0 / mf_sensitivity(first.coefficients, self.steps, first.steps_per_epoch, row_noise)

  def dp_event(self) -> dp_accounting.DpEvent:
    """The ledger's DpEvent; for amplified MF, the participation pattern with the most
    participations (the one `epsilon` reports when the entries share sigma and q; with several
    patterns `epsilon` takes the worst of them all)."""
    if self.kind == "amplified_mf":
      return max(self._amplified_events(),
                 key=lambda ev: sum(x.count for x in ev.events))
    if self.kind == "dp_mf":
      return dp_accounting.GaussianDpEvent(self.mf_multiplier())
    if self.is_tree:
      return dp_accounting.ComposedDpEvent(
          [dp_ftrl_event(e.noise_multiplier, e.steps_per_tree, e.trees) for e in self.entries])
    return dp_accounting.ComposedDpEvent(
        [dp_sgd_event(e.noise_multiplier, e.sampling_rate, e.steps) for e in self.entries])

  def _tree_epsilon(self, delta: float, accountant: str) -> float:
    """DP-FTRL entries: one Gaussian mechanism of multiplier 1 / sqrt(sum trees * depth /
    sigma^2) ("pld"), or dp_accounting's tree RDP with REPLACE_SPECIAL ("rdp")."""
    if accountant == "rdp":
      acc = rdp.RdpAccountant(
          neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
      with _quiet_rdp():
        acc.compose(self.dp_event())
        return float(acc.get_epsilon(delta))
    return _gaussian_pld_epsilon(self._tree_multiplier(), delta)

  def _tree_multiplier(self) -> float:
    """DP-FTRL ledgers: the whole release's Gaussian multiplier, 1 / sqrt(sum trees * depth /
    sigma^2)."""
    return 1.0 / math.sqrt(sum(e.trees * tree_depth(e.steps_per_tree) / e.noise_multiplier ** 2
                               for e in self.entries))

  def epsilon(self, delta: float, accountant: str = "pld") -> float:
    """Epsilon of everything recorded, at `delta` for the untruncated mechanism.

    With PLD, the same computation as dp_accounting's PLDAccountant on `dp_event()` (equal to
    the last bit, tested), but each mechanism's one-step PLD is built once per process: a run
    reports its epsilon after every evaluation, and building that PLD is most of the cost
    (about 2 s each in a test run of DP-FedAvg)."""
    validate(delta=delta, accountant=accountant)
    if self.steps == 0:
      return 0.0
    if any(e.noise_multiplier == 0 for e in self.entries):
      return math.inf
    if self.is_tree:
      return self._tree_epsilon(delta, accountant)
    if self.kind == "dp_mf":
      if accountant == "pld":
        return _gaussian_pld_epsilon(self.mf_multiplier(), delta)
      return _epsilon_of_event(self.dp_event(), delta, accountant)
    if self.kind == "amplified_mf":
      if accountant != "pld":
        return max(_epsilon_of_event(ev, delta, accountant) for ev in self._amplified_events())
      norm = _column_norm(self.entries[0].coefficients)
      return max(_composed_pld_epsilon(
          [(e.noise_multiplier / norm, e.sampling_rate, k) for e, k in zip(self.entries, counts)],
          delta) for counts in self.amplified_participations())
    if accountant != "pld":
      return _epsilon_of_event(self.dp_event(), delta, accountant)
    return _composed_pld_epsilon([(e.noise_multiplier, e.sampling_rate, e.steps)
                                  for e in self.entries], delta)

  def _plds(self, group_size: int, grid: float) -> list:
    """Privacy loss distributions of the whole run for any `group_size` examples (r = 1: one
    example), whose largest delta at each epsilon bounds the run's. DP-SGD: each step's
    dominating pair for the group (`_group_step_pld`), composed; DP-MF and DP-FTRL: one Gaussian
    mechanism whose sensitivity grows r-fold (the group's change of the release is the sum of
    its members', each within the one-example sensitivity); amplified MF: one per participation
    pattern, one example only. The last composition is kept (keyed by the entries as they are
    now), so a group's deltas and epsilon cost one composition."""
    key = (group_size, grid, repr(self.entries))
    last = getattr(self, "_last_plds", None)
    if last is None or last[0] != key:
      last = self._last_plds = (key, self._compose_plds(group_size, grid))
    return last[1]

  def _compose_plds(self, group_size: int, grid: float) -> list:
    r = _check_group(group_size)
    if self.kind == "dp_sgd":
      out = pld.privacy_loss_distribution.identity(value_discretization_interval=grid)
      for e in self.entries:
        step = (_subsampled_gaussian_pld(e.noise_multiplier, e.sampling_rate, grid) if r == 1
                else _group_step_pld(e.noise_multiplier, e.sampling_rate, r, grid))
        out = out.compose(step.self_compose(e.steps))
      return [out]
    if self.kind == "amplified_mf":
      if r > 1:
        raise ValueError("amplified MF has no group accounting here (a group's members may share "
                         "a cyclic group or not): group_size must be 1")
      norm = _column_norm(self.entries[0].coefficients)
      outs = []
      for counts in self.amplified_participations():
        out = pld.privacy_loss_distribution.identity(value_discretization_interval=grid)
        for e, k in zip(self.entries, counts):
          if k:
            out = out.compose(_subsampled_gaussian_pld(e.noise_multiplier / norm,
                                                       e.sampling_rate, grid).self_compose(k))
        outs.append(out)
      return outs
    multiplier = self.mf_multiplier() if self.kind == "dp_mf" else self._tree_multiplier()
    return [pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=multiplier / r, value_discretization_interval=grid)]

  def _group_plds(self, group_size: int, grid: float | None) -> list:
    return self._plds(group_size, grid or (_PLD_GRID if group_size == 1 else _GROUP_PLD_GRID))

  def group_deltas(self, group_size: int, epsilons, *, with_truncation: bool = False,
                   grid: float | None = None) -> np.ndarray:
    """delta at each epsilon (float64 array) for any `group_size` examples, e.g. r copies of
    one canary: neighbouring datasets differ in those r (added or removed; DP-MF and DP-FTRL:
    replaced with zero examples). The group's privacy profile from `_plds` (tight for DP-SGD,
    Ganesh 2024; amplified MF: one example only). `with_truncation` adds the batch-truncation
    term (1 + e^eps) * overflow mass, as `truncation_delta` (the recorded overflow bound is for
    the dataset with one more example than the run's, which covers it and every smaller one).
    PLD grid: `grid`, or 1e-4 for one example (as `epsilon`) and 1e-3 for groups (pessimistic
    rounding: coarser is looser, never invalid). Epsilons must lie in [0, 700]."""
    eps = np.asarray(epsilons, np.float64)
    if np.any(eps < 0) or np.any(eps > 700) or not np.all(np.isfinite(eps)):
      raise ValueError("epsilons must lie in [0, 700]")
    if self.steps == 0:
      return np.zeros_like(eps)
    if any(e.noise_multiplier == 0 for e in self.entries):
      return np.ones_like(eps)
    out = np.max([np.asarray(p.get_delta_for_epsilon(eps), np.float64)
                  for p in self._group_plds(group_size, grid)], axis=0)
    if with_truncation:
      out = out + self.truncation_delta(eps)
    return np.minimum(out, 1.0)

  def group_epsilon(self, group_size: int, delta: float, *, grid: float | None = None) -> float:
    """Epsilon at `delta` for any `group_size` examples (`group_deltas`' relation and profile;
    the untruncated mechanism, as `epsilon`, which it equals for one example)."""
    validate(delta=delta)
    _check_group(group_size)
    if self.steps == 0:
      return 0.0
    if any(e.noise_multiplier == 0 for e in self.entries):
      return math.inf
    return max(float(p.get_epsilon_for_delta(delta)) for p in self._group_plds(group_size, grid))

  def truncation_delta(self, eps):
    """Extra delta from batch truncation: (1 + e^eps) * sum of per-step overflow bounds, at most
    1 (a delta of 1 guarantees nothing, whatever the formula gives at a huge eps); a float for a
    float eps, an array for an array."""
    mass = sum(e.steps * e.overflow_probability for e in self.entries)
    out = np.minimum((1.0 + np.exp(np.minimum(eps, 700.0))) * mass, 1.0)
    return float(out) if np.ndim(out) == 0 else out

  def report(self, delta: float, accountant: str = "pld") -> dict:
    """{"epsilon", "delta", "delta_total" (with truncation), "steps", "accountant"}, and for
    DP-FTRL and DP-MF "neighbouring" (their relation: replace one example with a zero example);
    for amplified MF "participations", the most steps one example can take part in."""
    eps = self.epsilon(delta, accountant)
    out = {"epsilon": eps, "delta": delta,
           "delta_total": min(1.0, delta + self.truncation_delta(eps)),
           "steps": self.steps, "accountant": accountant}
    if self.kind in ("dp_ftrl", "dp_mf"):
      out["neighbouring"] = "replace one example with a zero example"
    if self.kind == "amplified_mf" and self.steps:
      out["participations"] = max(sum(p) for p in self.amplified_participations())
    return out

  def to_json(self) -> str:
    return json.dumps([dataclasses.asdict(e) for e in self.entries])

  @classmethod
  def from_json(cls, s: str) -> "PrivacyLedger":
    return cls([LedgerEntry(**e) for e in json.loads(s)])
