"""Attack metrics against scikit-learn, scipy's binomial law and randomized response."""

import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from trustjax.attacks import metrics


def _scores(seed, n=400, ties=True):
  rng = np.random.default_rng(seed)
  y = rng.uniform(size=n) < 0.4
  s = rng.normal(size=n) + 0.8 * y
  if ties:
    s = np.round(s, 1)  # many tied scores
  return y, s


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_roc_and_auc_match_scikit_learn(seed, ties):
  y, s = _scores(seed, ties=ties)
  fpr, tpr, thr = metrics.roc_curve(y, s)
  ref_fpr, ref_tpr, ref_thr = skm.roc_curve(y, s, drop_intermediate=False)
  np.testing.assert_allclose(fpr, ref_fpr)
  np.testing.assert_allclose(tpr, ref_tpr)
  np.testing.assert_allclose(thr[1:], ref_thr[1:])
  assert metrics.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
  for target in (0.0, 0.01, 0.1, 0.5, 1.0):
    assert metrics.tpr_at_fpr(y, s, target) == pytest.approx(ref_tpr[ref_fpr <= target].max())


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="both classes"):
    metrics.roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="differ in size"):
    metrics.roc_auc([1, 0], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="non-finite"):
    metrics.roc_auc([1, 0], [np.nan, 0.2])
  with pytest.raises(ValueError, match="fpr"):
    metrics.tpr_at_fpr([1, 0], [0.3, 0.2], 1.5)
  with pytest.raises(ValueError, match="delta"):
    metrics.empirical_epsilon_lower_bound([1, 0], [0.3, 0.2], delta=1.0)


def test_clopper_pearson_limits_solve_the_binomial_tails():
  k = np.array([0, 3, 50, 100])
  n = np.full(4, 100)
  lo, hi = metrics.clopper_pearson(k, n, 0.9)
  for ki, l, h in zip(k, lo, hi):
    if ki < 100:
      assert stats.binom.cdf(ki, 100, h) == pytest.approx(0.05, rel=1e-6)
    if ki > 0:
      assert stats.binom.sf(ki - 1, 100, l) == pytest.approx(0.05, rel=1e-6)
  assert lo[0] == 0.0 and hi[-1] == 1.0


def _loop_bound(y, s, delta, confidence):
  """Every threshold's bound, written out from the definition."""
  a = (1 - confidence) / 2
  upper = lambda k, n: 1.0 if k == n else stats.beta.ppf(1 - a, k + 1, n - k)
  best = 0.0
  for t in np.unique(s):
    pred = s >= t
    fp, fn = int((pred & ~y).sum()), int((~pred & y).sum())
    fpr_hi, fnr_hi = upper(fp, int((~y).sum())), upper(fn, int(y.sum()))
    for num, den in ((1 - delta - fpr_hi, fnr_hi), (1 - delta - fnr_hi, fpr_hi)):
      if num > 0:
        best = max(best, math.log(num / den))
  return best


@pytest.mark.parametrize("seed", [0, 1])
def test_epsilon_lower_bound_equals_a_loop_over_thresholds(seed):
  y, s = _scores(seed, n=300)
  ref = _loop_bound(y, s, 1e-5, 0.95)
  assert ref > 0.1
  assert metrics.empirical_epsilon_lower_bound(y, s, delta=1e-5) == pytest.approx(ref, rel=1e-9)
  t = metrics.best_threshold(y, s, delta=1e-5)
  assert metrics.empirical_epsilon_lower_bound(y, s, delta=1e-5, threshold=t) == pytest.approx(ref)


