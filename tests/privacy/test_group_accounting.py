"""Group privacy of a run's ledger (r copies of one canary) against float64 references: the
hockey-stick divergence of one step's dominating pair by quadrature, the Gaussian mechanism's
closed form, and the clipped sum's movement when copies leave a batch."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, stats

from tests.privacy.helpers import clipped_grad_sum, tiny_problem
from trustjax import experiments
from trustjax.attacks import canaries
from trustjax.privacy import accounting
from trustjax.privacy.dp_mf import bsr_coefficients


def _hockey_stick(p, q, eps):
  """sup_S P(S) - e^eps Q(S) = the integral of (p - e^eps q)_+ over [-30, 40], by the
  trapezoid rule on 2 million float64 points."""
  x = np.linspace(-30.0, 40.0, 2_000_001)
  return float(np.trapezoid(np.maximum(p(x) - math.exp(eps) * q(x), 0.0), x))


def _gaussian_delta(mu, eps):
  """delta(eps) of a Gaussian mechanism with sensitivity / std = mu (Balle and Wang 2018)."""
  return (stats.norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * stats.norm.cdf(-mu / 2 - eps / mu))


def _gaussian_epsilon(mu, delta):
  return optimize.brentq(lambda e: _gaussian_delta(mu, e) - delta, 0.0, 500.0, xtol=1e-12)


def test_one_dp_sgd_step_for_a_group_matches_quadrature():
  """r = 3 copies, Poisson rate 0.3, sigma 1: the step's output is N(0, 1) without them and
  sum_i Binomial(i; 3, 0.3) N(i, 1) with them; delta(eps) is the larger hockey-stick divergence
  of the two orders. The ledger's PLD (grid 1e-3, connect-the-dots) agrees to the quadrature's
  accuracy."""
  sigma, q, r = 1.0, 0.3, 3
  weights = stats.binom.pmf(np.arange(r + 1), r, q)
  mix = lambda x: sum(w * stats.norm.pdf(x, i, sigma) for i, w in enumerate(weights))
  null = lambda x: stats.norm.pdf(x, 0.0, sigma)
  ledger = accounting.PrivacyLedger()
  ledger.record(noise_multiplier=sigma, sampling_rate=q, steps=1)
  eps = np.array([0.0, 0.25, 0.5, 1.0, 2.0, 3.0])
  got = ledger.group_deltas(r, eps)  # the group default grid, 1e-3
  want = np.array([max(_hockey_stick(mix, null, e), _hockey_stick(null, mix, e)) for e in eps])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
  assert want[1] > 0.1 and want[-1] > 1e-4  # the comparison is not between zeros


@pytest.mark.parametrize("r", [1, 2, 5])
def test_without_sampling_a_group_is_an_r_fold_gaussian(r):
  """At q = 1 every copy is in every step: T steps at sigma are one Gaussian mechanism of
  sensitivity r sqrt(T) / sigma, whose epsilon has a closed form (the mixture has one
  component, built as a Gaussian of sensitivity r)."""
  sigma, steps, delta = 4.0, 9, 1e-5
  ledger = accounting.PrivacyLedger()
  ledger.record(noise_multiplier=sigma, sampling_rate=1.0, steps=steps)
  want = _gaussian_epsilon(r * math.sqrt(steps) / sigma, delta)
  assert ledger.group_epsilon(r, delta, grid=1e-4) == pytest.approx(want, rel=1e-3, abs=1e-3)
  assert ledger.group_epsilon(r, delta, grid=1e-4) >= want - 1e-9


def test_one_example_is_the_ledgers_epsilon_and_groups_grow():
  delta = 1e-5
  sgd = accounting.PrivacyLedger()
  sgd.record(noise_multiplier=1.1, sampling_rate=0.01, steps=300)
  sgd.record(noise_multiplier=0.9, sampling_rate=0.02, steps=100)
  mf = accounting.PrivacyLedger()
  mf.record_mf(noise_multiplier=2.0, coefficients=bsr_coefficients(4, 0.9), steps_per_epoch=5,
               steps=20)
  tree = accounting.PrivacyLedger()
  tree.record_tree(noise_multiplier=3.0, steps_per_tree=7, steps=21)
  amf = accounting.PrivacyLedger()
  amf.record_amplified_mf(noise_multiplier=2.0, sampling_rate=0.05,
                          coefficients=bsr_coefficients(4, 0.0), steps=40)
  for ledger in (sgd, mf, tree, amf):
    assert ledger.group_epsilon(1, delta) == ledger.epsilon(delta)
  groups = [sgd.group_epsilon(r, delta) for r in (1, 2, 4)]
  assert groups[0] < groups[1] < groups[2]
  # DP-MF and DP-FTRL: the group's sensitivity is r times one example's (closed form).
  depth = accounting.tree_depth(7)
  for ledger, mu in ((mf, 1.0 / mf.mf_multiplier()), (tree, math.sqrt(3 * depth) / 3.0)):
    assert ledger.group_epsilon(3, delta, grid=1e-4) == pytest.approx(
        _gaussian_epsilon(3 * mu, delta), rel=1e-3)
  with pytest.raises(ValueError, match="amplified MF has no group accounting"):
    amf.group_epsilon(2, delta)
  for bad in (0, 1.5):
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
      sgd.group_epsilon(bad, delta)
  with pytest.raises(ValueError, match=r"epsilons must lie in \[0, 700\]"):
    sgd.group_deltas(2, [-1.0])
  assert accounting.PrivacyLedger().group_epsilon(4, delta) == 0.0
  silent = accounting.PrivacyLedger()
  silent.record(noise_multiplier=0.0, sampling_rate=0.1, steps=3)
  assert silent.group_epsilon(2, delta) == math.inf
  np.testing.assert_array_equal(silent.group_deltas(2, [1.0, 5.0]), [1.0, 1.0])


def test_a_kept_composition_follows_the_ledger():
  """The ledger keeps its last composition: the same group's deltas and epsilon agree with a
  fresh ledger's, and recording steps, another group size or grid composes anew."""
  delta, eps = 1e-5, np.array([1.0, 4.0])
  ledger = accounting.PrivacyLedger()
  ledger.record(noise_multiplier=2.0, sampling_rate=0.05, steps=4)
  fresh = lambda: accounting.PrivacyLedger(entries=[
      accounting.LedgerEntry(**dataclasses.asdict(e)) for e in ledger.entries])
  for r in (2, 2, 3, 2):
    np.testing.assert_array_equal(ledger.group_deltas(r, eps), fresh().group_deltas(r, eps))
    assert ledger.group_epsilon(r, delta) == fresh().group_epsilon(r, delta)
  before = ledger.group_epsilon(2, delta)
  ledger.record(noise_multiplier=2.0, sampling_rate=0.05, steps=4)
  assert ledger.group_epsilon(2, delta) == fresh().group_epsilon(2, delta) > before
  assert ledger.group_epsilon(2, delta, grid=3e-3) == fresh().group_epsilon(2, delta, grid=3e-3)
  assert ledger == fresh()  # the kept composition is no field: equality and JSON as before


