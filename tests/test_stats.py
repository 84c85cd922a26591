import statistics

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import roc_auc_score

from trustjax import stats
from trustjax.stats import mean_and_sd


def test_mean_and_sd_equal_the_standard_library():
  runs = [{"a": 0.1, "b": 3.0, "c": "x"}, {"a": 0.4, "b": 1.0}, {"a": 0.25, "b": 2.5}]
  got = mean_and_sd(runs, ("a", "b"))
  assert set(got) == {"a", "a_sd", "b", "b_sd"}
  for k in ("a", "b"):
    v = [r[k] for r in runs]
    assert got[k] == pytest.approx(statistics.fmean(v), rel=1e-12)
    assert got[f"{k}_sd"] == pytest.approx(statistics.stdev(v), rel=1e-12)
  assert mean_and_sd([{"a": 2.0}], ("a",)) == {"a": 2.0, "a_sd": 0.0}


# ----------------------------------------------------------------------------- the bootstrap


def _tied_scores(n=300, seed=0):
  rng = np.random.default_rng(seed)
  y = rng.random(n) < 0.35
  return y, np.round(rng.normal(0.6 * y, 1.0), 1)  # rounded: many ties


def test_weighted_auc_equals_scikit_learn_on_the_repeated_rows():
  y, s = _tied_scores()
  auc = stats.weighted_auc(y, s)
  assert float(auc(jnp.ones(y.size))) == pytest.approx(roc_auc_score(y, s), abs=1e-6)
  counts = np.random.default_rng(1).integers(0, 4, y.size)  # 0 drops a row, 3 triples it
  rows = np.repeat(np.arange(y.size), counts)
  assert float(auc(jnp.asarray(counts))) == pytest.approx(roc_auc_score(y[rows], s[rows]),
                                                          abs=1e-6)
  assert np.isnan(float(auc(jnp.asarray(y, jnp.float32))))  # positives only: undefined


def test_bootstrap_weights_draw_n_per_resample_and_keep_strata_sizes():
  w = np.asarray(stats.bootstrap_weights(0, 50, 4000))
  assert w.shape == (4000, 50) and (w.sum(1) == 50).all() and (w == np.round(w)).all()
  # each unit's count is Binomial(50, 1/50): mean 1, variance 49/50
  assert abs(w.mean() - 1.0) < 0.01 and abs(w.var() - 0.98) < 0.03
  strata = np.r_[np.zeros(10, int), np.ones(40, int)]
  w = np.asarray(stats.bootstrap_weights(0, 50, 300, strata=strata))
  assert (w[:, :10].sum(1) == 10).all() and (w[:, 10:].sum(1) == 40).all()


def reference_interval(stat64, weights, confidence, method):
  """float64 loop: the statistic on each resample's rows, and Efron and Tibshirani's percentile
  or BCa interval (eq. 14.10 with ties counted half, the jackknife acceleration eq. 14.15)."""
  n = weights.shape[1]
  theta = stat64(np.arange(n))
  boot = np.array([stat64(np.repeat(np.arange(n), w.astype(int))) for w in weights])
  alpha = (1 - confidence) / 2
  if method == "percentile":
    qs = (alpha, 1 - alpha)
  else:
    z0 = scipy_stats.norm.ppf((np.sum(boot < theta) + 0.5 * np.sum(boot == theta)) / len(boot))
    jack = np.array([stat64(np.delete(np.arange(n), i)) for i in range(n)])
    d = jack.mean() - jack
    a = np.sum(d ** 3) / (6 * np.sum(d ** 2) ** 1.5)
    qs = [scipy_stats.norm.cdf(z0 + (z0 + z) / (1 - a * (z0 + z)))
          for z in scipy_stats.norm.ppf([alpha, 1 - alpha])]
  return theta, np.quantile(boot, qs[0]), np.quantile(boot, qs[1]), boot.std(ddof=1)


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_bootstrap_interval_of_an_auc_equals_a_float64_loop_on_the_same_resamples(method):
  y, s = _tied_scores(n=120, seed=2)
  weights = np.asarray(stats.bootstrap_weights(3, y.size, 400, strata=y))
  got = stats.bootstrap_interval(stats.weighted_auc(y, s), y.size, num_resamples=400,
                                 weights=weights, method=method, confidence=0.9)
  ref = reference_interval(lambda rows: roc_auc_score(y[rows], s[rows]), weights, 0.9, method)
  np.testing.assert_allclose(got, ref, atol=2e-6)


@pytest.mark.parametrize("method, scipy_method", [("percentile", "percentile"), ("bca", "BCa")])
def test_bootstrap_interval_agrees_with_scipy_on_a_skewed_mean(method, scipy_method):
  """Independent resamples (ours and scipy.stats.bootstrap's, 40,000 each) of the mean of 60
  exponential draws: the ends agree within Monte Carlo error, and BCa's shift from the
  percentile interval (the skewness correction) is scipy's."""
  x = np.random.default_rng(1).exponential(size=60)
  mean = lambda w: jnp.sum(w * jnp.asarray(x, jnp.float32)) / jnp.sum(w)
  got = stats.bootstrap_interval(mean, x.size, rng=5, num_resamples=40000, method=method)
  ref = scipy_stats.bootstrap((x,), np.mean, n_resamples=40000, method=scipy_method,
                              random_state=0)
  assert got.estimate == pytest.approx(x.mean(), rel=1e-6)
  assert got.low == pytest.approx(ref.confidence_interval.low, abs=0.015)
  assert got.high == pytest.approx(ref.confidence_interval.high, abs=0.03)  # the long tail
  assert got.standard_error == pytest.approx(ref.standard_error, rel=0.03)


def test_bootstrap_interval_of_several_statistics_and_bad_input():
  y, s = _tied_scores(n=200, seed=4)
  auc = stats.weighted_auc(y, s)
  both = lambda w: jnp.stack([auc(w), auc(w * jnp.asarray(s > 0, jnp.float32))])
  got = stats.bootstrap_interval(both, y.size, num_resamples=300, method="percentile")
  assert got.low.shape == got.high.shape == (2,)
  assert (got.low < got.estimate).all() and (got.estimate < got.high).all()
  one = stats.bootstrap_interval(auc, y.size, num_resamples=300, method="percentile")
  assert (one.low, one.high) == (got.low[0], got.high[0])  # same resamples (same rng)
  with pytest.raises(ValueError, match="method must be"):
    stats.bootstrap_interval(auc, y.size, method="basic")
  with pytest.raises(ValueError, match="weights must be"):
    stats.bootstrap_interval(auc, y.size, num_resamples=10, weights=np.ones((10, 3)))
  with pytest.raises(ValueError, match="strata has"):
    stats.bootstrap_weights(0, 5, 10, strata=[0, 1])