def test_perfect_separation_gives_the_closed_form_bound():
  # No errors among n members and n non-members: both upper limits are 1 - (a/2)^(1/n).
  n = 500
  y = np.r_[np.ones(n, bool), np.zeros(n, bool)]
  s = np.r_[np.ones(n), np.zeros(n)]
  hi = 1 - 0.025 ** (1 / n)
  assert metrics.empirical_epsilon_lower_bound(y, s) == pytest.approx(math.log((1 - hi) / hi))


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0])
def test_randomized_response_bound_is_below_its_epsilon_and_close(eps):
  # Randomized response is eps-DP: no valid audit may exceed eps, and with 40k trials at the
  # mechanism's own test the bound comes close.
  rng = np.random.default_rng(int(eps * 10))
  n = 20000
  y = np.r_[np.ones(n, bool), np.zeros(n, bool)]
  p = math.exp(eps) / (1 + math.exp(eps))
  out = np.where(y, rng.uniform(size=2 * n) < p, rng.uniform(size=2 * n) >= p).astype(float)
  lb = metrics.empirical_epsilon_lower_bound(y, out, threshold=1.0)
  assert 0.85 * eps < lb <= eps
  # no signal: a threshold fixed in advance gives (almost) nothing
  noise = rng.uniform(size=2 * n)
  assert metrics.empirical_epsilon_lower_bound(y, noise, threshold=0.5) < 0.05


def test_one_run_p_value_equals_a_float64_loop_over_the_binomial():
  # Steinke et al. 2023: P[B >= v] + 2 m delta max_i P[v - i <= B < v] / i, B ~ Bin(r, p)
  for m, r, v, eps, delta in [(1000, 100, 80, 1.0, 1e-5), (200, 50, 50, 3.0, 1e-3),
                              (500, 10, 0, 0.5, 1e-4), (300, 40, 25, 0.2, 0.0)]:
    p = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, j) * p ** j * (1 - p) ** (r - j) for j in range(r + 1)]
    tail = sum(pmf[v:])
    best, window = 0.0, 0.0
    for i in range(1, v + 1):
      window += pmf[v - i]
      best = max(best, window / i)
    want = min(tail + 2 * m * delta * best, 1.0)
    assert metrics.one_run_p_value(m, r, v, eps, delta) == pytest.approx(want, rel=1e-9,
                                                                        abs=1e-12)
  with pytest.raises(ValueError, match="num_correct <= num_guesses"):
    metrics.one_run_p_value(10, 5, 6, 1.0, 0.0)


@pytest.mark.parametrize("m,shift,delta", [(1000, 1.0, 1e-5), (600, 3.0, 1e-4),
                                           (2000, 0.8, 1e-6)])
def test_one_run_bound_matches_jax_privacy(m, shift, delta):
  from jax_privacy import auditing  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(m)
  y = rng.random(m) < 0.5
  s = rng.normal(shift * y, 1.0)
  found = []
  for k in (10, 64, 300):
    threshold = np.sort(s)[::-1][k - 1]
    ref = auditing.CanaryScoreAuditor(s[y], s[~y]).epsilon_one_run(
        0.05, delta, threshold_strategy=auditing.Explicit(threshold))
    got = metrics.one_run_epsilon_lower_bound(y, s, delta=delta, num_guesses=k)
    assert got == pytest.approx(ref, abs=1e-5)
    found.append(got)
  assert max(found) > 0.3  # the comparison is not all zeros
  # several k: the confidence is split over them, so each bound is below its k's alone
  both = metrics.one_run_epsilon_lower_bound(y, s, delta=delta, num_guesses=(10, 64, 300))
  assert both <= max(found) + 1e-9


@pytest.mark.parametrize("eps", [1.0, 2.0])
def test_one_run_bound_is_valid_and_tight_for_randomized_response(eps):
  # Each of m canaries is included with probability 1/2 and the "model" releases each inclusion
  # bit through eps-randomized response: an eps-DP mechanism that attains the bound. Over 200
  # runs, the 95% bound may exceed eps in about 5% of them, and it comes close to eps.
  rng = np.random.default_rng(int(eps))
  m, runs, p = 1000, 200, math.exp(eps) / (1 + math.exp(eps))
  bounds = []
  for _ in range(runs):
    y = rng.random(m) < 0.5
    released = np.where(rng.random(m) < p, y, ~y)
    scores = released + 1e-3 * rng.random(m)  # ties broken by noise that carries nothing
    bounds.append(metrics.one_run_epsilon_lower_bound(y, scores, delta=0.0, num_guesses=256))
  bounds = np.array(bounds)
  assert (bounds > eps).mean() <= 0.1
  assert np.median(bounds) > 0.6 * eps
  with pytest.raises(ValueError, match="num_guesses must lie"):
    metrics.one_run_epsilon_lower_bound(y, scores, delta=0.0, num_guesses=0)
