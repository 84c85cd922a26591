"""Group metrics against fairlearn; bias AUCs against scikit-learn on the subsets they name."""

import numpy as np
import pytest
from fairlearn import metrics as flm
from sklearn.metrics import roc_auc_score

from trustjax import fairness
from trustjax.fairness import group


def _data(seed, n=600, weighted=False):
  rng = np.random.default_rng(seed)
  groups = rng.choice(["a", "b", "c", "d"], size=n, p=[0.4, 0.3, 0.2, 0.1])
  y = (rng.uniform(size=n) < 0.4).astype(int)
  bias = {"a": 0.0, "b": 0.1, "c": -0.15, "d": 0.25}
  p = (rng.uniform(size=n) < 0.2 + 0.5 * y + np.vectorize(bias.get)(groups)).astype(int)
  w = rng.uniform(0.5, 2.0, n) if weighted else None
  return y, p, groups, w


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("method", ["between_groups", "to_overall"])
@pytest.mark.parametrize("weighted", [False, True])
def test_rate_gaps_and_ratios_match_fairlearn(seed, method, weighted):
  y, p, g, w = _data(seed, weighted=weighted)
  kw = dict(sensitive_features=g, method=method, sample_weight=w)
  pairs = [(fairness.demographic_parity_difference, flm.demographic_parity_difference),
           (fairness.demographic_parity_ratio, flm.demographic_parity_ratio),
           (fairness.equal_opportunity_difference, flm.equal_opportunity_difference)]
  for ours, theirs in pairs:
    assert ours(y, p, **kw) == pytest.approx(theirs(y, p, **kw), abs=1e-6), ours.__name__
  for agg in ("worst_case", "mean"):
    assert fairness.equalized_odds_difference(y, p, agg=agg, **kw) == pytest.approx(
        flm.equalized_odds_difference(y, p, agg=agg, **kw), abs=1e-6)
    assert fairness.equalized_odds_ratio(y, p, agg=agg, **kw) == pytest.approx(
        flm.equalized_odds_ratio(y, p, agg=agg, **kw), abs=1e-6)


def test_group_rates_match_a_metric_frame():
  y, p, g, _ = _data(3)
  r = fairness.group_rates(y, p, sensitive_features=g)
  frame = flm.MetricFrame(metrics={"sel": flm.selection_rate, "tpr": flm.true_positive_rate,
                                   "fpr": flm.false_positive_rate, "n": flm.count},
                          y_true=y, y_pred=p, sensitive_features=g)
  assert list(r["groups"]) == list(frame.by_group.index)
  np.testing.assert_allclose(r["selection_rate"], frame.by_group["sel"], atol=1e-6)
  np.testing.assert_allclose(r["tpr"], frame.by_group["tpr"], atol=1e-6)
  np.testing.assert_allclose(r["fpr"], frame.by_group["fpr"], atol=1e-6)
  np.testing.assert_allclose(r["count"], frame.by_group["n"])
  assert r["overall"]["tpr"] == pytest.approx(frame.overall["tpr"], abs=1e-6)
  assert r["overall"]["accuracy"] == pytest.approx((y == p).mean(), abs=1e-6)


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="0/1"):
    fairness.group_rates([0, 2], [0, 1], sensitive_features=["a", "b"])
  with pytest.raises(ValueError, match="differ in length"):
    fairness.group_rates([0, 1], [0, 1], sensitive_features=["a"])
  with pytest.raises(ValueError, match="method"):
    fairness.demographic_parity_difference([0, 1], [0, 1], sensitive_features=["a", "b"],
                                           method="max")
  with pytest.raises(ValueError, match="agg"):
    fairness.equalized_odds_difference([0, 1], [0, 1], sensitive_features=["a", "b"], agg="max")
  with pytest.raises(ValueError, match="non-negative numbers"):
    fairness.generalized_mean_bias([0.9, -0.1])
  with pytest.raises(ValueError, match="non-negative numbers"):
    fairness.generalized_mean_bias([])


def test_bias_aucs_are_aucs_on_the_subsets_borkan_et_al_define():
  rng = np.random.default_rng(0)
  n = 2000
  y = rng.uniform(size=n) < 0.3
  sub = rng.uniform(size=n) < 0.15
  # a biased scorer: mentions of the identity push every score up
  s = rng.normal(size=n) + 1.5 * y + 0.8 * sub
  assert fairness.subgroup_auc(y, s, sub) == pytest.approx(roc_auc_score(y[sub], s[sub]))
  bpsn = (sub & ~y) | (~sub & y)
  bnsp = (sub & y) | (~sub & ~y)
  assert fairness.bpsn_auc(y, s, sub) == pytest.approx(roc_auc_score(y[bpsn], s[bpsn]))
  assert fairness.bnsp_auc(y, s, sub) == pytest.approx(roc_auc_score(y[bnsp], s[bnsp]))
  # the push shows as a low BPSN and a high BNSP
  assert fairness.bpsn_auc(y, s, sub) < fairness.subgroup_auc(y, s, sub) < fairness.bnsp_auc(
      y, s, sub)


