"""DP-MF: private training with correlated noise from a banded matrix factorization.

The prefix sums that SGD's parameters follow are A G, with A the lower-triangular matrix of ones
and G the stacked clipped sums. A factorization A = B C releases C G + Z (a Gaussian mechanism)
and computes B (C G + Z) = A (G + C^-1 Z) from it: step t's optimizer receives

    (clipped_sum_t + w_t) / batch_size,   w = C^-1 Z,   Z_t ~ N(0, (sigma * l2_clip)^2 I),

noise correlated across steps so that much of it cancels in the prefix sums. C here is the banded
square root (BSR) of the workload: lower-triangular Toeplitz with first column c_0 .. c_{b-1},
the first b coefficients of the power series sqrt(1 / (1 - x)) = sum_j binom(2j, j) / 4^j x^j
(of sqrt(1 / ((1 - x)(1 - beta x))) when the workload is SGD with momentum beta), and 0 below
the b-th diagonal. Then w_t = (Z_t - sum_{j=1}^{b-1} c_j w_{t-j}) / c_0: the step keeps its last
b - 1 noises (`MFState.history`, b - 1 copies of the trainable parameters, a ring buffer whose
oldest slot the new noise overwrites) and draws one; its cost is one read of that buffer per
step, so memory traffic grows with b (see scripts/benchmark_ftrl.py).

The data are shuffled once and passed in the same order every epoch (`EpochSchedule` with
`reshuffle=False`), so an example is in steps t0, t0 + k, t0 + 2k, ... (k steps per epoch) and
the release's sensitivity is `accounting.mf_sensitivity` (sqrt(epochs) * ||c|| when b <= k). The
neighbouring relation is "replace one example with a zero example", as for DP-FTRL. With b = 1
this is DP-SGD without sampling (independent noise, full passes in a fixed order).

Amplified (`AmplifiedMFConfig`): the same step on batches drawn by cyclic Poisson sampling
(`sampling.cyclic_poisson_batch`): every example is put in one of b groups at random, and step t
takes each example of group t mod b with probability q. An example's steps are then at least b
apart, its columns of the b-banded C do not overlap, and the run is accounted as DP-SGD with
multiplier sigma / ||c|| over ceil(steps / b) steps, under add/remove one example
(`accounting.amplified_mf_epsilon`). One band is DP-SGD itself; b = N / batch size groups
sampled at q = 1 is DP-MF in a fixed order again (with random group sizes): amplification and
correlated noise traded against each other by b.

References: Kalinin and Lampert, "Banded Square Root Matrix Factorization for Differentially
Private Model Training", NeurIPS 2024 (the BSR coefficients, with momentum); Choquette-Choo,
McMahan, Rush and Thakurta, "Multi-Epoch Matrix Factorization Mechanisms for Private Machine
Learning", ICML 2023 (participation every k steps, banded C); Denisov, McMahan, Rush, Smith and
Thakurta, "Improved Differential Privacy for SGD via Optimal Private Linear Operators on
Adaptive Streams", NeurIPS 2022 (adaptively chosen gradients); Choquette-Choo, Ganesh, McKenna,
McMahan, Rush, Thakurta and Xu, "(Amplified) Banded Matrix Factorization: A unified approach to
private training", NeurIPS 2023 (cyclic Poisson sampling and its accounting).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg

from trustjax.privacy import accounting, sampling
from trustjax.privacy.clipping import NOISE_SCOPE, OPTIMIZER_SCOPE
from trustjax.privacy.dp_ftrl import FixedBatchConfig
from trustjax.privacy.dp_sgd import DPConfig, _clipped_sum, _metrics
from trustjax.privacy.noise import standard_normal
from trustjax.types import Batch, LossFn, Params, PRNGKey


@functools.lru_cache(maxsize=64)
def _bsr(bands: int, momentum: float) -> tuple[float, ...]:
  r = np.ones(bands)
  for j in range(1, bands):  # binom(2j, j) / 4^j = r_{j-1} (2j - 1) / (2j)
    r[j] = r[j - 1] * (2 * j - 1) / (2 * j)
  if momentum == 0:
    return tuple(float(x) for x in r)
  rb = r * momentum ** np.arange(bands)  # coefficients of (1 - beta x)^(-1/2)
  return tuple(float(np.dot(r[:j + 1][::-1], rb[:j + 1])) for j in range(bands))


def resolve_bands(bands: int, steps_per_epoch: int, name: str = "bands") -> int:
  """`bands`, or for 0 the drivers' default min(steps_per_epoch, 64): one band per step of an
  epoch (an example's columns of C then do not overlap: the sensitivity grows only as
  sqrt(epochs)), at most 64 stored noises. ValueError naming `name` when bands < 0."""
  if int(bands) != bands or bands < 0:
    raise ValueError(f"{name} must be >= 0 (an integer; 0 = min(steps per epoch, 64)), got "
                     f"{name}={bands}")
  return int(bands) or min(int(steps_per_epoch), 64)


def bsr_coefficients(bands: int, momentum: float = 0.0) -> np.ndarray:
  """c_0 .. c_{bands-1} of the banded square root factorization (Kalinin and Lampert 2024): the
  power series of (1 - x)^(-1/2) (1 - momentum x)^(-1/2), whose Toeplitz matrix squares to SGD
  with momentum's workload; c_0 = 1, all positive, float64."""
  if int(bands) != bands or bands < 1:
    raise ValueError(f"bands must be a positive integer, got {bands=}")
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"momentum must lie in [0, 1), got {momentum=}")
  return np.array(_bsr(int(bands), float(momentum)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPMFConfig(FixedBatchConfig):
  """The DP-MF mechanism with a banded square root factorization: `FixedBatchConfig`'s fields
  (each row of C G gets noise of std noise_multiplier * l2_clip, before C^-1; the batches are in
  the same order every epoch, so an example's steps are steps_per_epoch = k apart), and

  Attributes:
    bands: b, the nonzero diagonals of C; the step stores b - 1 past noises.
    momentum: the workload's momentum beta (0: plain prefix sums); only the utility depends on it.
  """

  bands: int
  momentum: float = 0.0

  def __post_init__(self):
    super().__post_init__()
    bsr_coefficients(self.bands, self.momentum)

  @property
  def coefficients(self) -> np.ndarray:
    return bsr_coefficients(self.bands, self.momentum)

  @property
  def expected_batch_size(self) -> int:
    """The gradient's denominator: the fixed batch size (named as `DPConfig`'s, so that
    `dp_mf_step` reads it from either MF config)."""
    return self.batch_size

  def sensitivity(self, steps: int) -> float:
    """The release's L2 sensitivity over `steps` steps, in units of l2_clip."""
    return accounting.mf_sensitivity(self.coefficients, steps, self.steps_per_epoch)

  def record(self, ledger: accounting.PrivacyLedger, steps: int = 1) -> None:
    """Records the next `steps` steps in `ledger` (which must hold the run's earlier steps)."""
    ledger.record_mf(noise_multiplier=self.noise_multiplier, coefficients=self.coefficients,
                     steps_per_epoch=self.steps_per_epoch, steps=steps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AmplifiedMFConfig(DPConfig):
  """Amplified banded MF (Choquette-Choo et al. 2023) with the banded square root factorization:
  `DPConfig`'s fields, where `sampling_rate` q is the rate within the group a step samples
  (cyclic Poisson over `bands` groups: the expected batch is q N / bands) and `max_batch_size`
  pads those batches; noise std noise_multiplier * l2_clip on each row of C G, before C^-1; no
  adaptive clipping. And

  Attributes:
    bands: b, the nonzero diagonals of C and the number of groups; the step stores b - 1 noises.
    momentum: the workload's momentum beta (0: plain prefix sums); only the utility depends on it.
  """

  bands: int
  momentum: float = 0.0

  def __post_init__(self):
    if self.adaptive is not None:
      raise ValueError("adaptive clipping is for DP-SGD (its count's accounting is DP-SGD's); "
                       "AmplifiedMFConfig takes adaptive=None")
    if self.class_clip_scales is not None or self.group_adaptive is not None:
      raise ValueError("class_clip_scales and group_adaptive are for DP-SGD (its noise is at the "
                       "largest clip); AmplifiedMFConfig takes neither")
    super().__post_init__()
    bsr_coefficients(self.bands, self.momentum)

  @property
  def coefficients(self) -> np.ndarray:
    return bsr_coefficients(self.bands, self.momentum)

  @property
  def expected_batch_size(self) -> float:
    return self.sampling_rate * self.num_examples / self.bands

  @property
  def overflow_probability(self) -> float:
    """A step's overflow bound: its batch is Binomial(N + 1, q / bands) over the groups'
    assignment and the sampling (the larger neighbour)."""
    return sampling.overflow_probability(self.num_examples, self.sampling_rate / self.bands,
                                         self.max_batch_size)

  def batch(self, seed: int, step: int) -> sampling.PoissonBatch:
    """Step `step`'s cyclic Poisson sample (`sampling.cyclic_poisson_batch`)."""
    return sampling.cyclic_poisson_batch(seed, step, self.num_examples, self.sampling_rate,
                                         self.bands, self.max_batch_size)

  def record(self, ledger: accounting.PrivacyLedger, steps: int = 1) -> None:
    """Records the next `steps` steps in `ledger` (which must hold the run's earlier steps)."""
    ledger.record_amplified_mf(noise_multiplier=self.noise_multiplier,
                               sampling_rate=self.sampling_rate, coefficients=self.coefficients,
                               steps=steps, overflow_probability=self.overflow_probability)


def prefix_error(coefficients, steps: int, momentum: float = 0.0) -> float:
  """||A C^-1||_F / sqrt(steps): the root mean squared error, per unit of row noise, of the
  prefix sums (with momentum beta: SGD with momentum's workload A, a_j = sum_{i<=j} beta^i)
  that the release C G + Z gives, C the banded Toeplitz matrix of `coefficients` (float64)."""
  c = np.asarray(coefficients, np.float64)
  n = int(steps)
  col = np.zeros(n)
  col[:min(n, c.size)] = c[:n]
  cmat = np.tril(scipy.linalg.toeplitz(col))
  a = np.cumsum(momentum ** np.arange(n))
  amat = np.tril(scipy.linalg.toeplitz(a))
  b = scipy.linalg.solve_triangular(cmat, amat.T, lower=True, trans="T").T  # A C^-1
  return float(np.linalg.norm(b) / math.sqrt(n))


def choose_amplified_bands(*, target_epsilon: float, batch_size: int, num_examples: int,
                           steps: int, delta: float, momentum: float = 0.0,
                           max_bands: int = 64) -> int:
  """The bands b, among 1, 2, 4, ... and N // batch_size (all <= max_bands and <= N // batch
  size, so that q = b * batch / N <= 1), whose amplified MF run of `steps` steps at expected
  batch `batch_size` has the smallest prefix-sum error sigma_b * `prefix_error` at
  `target_epsilon`: more bands correlate more noise away but sample less (Choquette-Choo et al.
  2023 choose b the same way). sigma_b is calibrated with RDP here (fast; the run then
  calibrates its own accountant for the chosen b). The choice reads no data: only the
  run's public sizes."""
  most = min(int(num_examples) // int(batch_size), int(max_bands))
  if most < 1:
    raise ValueError(f"batch_size={batch_size} must be <= num_examples={num_examples}")
  candidates = sorted({2 ** i for i in range(int(math.log2(most)) + 1)} | {most})

  def error(b: int) -> float:
    c = bsr_coefficients(b, momentum)
    sigma = accounting.calibrate_amplified_mf_noise_multiplier(
        target_epsilon=target_epsilon, sampling_rate=b * batch_size / num_examples,
        coefficients=c, steps=steps, delta=delta, accountant="rdp")
    return sigma * prefix_error(c, steps, momentum)

  return min(candidates, key=error)


def amplified_bands(bands: int, *, batch_size: int, num_examples: int, steps: int, delta: float,
                    momentum: float, target_epsilon: float | None, name: str = "bands") -> int:
  """The bands (= groups) of an amplified MF run: `bands`, or for 0 `choose_amplified_bands` at
  `target_epsilon` (None, when the noise multiplier is given instead, is refused). ValueError
  naming `name` for a negative value or more groups than N // batch_size (q would pass 1)."""
  most = int(num_examples) // int(batch_size)
  resolve_bands(bands, most, name)  # validates the value
  if bands == 0:
    if target_epsilon is None:
      raise ValueError(f"{name}=0 chooses the bands for the target epsilon; with the noise "
                       f"multiplier given, give {name} too")
    bands = choose_amplified_bands(target_epsilon=target_epsilon, batch_size=batch_size,
                                   num_examples=num_examples, steps=steps, delta=delta,
                                   momentum=momentum)
  if bands > most:
    raise ValueError(f"{name}={bands} groups at an expected batch of {batch_size} need a rate "
                     f"bands * {batch_size} / {num_examples} <= 1 within a group: at most {most}")
  return int(bands)


MF_CONFIGS = (DPMFConfig, AmplifiedMFConfig)  # the configs whose step is `dp_mf_step`


class MFState(NamedTuple):
  """The optimizer state of a DP-MF run: the last b - 1 noises (leaves [b - 1, *shape], float32;
  a ring buffer: w_s is in slot s mod (b - 1); zeros before the first steps; None when b = 1),
  the steps taken (int32) and the optimizer's own state."""

  history: Params
  count: jax.Array
  inner: optax.OptState


def empty_history(params: Params, bands: int) -> Params | None:
  """Zeros for the last bands - 1 noises of `params`' shapes (None for one band: nothing to
  keep, and no zero-size arrays for a checkpoint to refuse)."""
  if bands == 1:
    return None
  return jax.tree_util.tree_map(lambda x: jnp.zeros((bands - 1,) + jnp.shape(x), jnp.float32),
                                params)


def init_state(params: Params, optimizer: optax.GradientTransformation,
               config: DPMFConfig | AmplifiedMFConfig) -> MFState:
  """The state at step 0 for `params` (the trainable ones)."""
  return MFState(history=empty_history(params, config.bands), count=jnp.zeros((), jnp.int32),
                 inner=optimizer.init(params))


def correlated_noise(history: Params | None, t, key: PRNGKey, *, std, coefficients,
                     like: Params | None = None) -> tuple[Params, Params | None]:
  """Step t of w = C^-1 Z: (w_t, the new history).

  w_t = (std * z_t - sum_{j=1}^{b-1} c_j w_{t-j}) / c_0 with z_t standard normal (one key split
  per leaf, the same draws as `privatize`'s). `history` holds w_s in slot s mod (b - 1) for the
  last b - 1 steps s (zeros for s < 0); the new history has w_t in slot t mod (b - 1), where
  w_{t-b+1}, no longer needed, was: one slot written (in place when the state is donated), and
  the whole buffer read once for the weighted sum.

  Args:
    history: leaves [b - 1, *shape] (b = len(coefficients)); None when b = 1.
    t: the step, 0-based (int or traced int32 scalar).
    key: this step's key (fold the step into the run's key).
    std: the noise std of a row of C G (sigma * l2_clip).
    coefficients: c_0 .. c_{b-1} (a numpy array or sequence; static).
    like: when b = 1, a pytree whose leaves' shapes the noise takes.
  """
  c = np.asarray(coefficients, np.float64)
  ring = c.size - 1
  if (history is None) != (ring == 0) or (history is None and like is None):
    raise ValueError(f"{c.size} bands need a history of {ring} noises (None and `like` for one "
                     f"band), got history={'None' if history is None else 'a pytree'}")
  leaves, treedef = jax.tree_util.tree_flatten(like if history is None else history)
  shapes = [jnp.shape(x) if history is None else x.shape[1:] for x in leaves]
  keys = jax.random.split(key, len(leaves))
  if ring:  # slot s holds w_{t-j} with j = (t - 1 - s) mod (b - 1) + 1
    t = jnp.asarray(t, jnp.int32)
    ages = jnp.mod(t - 1 - jnp.arange(ring), ring)
    weights = jnp.take(jnp.asarray(c[1:], jnp.float32), ages)
  out, new = [], []
  for k, h, shape in zip(keys, leaves, shapes):
    w = std * standard_normal(k, shape)
    if ring:
      w = w - jnp.tensordot(weights, h, axes=1)
    w = w / float(c[0])
    out.append(w)
    if ring:
      new.append(jax.lax.dynamic_update_index_in_dim(h, w, jnp.mod(t, ring), 0))
  return treedef.unflatten(out), (treedef.unflatten(new) if ring else None)


def dp_mf_step(params: Params, opt_state: MFState, batch: Batch, key: PRNGKey, *,
               loss_fn: LossFn, optimizer: optax.GradientTransformation,
               config: DPMFConfig | AmplifiedMFConfig):
  """One DP-MF step: (clipped sum + w_t) / batch size into `optimizer` (the fixed batch size,
  or for `AmplifiedMFConfig` the expected one, q N / bands).

  Args:
    params: the trainable parameters.
    opt_state: an `MFState` (`init_state`).
    batch: dict of arrays [batch_size, ...] with "mask": this step's batch (fixed order; for
      `AmplifiedMFConfig`, its cyclic Poisson sample, padded to max_batch_size).
    key: this step's key (the run's key with the step folded in).
    loss_fn: per-example loss.
    optimizer: any optax transformation.
    config: the mechanism.

  Returns:
    (params, opt_state, metrics) with metrics as sums: loss_sum, count, clipped, norm_sum.
  """
  grad_sum, aux = _clipped_sum(loss_fn, params, batch, config)
  with jax.named_scope(NOISE_SCOPE):
    if config.noise_multiplier == 0:
      noise, history = jax.tree_util.tree_map(jnp.zeros_like, grad_sum), opt_state.history
    else:
      noise, history = correlated_noise(
          opt_state.history, opt_state.count, key, std=config.noise_multiplier * config.l2_clip,
          coefficients=config.coefficients, like=grad_sum)
    grads = jax.tree_util.tree_map(lambda g, w: (g + w) / config.expected_batch_size, grad_sum,
                                   noise)
  with jax.named_scope(OPTIMIZER_SCOPE):
    updates, inner = optimizer.update(grads, opt_state.inner, params)
    params = optax.apply_updates(params, updates)
  return (params, MFState(history, opt_state.count + 1, inner),
          _metrics(aux, batch["mask"], config.l2_clip))