def test_truncation_term_is_added_to_group_deltas():
  ledger = accounting.PrivacyLedger()
  ledger.record(noise_multiplier=1.0, sampling_rate=0.05, steps=50, overflow_probability=1e-7)
  eps = np.array([0.5, 2.0, 6.0])
  plain = ledger.group_deltas(2, eps)
  with_t = ledger.group_deltas(2, eps, with_truncation=True)
  np.testing.assert_allclose(with_t - plain, (1 + np.exp(eps)) * 50 * 1e-7, rtol=1e-9)
  assert ledger.truncation_delta(2.0) == pytest.approx((1 + math.exp(2.0)) * 50 * 1e-7)


def test_copies_leaving_a_batch_move_the_clipped_sum_by_their_count():
  """The guarantee behind the mixture: i copies of one example in a batch move the clipped sum
  by exactly i clip norms (they are collinear), the mixture's i-th mean."""
  loss_fn, params, batch = tiny_problem(batch_size=10, seed=3, scale=2.0)
  batch = {k: v.at[1:4].set(v[0]) for k, v in batch.items()}  # rows 0-3: one example, 4 copies
  batch["mask"] = jnp.ones(10, bool)
  _, aux = clipped_grad_sum(loss_fn, params, batch, l2_clip=1e9)
  clip = 0.5 * float(jnp.min(aux["norms"]))
  base, _ = clipped_grad_sum(loss_fn, params, batch, l2_clip=clip)
  for i in range(1, 5):
    other, _ = clipped_grad_sum(loss_fn, params, dict(batch, mask=batch["mask"].at[:i].set(False)),
                                l2_clip=clip)
    diff = jax.tree_util.tree_map(lambda a, b: a - b, base, other)
    dist = float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(diff))))
    assert dist == pytest.approx(i * clip, rel=1e-3)


def test_canary_bounds_for_the_summary():
  """The driver's entries: group epsilon per insertion count and the exposure bounds from the
  group's profile with truncation; amplified MF reports one copy only."""
  sgd = accounting.PrivacyLedger()
  sgd.record(noise_multiplier=1.0, sampling_rate=0.02, steps=100, overflow_probability=1e-9)
  out = experiments.canary_bounds(sgd, (1, 2), 1e-5, 999)
  for r in (1, 2):
    bound = canaries.exposure_bound(canaries.BOUND_EPSILONS, sgd.group_deltas(
        r, canaries.BOUND_EPSILONS, with_truncation=True), 999)
    assert out["canary_group_epsilon"][f"x{r}"] == sgd.group_epsilon(r, 1e-5)
    assert out["canary_exposure_bound"][f"x{r}"] == bound["mean"]
    assert out["canary_rank_one_bound"][f"x{r}"] == bound["rank_one"]
  assert (out["canary_exposure_bound"]["x1"] < out["canary_exposure_bound"]["x2"]
          < math.log2(1000))
  amf = accounting.PrivacyLedger()
  amf.record_amplified_mf(noise_multiplier=2.0, sampling_rate=0.05,
                          coefficients=bsr_coefficients(4, 0.0), steps=40)
  assert list(experiments.canary_bounds(amf, (1, 4), 1e-5, 999)["canary_group_epsilon"]) == ["x1"]