def test_generalized_mean_is_the_power_mean():
  a = np.array([0.9, 0.8, 0.95, 0.6])
  assert fairness.generalized_mean_bias(a) == pytest.approx(np.mean(a ** -5.0) ** (-1 / 5))
  assert fairness.generalized_mean_bias(a, p=1) == pytest.approx(a.mean())
  assert fairness.generalized_mean_bias(a, p=0) == pytest.approx(np.exp(np.log(a).mean()))
  assert min(a) < fairness.generalized_mean_bias(a) < a.mean()  # the worst groups weigh most
  # An AUC of 0 (a subgroup ranked perfectly backwards): the limit of the power mean, p <= 0.
  z = np.array([0.9, 0.0, 0.7])
  assert fairness.generalized_mean_bias(z) == 0.0
  assert fairness.generalized_mean_bias(z, p=0) == 0.0
  for eps in (1e-6, 1e-9):
    assert fairness.generalized_mean_bias(z + [0, eps, 0]) < 10 * eps
  assert fairness.generalized_mean_bias(z, p=1) == pytest.approx(z.mean())


def _frame_data(seed=0, n=400):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, n)
  pred = np.where(rng.random(n) < 0.75, y, 1 - y)
  sex = rng.choice(np.array(["f", "m"]), n)
  age = rng.choice(np.array(["young", "mid", "old"]), n, p=[0.5, 0.3, 0.2])
  return y, pred, sex, age, rng.random(n) + 0.5


@pytest.mark.parametrize("intersect", [False, True])
def test_metric_frame_equals_fairlearns(intersect):
  from sklearn.metrics import (  # pylint: disable=import-outside-toplevel
      accuracy_score, precision_score, recall_score)

  y, pred, sex, age, w = _frame_data()
  metrics = {"accuracy": accuracy_score, "recall": recall_score, "precision": precision_score,
             "selection_rate": flm.selection_rate}
  sf = {"sex": sex, "age": age} if intersect else sex
  params = {"accuracy": {"sample_weight": w}}
  ours = group.metric_frame(metrics, y, pred, sensitive_features=sf, sample_params=params)
  ref = flm.MetricFrame(metrics=metrics, y_true=y, y_pred=pred, sensitive_features=sf,
                    sample_params=params)
  for k in metrics:
    assert ours.overall[k] == pytest.approx(ref.overall[k], abs=1e-12)
    for g, v in ours.by_group.items():
      assert v[k] == pytest.approx(ref.by_group[k][g], abs=1e-12)
    for method in ("between_groups", "to_overall"):
      assert ours.difference(method)[k] == pytest.approx(ref.difference(method)[k], abs=1e-12)
      assert ours.ratio(method)[k] == pytest.approx(ref.ratio(method)[k], abs=1e-12)
    assert ours.group_min()[k] == pytest.approx(ref.group_min()[k], abs=1e-12)
    assert ours.group_max()[k] == pytest.approx(ref.group_max()[k], abs=1e-12)
  assert len(ours.by_group) == (6 if intersect else 2)
  assert sum(ours.counts.values()) == len(y)


