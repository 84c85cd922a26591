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


def _reference(target, shadow, inside, online, global_variance, used=None):
  """Per-example Gaussian fits in float64 with scipy (eps 1e-6 on the std, like the library),
  over the shadows `used` marks."""
  n = target.size
  out = np.full(n, np.nan)
  sides = {}
  used = np.ones_like(inside) if used is None else used
  for name, sel in (("in", inside & used), ("out", ~inside & used)):
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
@pytest.mark.parametrize("some_unused", [False, True])
def test_lira_matches_a_float64_loop(online, global_variance, some_unused):
  rng = np.random.default_rng(3)
  m, n = 16, 40
  inside = membership_like(rng, m, n)
  shadow = rng.normal(size=(m, n)) + 1.5 * inside
  target = rng.normal(size=n) + 0.7
  used = rng.random((m, n)) < 0.7 if some_unused else None
  got = np.asarray(membership.lira_scores(target, shadow, inside, online=online,
                                          global_variance=global_variance, shadow_used=used))
  ref = _reference(target, shadow, inside, online, global_variance, used)
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
  loo = membership.leave_one_out_lira(stats_, inside, global_variance=True, balance=False)
  balanced = membership.leave_one_out_lira(stats_, inside, global_variance=True, seed=4)
  draws = np.random.default_rng(4)
  for t in range(6):
    others = [i for i in range(6) if i != t]
    np.testing.assert_allclose(
        loo[t], membership.lira_scores(stats_[t], stats_[others], inside[others],
                                       global_variance=True), rtol=1e-6)
    used = membership.balanced_shadows(inside[others], draws)
    # 2 "in" and 2 "out" shadows per example: the larger side lost one model
    assert ((used & inside[others]).sum(0) == 2).all()
    assert ((used & ~inside[others]).sum(0) == 2).all()
    np.testing.assert_allclose(
        balanced[t], _reference(stats_[t], stats_[others], inside[others], True, True, used),
        rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("m", [4, 8])
def test_balanced_leave_one_out_has_no_signal_without_membership(m):
  # With every example in exactly half of m models, leaving the target out leaves its members
  # one "in" shadow fewer: LiRA's "in" mean is then the noisier one, and with no membership
  # signal at all the pooled AUC falls below 0.5. Balanced sides remove the bias; RMIA's
  # equal-weight average of the two sides has none to remove.
  rng = np.random.default_rng(m)
  n = 4000
  inside = membership_like(rng, m, n)
  phi = rng.normal(scale=2.0, size=n) + rng.normal(scale=0.5, size=(m, n))  # difficulty only
  auc = lambda s: metrics.roc_auc(inside[np.isfinite(s)], s[np.isfinite(s)])
  biased = auc(membership.leave_one_out_lira(phi, inside, global_variance=True, balance=False))
  fair = auc(membership.leave_one_out_lira(phi, inside, global_variance=True))
  assert biased < (0.44 if m == 4 else 0.49) and abs(fair - 0.5) < 0.012
  rmia = auc(membership.leave_one_out_rmia(1 / (1 + np.exp(-phi)), inside))
  assert abs(rmia - 0.5) < 0.012


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


def _rmia_reference(x_t, x_ref, x_in, z_t, z_ref, z_in, online, a, gamma, same=None):
  """RMIA written per point and per pair in float64 (Zarifzadeh et al. 2024, Sec. 3): Pr(x)
  from the reference models, then the fraction of z with LR(x, z) >= gamma. `same[i]`: the
  column of z that is point i itself (left out), or -1."""
  def marginal(p, inside):
    out = np.full(p.shape[1], np.nan)
    for j in range(p.shape[1]):
      ins, outs = p[inside[:, j], j], p[~inside[:, j], j]
      if not len(outs):
        continue
      if online and len(ins):
        out[j] = 0.5 * ins.mean() + 0.5 * outs.mean()
      else:
        out[j] = 0.5 * ((1 + a) * outs.mean() + (1 - a))
    return out
  px = marginal(np.float64(x_ref), x_in)
  pz = marginal(np.float64(z_ref), z_in)
  scores = np.full(len(x_t), np.nan)
  for i in range(len(x_t)):
    if np.isnan(px[i]):
      continue
    hits = total = 0
    for j in range(len(z_t)):
      if np.isnan(pz[j]) or (same is not None and same[i] == j):
        continue
      lr = (x_t[i] / px[i]) / (z_t[j] / pz[j])
      hits += lr >= gamma
      total += 1
    scores[i] = hits / total
  return scores


@pytest.mark.parametrize("online,gamma,with_z_in", [(True, 1.0, False), (True, 2.0, True),
                                                    (False, 1.0, True)])
def test_rmia_matches_a_float64_loop(online, gamma, with_z_in):
  rng = np.random.default_rng(5)
  m, n, k = 9, 30, 50
  x_in = membership_like(rng, m, n)
  x_in[:, 0] = False  # no reference trained on point 0: the offline formula
  x_in[:, 1] = True  # none left point 1 out: NaN
  sig = lambda v: 1 / (1 + np.exp(-v))
  x_ref = sig(rng.normal(size=(m, n)) + 2 * x_in)
  x_t = sig(rng.normal(size=n) + 1)
  z_in = membership_like(rng, m, k) if with_z_in else None
  z_ref = sig(rng.normal(size=(m, k)) + (2 * z_in if with_z_in else 0))
  z_t = sig(rng.normal(size=k))
  got = np.asarray(membership.rmia_scores(x_t, x_ref, x_in, z_t, z_ref, z_in, online=online,
                                          offline_a=0.3, gamma=gamma))
  ref = _rmia_reference(x_t, x_ref, x_in, z_t, z_ref,
                        np.zeros((m, k), bool) if z_in is None else z_in, online, 0.3, gamma)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
  assert np.isnan(got[1]) and np.isfinite(got[0])
  np.testing.assert_allclose(got[~np.isnan(ref)], ref[~np.isnan(ref)], atol=1e-6)
  assert 0 < np.nanmean(got) < 1


@pytest.mark.parametrize("gamma", [1.0, 1.5])
def test_leave_one_out_rmia_uses_the_targets_non_members_as_population(gamma):
  rng = np.random.default_rng(2)
  m, n = 6, 25
  inside = membership_like(rng, m, n)
  probs = 1 / (1 + np.exp(-(rng.normal(size=(m, n)) + inside)))
  loo = membership.leave_one_out_rmia(probs, inside, gamma=gamma)
  for t in range(m):
    others = [i for i in range(m) if i != t]
    z = np.flatnonzero(~inside[t])
    same = np.array([np.flatnonzero(z == i)[0] if i in z else -1 for i in range(n)])
    ref = _rmia_reference(probs[t], probs[others], inside[others], probs[t, z],
                          probs[others][:, z], inside[others][:, z], True, 0.3, gamma, same)
    np.testing.assert_allclose(loo[t], ref, atol=1e-6)


def test_rmia_ranks_like_the_calibrated_probability_and_finds_members():
  rng = np.random.default_rng(0)
  m, n = 16, 400
  inside = membership_like(rng, m, n)
  base = rng.normal(scale=3.0, size=n)  # examples differ in difficulty
  probs = 1 / (1 + np.exp(-(base + inside * 1.5 + rng.normal(scale=0.4, size=(m, n)))))
  loo = membership.leave_one_out_rmia(probs, inside)
  assert metrics.roc_auc(inside.ravel(), loo.ravel()) > 0.85
  assert metrics.roc_auc(inside.ravel(), probs.ravel()) < 0.65  # the global threshold
  # for one target the score orders points as p / Pr(x) does
  marg = np.asarray(membership.rmia_marginal(probs[1:], inside[1:]))
  ratio = probs[0] / marg
  order = np.argsort(ratio, kind="stable")
  assert (np.diff(loo[0][order]) >= -1e-7).all()
  # non-members' scores are about uniform on [0, 1]
  assert abs(loo[~inside].mean() - 0.5) < 0.02
  # no membership effect, no signal (online RMIA's Pr(x) is symmetric in "in" and "out", so
  # swapping the labels, LiRA's check above, would not break it)
  null = 1 / (1 + np.exp(-(base + rng.normal(scale=0.4, size=(m, n)))))
  auc = metrics.roc_auc(inside.ravel(), membership.leave_one_out_rmia(null, inside).ravel())
  assert abs(auc - 0.5) < 0.03


def test_rmia_checks_its_arguments():
  p, inside = np.full((2, 3), 0.5), np.zeros((2, 3), bool)
  with pytest.raises(ValueError, match="gamma must be positive"):
    membership.rmia_scores(p[0], p, inside, p[0], p, gamma=0.0)
  with pytest.raises(ValueError, match="offline_a must lie"):
    membership.rmia_scores(p[0], p, inside, p[0], p, offline_a=1.5)
  with pytest.raises(ValueError, match="expected target_probs"):
    membership.rmia_scores(p[0, :2], p, inside, p[0], p)
  with pytest.raises(ValueError, match="at least 2 models"):
    membership.leave_one_out_rmia(p[:1], inside[:1])
