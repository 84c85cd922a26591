"""Membership scores against float64 numpy / scipy references written out per example."""

import numpy as np
import pytest
from scipy import stats

from trustjax.attacks import membership, metrics


def test_logit_confidence_is_the_log_odds_of_the_label():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 7)) * 3
  labels = rng.integers(0, 7, 64)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p = p / p.sum(1, keepdims=True)
  py = p[np.arange(64), labels]
  np.testing.assert_allclose(membership.logit_confidence(logits, labels), np.log(py / (1 - py)),
                             rtol=1e-4, atol=1e-4)
  # where p_y rounds to 1 in float32 the statistic stays finite and large
  big = membership.logit_confidence(np.array([[60.0, 0.0, 0.0]]), np.array([0]))
  assert float(big[0]) == pytest.approx(60.0 - np.log(2.0), rel=1e-6)
  np.testing.assert_array_equal(membership.loss_threshold_scores(np.array([0.5, 2.0])),
                                [-0.5, -2.0])


def _reference(target, shadow, inside, online, global_variance):
  """Per-example Gaussian fits in float64 with scipy (eps 1e-6 on the std, like the library)."""
  n = target.size
  out = np.full(n, np.nan)
  sides = {}
  for name, sel in (("in", inside), ("out", ~inside)):
    mu = np.array([shadow[sel[:, j], j].mean() if sel[:, j].any() else np.nan for j in range(n)])
    if global_variance:
      dev = np.concatenate([shadow[sel[:, j], j] - mu[j] for j in range(n)])
      sd = np.full(n, np.sqrt((dev ** 2).sum() / (dev.size - 1)))
    else:
      sd = np.array([shadow[sel[:, j], j].std(ddof=1) if sel[:, j].sum() > 1 else 0.0
                     for j in range(n)])
    sides[name] = (mu, sd + 1e-6)
  for j in range(n):
    mo, so = sides["out"][0][j], sides["out"][1][j]
    if online:
      mi, si = sides["in"][0][j], sides["in"][1][j]
      out[j] = stats.norm.logpdf(target[j], mi, si) - stats.norm.logpdf(target[j], mo, so)
    else:
      out[j] = stats.norm.logcdf(target[j], mo, so)
  return out


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("global_variance", [False, True])
def test_lira_matches_a_float64_loop(online, global_variance):
  rng = np.random.default_rng(3)
  m, n = 16, 40
  inside = membership_like(rng, m, n)
  shadow = rng.normal(size=(m, n)) + 1.5 * inside
  target = rng.normal(size=n) + 0.7
  got = np.asarray(membership.lira_scores(target, shadow, inside, online=online,
                                          global_variance=global_variance))
  ref = _reference(target, shadow, inside, online, global_variance)
  np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4)


def membership_like(rng, m, n):
  return rng.uniform(size=(m, n)).argsort(0).argsort(0) < m // 2


def test_lira_marks_untestable_examples_nan_and_checks_shapes():
  inside = np.array([[True, False], [True, True]])
  s = membership.lira_scores(np.zeros(2), np.ones((2, 2)), inside)
  assert np.isnan(np.asarray(s)[0]) and np.isfinite(np.asarray(s)[1])  # example 0 has no "out"
  with pytest.raises(ValueError, match="expected target_stats"):
    membership.lira_scores(np.zeros(3), np.ones((2, 2)), inside)


def test_leave_one_out_uses_the_other_models_as_shadows():
  rng = np.random.default_rng(1)
  inside = membership_like(rng, 6, 10)
  stats_ = rng.normal(size=(6, 10)) + inside
  loo = membership.leave_one_out_lira(stats_, inside, global_variance=True)
  for t in range(6):
    others = [i for i in range(6) if i != t]
    np.testing.assert_allclose(
        loo[t], membership.lira_scores(stats_[t], stats_[others], inside[others],
                                       global_variance=True), rtol=1e-6)


def test_lira_beats_the_loss_threshold_when_examples_differ_in_difficulty():
  # Each example has its own baseline confidence; membership shifts it by +1. A global
  # threshold on phi is confounded by the baselines; LiRA's per-example Gaussians are not.
  rng = np.random.default_rng(0)
  m, n = 32, 500
  inside = membership_like(rng, m, n)
  base = rng.normal(scale=3.0, size=n)
  phi = base + inside * 1.0 + rng.normal(scale=0.4, size=(m, n))
  loo = membership.leave_one_out_lira(phi, inside)
  lira_auc = metrics.roc_auc(inside.ravel(), loo.ravel())
  global_auc = metrics.roc_auc(inside.ravel(), phi.ravel())
  assert global_auc < 0.65 and lira_auc > 0.9
  assert metrics.tpr_at_fpr(inside.ravel(), loo.ravel(), 0.01) > 0.2
  # swapping "in" and "out" must break it
  swapped = membership.leave_one_out_lira(phi, ~inside)
  assert metrics.roc_auc(inside.ravel(), swapped.ravel()) < 0.1