@pytest.mark.parametrize("intersect", [False, True])
def test_metric_frame_bootstrap_equals_fairlearns(intersect):
  from sklearn.metrics import (  # pylint: disable=import-outside-toplevel
      accuracy_score, recall_score)

  y, pred, sex, age, w = _frame_data(2)
  metrics = {"accuracy": accuracy_score, "recall": recall_score,
             "selection_rate": flm.selection_rate}
  sf = {"sex": sex, "age": age} if intersect else sex
  kw = {"sample_params": {"accuracy": {"sample_weight": w}}, "n_boot": 40,
        "ci_quantiles": (0.05, 0.5, 0.95), "random_state": 3}
  ours = group.metric_frame(metrics, y, pred, sensitive_features=sf, **kw)
  ref = flm.MetricFrame(metrics=metrics, y_true=y, y_pred=pred, sensitive_features=sf,
                        **{**kw, "ci_quantiles": list(kw["ci_quantiles"])})
  for k in metrics:
    theirs = lambda series, k=k: np.array([s[k] for s in series])  # fairlearn's, per quantile
    np.testing.assert_allclose(ours.overall_ci[k], theirs(ref.overall_ci), atol=1e-12)
    for method in ("between_groups", "to_overall"):
      np.testing.assert_allclose(ours.difference_ci(method)[k], theirs(ref.difference_ci(method)),
                                 atol=1e-12)
      np.testing.assert_allclose(ours.ratio_ci(method)[k], theirs(ref.ratio_ci(method)),
                                 atol=1e-12)
    np.testing.assert_allclose(ours.group_min_ci()[k], theirs(ref.group_min_ci()), atol=1e-12)
    np.testing.assert_allclose(ours.group_max_ci()[k], theirs(ref.group_max_ci()), atol=1e-12)
    for g, v in ours.by_group_ci.items():
      np.testing.assert_allclose(v[k], [s[k][g] for s in ref.by_group_ci], atol=1e-12)
  lo, mid, hi = ours.overall_ci["accuracy"]
  assert lo < ours.overall["accuracy"] < hi and lo < mid < hi


def test_metric_frame_bootstrap_on_given_resamples_against_a_loop():
  y, pred, _, _, _ = _frame_data(3, n=60)
  # A group of 3 rows is missing from some resamples: its quantiles use the others only.
  g = np.array(["big"] * 57 + ["tiny"] * 3)
  rows = group.bootstrap_resamples(60, 200, random_state=1)
  assert rows.shape == (200, 60) and rows.min() >= 0 and rows.max() < 60
  misses = np.array([not (g[r] == "tiny").any() for r in rows])
  assert 0 < misses.sum() < 200  # (the seed was chosen so that both happen)
  acc = lambda t, p: float(np.mean(t == p))
  frame = group.metric_frame({"acc": acc}, y, pred, sensitive_features=g, resamples=rows,
                             ci_quantiles=(0.1, 0.9))
  loop = np.array([acc(y[r], pred[r]) for r in rows])
  np.testing.assert_allclose(frame.overall_ci["acc"], np.quantile(loop, [0.1, 0.9]), atol=1e-12)
  tiny = np.array([acc(y[r][g[r] == "tiny"], pred[r][g[r] == "tiny"])
                   for r, m in zip(rows, misses) if not m])
  np.testing.assert_allclose(frame.by_group_ci["tiny"]["acc"], np.quantile(tiny, [0.1, 0.9]),
                             atol=1e-12)
  # Where a resample misses the tiny group, its difference is over the big group alone (0).
  gaps = np.array([0.0 if m else abs(acc(y[r][g[r] == "big"], pred[r][g[r] == "big"])
                                     - acc(y[r][g[r] == "tiny"], pred[r][g[r] == "tiny"]))
                   for r, m in zip(rows, misses)])
  np.testing.assert_allclose(frame.difference_ci()["acc"], np.quantile(gaps, [0.1, 0.9]),
                             atol=1e-12)
  with pytest.raises(ValueError, match="no bootstrap"):
    _ = group.metric_frame({"acc": acc}, y, pred, sensitive_features=g).overall_ci
  for kw in ({"n_boot": 10}, {"ci_quantiles": (0.5,)}, {"ci_quantiles": (1.5,), "n_boot": 3},
             {"n_boot": 3, "resamples": rows, "ci_quantiles": (0.5,)}):
    with pytest.raises(ValueError, match="bootstrap intervals need ci_quantiles"):
      group.metric_frame({"acc": acc}, y, pred, sensitive_features=g, **kw)
  with pytest.raises(ValueError, match=r"resamples must be \[n_boot, 60\]"):
    group.metric_frame({"acc": acc}, y, pred, sensitive_features=g, resamples=rows[:, :5],
                       ci_quantiles=(0.5,))


def test_metric_frame_rates_agree_with_group_rates_and_bad_input_is_named():
  y, pred, sex, _, _ = _frame_data(1)
  frame = group.metric_frame(lambda t, p: np.mean(p), y, pred, sensitive_features=sex)
  rates = group.group_rates(y, pred, sensitive_features=sex)
  np.testing.assert_allclose([v["<lambda>"] for v in frame.by_group.values()],
                             rates["selection_rate"], rtol=1e-6)
  with pytest.raises(ValueError, match="differ in length"):
    group.metric_frame(np.mean, y[:5], pred, sensitive_features=sex)
  with pytest.raises(ValueError, match="not given: \\['recall'\\]"):
    group.metric_frame({"acc": np.mean}, y, pred, sensitive_features=sex,
                       sample_params={"recall": {}})
