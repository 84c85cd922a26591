"""Threshold post-processing (Hardt et al. 2016) against fairlearn's ThresholdOptimizer, against
a linear program over the same threshold mixtures, and the constraint it guarantees."""

import warnings

import numpy as np
import pytest
from scipy.optimize import linprog

from trustjax.fairness import group, postprocessing as pp


def _data(seed: int, n: int = 600, decimals: int = 6):
  """Three groups of different sizes whose scores are shifted differently; rounding to one
  decimal makes many ties."""
  rng = np.random.default_rng(seed)
  g = rng.choice(np.array(["a", "b", "c"]), n, p=[0.5, 0.3, 0.2])
  y = rng.integers(0, 2, n)
  shift = np.select([g == "b", g == "c"], [0.7, -0.5], 0.0)
  return y, np.round(y + shift + rng.normal(size=n), decimals), g


def _fairlearn(y, s, g, constraint, objective, grid_size, tol=None, flip=False):
  from fairlearn.postprocessing import ThresholdOptimizer  # pylint: disable=import-outside-toplevel
  from sklearn.base import BaseEstimator, ClassifierMixin  # pylint: disable=import-outside-toplevel

  class Score(ClassifierMixin, BaseEstimator):  # a prefit "model" whose prediction is column 0
    def fit(self, X, y):  # pylint: disable=unused-argument
      self.classes_ = np.array([0, 1])
      return self

    def predict(self, X):
      return np.asarray(X)[:, 0]

  name = f"{objective}_score" if "accuracy" in objective else objective
  opt = ThresholdOptimizer(estimator=Score().fit(None, None), constraints=constraint,
                           objective=name, grid_size=grid_size, prefit=True,
                           predict_method="predict", tol=tol, flip=flip)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    opt.fit(s[:, None], y, sensitive_features=g)
  pmf = opt._pmf_predict  # pylint: disable=protected-access
  return lambda s2, g2: pmf(s2[:, None], sensitive_features=g2)[:, 1]


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("decimals", [6, 1])
@pytest.mark.parametrize("constraint", pp.CONSTRAINTS)
def test_probabilities_equal_fairlearns_threshold_optimizer(constraint, decimals, flip):
  """Every objective (the rate objectives are degenerate, all of a hull's points tied at its
  ends, which pins the tie conventions), with group c's scores reversed under flip."""
  y, s, g = _data(decimals, decimals=decimals)
  if flip:
    s = np.where(g == "c", -s, s)
  rng = np.random.default_rng(1)
  s_new, g_new = np.round(rng.normal(size=200) + 0.3, 3), rng.choice(np.array(["a", "b", "c"]),
                                                                     200)
  objectives = pp.EQUALIZED_ODDS_OBJECTIVES if constraint == "equalized_odds" else pp.OBJECTIVES
  for objective in objectives:
    ref = _fairlearn(y, s, g, constraint, objective, grid_size=200, flip=flip)
    rule = pp.fit_thresholds(y, s, sensitive_features=g, constraint=constraint,
                             objective=objective, grid_size=200, flip=flip)
    np.testing.assert_allclose(pp.threshold_probabilities(rule, s, sensitive_features=g),
                               ref(s, g), rtol=0, atol=1e-12)
    np.testing.assert_allclose(pp.threshold_probabilities(rule, s_new, sensitive_features=g_new),
                               ref(s_new, g_new), rtol=0, atol=1e-12)
    assert (rule.flips is not None) == flip


@pytest.mark.parametrize("constraint", ["demographic_parity", "equalized_odds"])
def test_flip_uses_a_reversed_score_and_keeps_the_constraint(constraint):
  """A group whose score ranks it backwards: without flip its rule can at best ignore the score,
  with flip it uses the score reversed; the constraint holds exactly either way (a float64
  loop over the randomised predictions' expectations)."""
  y, s, g = _data(3)
  s = np.where(g == "c", -s, s)
  rules = {f: pp.fit_thresholds(y, s, sensitive_features=g, constraint=constraint, flip=f)
           for f in (False, True)}
  for f, rule in rules.items():
    prob = pp.threshold_probabilities(rule, s, sensitive_features=g)
    rates, acc = _loop_rates(y, prob, g)
    assert acc == pytest.approx(rule.objective_value, abs=1e-9)
    if constraint == "demographic_parity":
      assert np.ptp([r[0] for r in rates.values()]) < 1e-9
    else:
      assert np.ptp([r[1] for r in rates.values()]) < 1e-9
      assert np.ptp([r[2] for r in rates.values()]) < 1e-9
  c = list(rules[True].groups).index("c")
  assert rules[True].flips[c].any() and not rules[True].flips[[0, 1]].any()
  assert rules[True].objective_value > rules[False].objective_value + 0.02
  # The flipped rule predicts 1 below its threshold: with the scores negated back, group c's
  # probabilities are those of an unflipped rule fitted on the original scores.
  s0 = np.where(g == "c", -s, s)
  prob = pp.threshold_probabilities(rules[True], s, sensitive_features=g)[g == "c"]
  ranks = np.argsort(np.argsort(-s0[g == "c"], kind="stable"), kind="stable")
  assert np.all(np.diff(prob[np.argsort(ranks)]) <= 1e-12)  # non-increasing down s0's order


@pytest.mark.parametrize("tol", [0.02, 0.1, 0.5])
@pytest.mark.parametrize("constraint", [c for c in pp.CONSTRAINTS if c != "equalized_odds"])
def test_relaxed_constraints_equal_fairlearns_and_hold_within_tol(constraint, tol):
  y, s, g = _data(11, decimals=2)
  exact = pp.fit_thresholds(y, s, sensitive_features=g, constraint=constraint, grid_size=200)
  for objective in ("accuracy", "balanced_accuracy"):
    ref = _fairlearn(y, s, g, constraint, objective, grid_size=200, tol=tol)
    rule = pp.fit_thresholds(y, s, sensitive_features=g, constraint=constraint,
                             objective=objective, grid_size=200, tol=tol)
    prob = pp.threshold_probabilities(rule, s, sensitive_features=g)
    np.testing.assert_allclose(prob, ref(s, g), rtol=0, atol=1e-12)
    # Each group's expected rate (a float64 loop) is the rate the rule reports, at most tol apart.
    rates, acc = _loop_rates(y, prob, g)
    metric = {"demographic_parity": lambda r: r[0], "true_positive_rate_parity": lambda r: r[1],
              "false_positive_rate_parity": lambda r: r[2],
              "true_negative_rate_parity": lambda r: 1 - r[2],
              "false_negative_rate_parity": lambda r: 1 - r[1]}[constraint]
    got = np.array([metric(r) for r in rates.values()])
    np.testing.assert_allclose(got, rule.values, atol=1e-9)
    assert np.ptp(got) <= tol + 1e-9 and rule.value == rule.values.min() and rule.tol == tol
    if objective == "accuracy":  # relaxing can only help: the exact rule is one candidate
      assert acc == pytest.approx(rule.objective_value, abs=1e-9)
      assert rule.objective_value >= exact.objective_value - 1e-12
      assert rule.objective_value > exact.objective_value and np.ptp(got) > 0  # (active here)
  with pytest.raises(ValueError, match="tol must be in"):
    pp.fit_thresholds(y, s, sensitive_features=g, constraint=constraint, tol=-0.1)
  with pytest.raises(ValueError, match="not equalized_odds"):
    pp.fit_thresholds(y, s, sensitive_features=g, constraint="equalized_odds", tol=0.1)


def _loop_rates(y, prob, g):
  """float64 per-group expected selection rate, TPR, FPR and the accuracy, by a loop."""
  out = {}
  for v in np.unique(g):
    m = g == v
    out[v] = (prob[m].mean(), prob[m & (y == 1)].mean(), prob[m & (y == 0)].mean())
  return out, float(np.mean(np.where(y == 1, prob, 1 - prob)))


@pytest.mark.parametrize("constraint", pp.CONSTRAINTS)
def test_the_constraint_holds_exactly_on_the_fitting_data(constraint):
  y, s, g = _data(3)
  rule = pp.fit_thresholds(y, s, sensitive_features=g, constraint=constraint)
  prob = pp.threshold_probabilities(rule, s, sensitive_features=g)
  rates, acc = _loop_rates(y, prob, g)
  sr, tpr, fpr = (np.array([r[i] for r in rates.values()]) for i in range(3))
  want = {"demographic_parity": [sr], "equalized_odds": [tpr, fpr],
          "true_positive_rate_parity": [tpr], "false_positive_rate_parity": [fpr],
          "true_negative_rate_parity": [1 - fpr], "false_negative_rate_parity": [1 - tpr]}
  for r in want[constraint]:
    np.testing.assert_allclose(r, r[0], atol=1e-12)
  if constraint != "equalized_odds":
    np.testing.assert_allclose(want[constraint][0], rule.value, atol=1e-12)
  else:
    np.testing.assert_allclose(fpr, rule.value, atol=1e-12)
    assert rule.constant == rule.value and (rule.p_ignore >= 0).all()
  assert acc == pytest.approx(rule.objective_value, abs=1e-12)
  # The plain threshold at 0.5 breaks the constraint on this data: post-processing has work.
  plain = pp.expected_rates(y, (s > 0.5).astype(float), sensitive_features=g)
  assert plain["demographic_parity_difference"] > 0.2


def _lp_optimum(y, s, g, constraint):
  """The best expected accuracy over per-group mixtures of the same threshold rules whose
  rates are exactly equal across groups (a linear program; the common rates are free)."""
  names = np.unique(g)
  cols, acc, rate_rows = [], [], []
  for v in names:
    yg, sg = y[g == v], s[g == v]
    t = np.concatenate([[np.inf], np.unique(sg)[::-1][:-1] / 2 + np.unique(sg)[::-1][1:] / 2,
                        [-np.inf]])
    pred = sg[None, :] > t[:, None]  # [thresholds, examples]
    cols.append(len(t))
    acc.append((pred == yg[None, :]).sum(1) / len(y))
    rate_rows.append({"sr": pred.mean(1), "tpr": pred[:, yg == 1].mean(1),
                      "fpr": pred[:, yg == 0].mean(1)})
  rates = {"demographic_parity": ["sr"], "equalized_odds": ["tpr", "fpr"]}[constraint]
  nv = sum(cols) + len(rates)  # mixture weights, then the common rates
  a_eq, b_eq = [], []
  off = np.cumsum([0] + cols)
  for i in range(len(names)):
    row = np.zeros(nv)
    row[off[i]:off[i + 1]] = 1
    a_eq.append(row)
    b_eq.append(1.0)
    for j, r in enumerate(rates):
      row = np.zeros(nv)
      row[off[i]:off[i + 1]] = rate_rows[i][r]
      row[sum(cols) + j] = -1
      a_eq.append(row)
      b_eq.append(0.0)
  c = np.concatenate([-np.concatenate(acc), np.zeros(len(rates))])
  res = linprog(c, A_eq=np.array(a_eq), b_eq=b_eq, bounds=[(0, None)] * nv, method="highs")
  assert res.status == 0
  return -res.fun


@pytest.mark.parametrize("constraint", ["demographic_parity", "equalized_odds"])
def test_accuracy_is_the_linear_programs_optimum_up_to_the_grid(constraint):
  y, s, g = _data(4, n=300, decimals=2)
  best = _lp_optimum(y, s, g, constraint)
  coarse = pp.fit_thresholds(y, s, sensitive_features=g, constraint=constraint, grid_size=4)
  fine = pp.fit_thresholds(y, s, sensitive_features=g, constraint=constraint, grid_size=20000)
  # The grid restricts the common rate (the coarse grid's rates are among the fine one's), so
  # the LP bounds both from above; the fine grid comes within its step of the optimum.
  assert coarse.objective_value <= fine.objective_value <= best + 1e-9
  assert fine.objective_value == pytest.approx(best, abs=1e-4)
  assert coarse.objective_value < best - 1e-3  # the bound is not met by accident


def test_draws_follow_the_probabilities_and_are_reproducible():
  y, s, g = _data(5, n=20000)
  rule = pp.fit_thresholds(y, s, sensitive_features=g, constraint="equalized_odds")
  prob = pp.threshold_probabilities(rule, s, sensitive_features=g)
  assert ((prob > 0) & (prob < 1)).any()  # the rule is randomised somewhere
  draws = pp.threshold_predict(rule, s, sensitive_features=g, rng=7)
  np.testing.assert_array_equal(draws, pp.threshold_predict(rule, s, sensitive_features=g,
                                                            rng=7))
  assert set(np.unique(draws)) <= {0, 1}
  for v in ("a", "b", "c"):  # per group: the count of ones within 4 sd of its expectation
    m = g == v
    sd = np.sqrt((prob[m] * (1 - prob[m])).sum())
    assert abs(draws[m].sum() - prob[m].sum()) < 4 * sd + 1e-9


def test_expected_rates_equal_the_hard_metrics_and_a_loop():
  y, s, g = _data(6)
  pred = (s > 0.4).astype(int)
  r = pp.expected_rates(y, pred.astype(float), sensitive_features=g)
  assert r["demographic_parity_difference"] == pytest.approx(
      group.demographic_parity_difference(y, pred, sensitive_features=g), abs=1e-6)
  assert r["equalized_odds_difference"] == pytest.approx(
      group.equalized_odds_difference(y, pred, sensitive_features=g), abs=1e-6)
  prob = np.clip(s / 3 + 0.3, 0, 1)
  r = pp.expected_rates(y, prob, sensitive_features=g)
  rates, acc = _loop_rates(y, prob, g)
  np.testing.assert_allclose(r["selection_rate"], [v[0] for v in rates.values()], rtol=1e-5)
  np.testing.assert_allclose(r["tpr"], [v[1] for v in rates.values()], rtol=1e-5)
  assert r["accuracy"] == pytest.approx(acc, rel=1e-5)


@pytest.mark.parametrize("kw,message", [
    ({"constraint": "parity"}, "constraint must be one of"),
    ({"objective": "f1"}, "objective must be one of"), ({"grid_size": 0}, "grid_size"),
    ({"y_true": np.array([0, 2, 1, 0])}, "0/1 labels"),
    ({"scores": np.array([0.1, np.nan, 0.3, 0.4])}, "finite"),
    ({"scores": np.array([0.1, 0.2])}, "differ in length"),
    ({"y_true": np.array([1, 1, 1, 0]), "constraint": "equalized_odds"},
     "group 'x' has only positive labels"),
    ({"y_true": np.array([0, 0, 1, 0]), "constraint": "true_positive_rate_parity"},
     "needs positives in every group"),
    ({"constraint": "equalized_odds", "objective": "selection_rate"},
     "equalized_odds takes objective")])
def test_bad_input_is_named(kw, message):
  args = {"y_true": np.array([0, 1, 1, 0]), "scores": np.array([0.1, 0.2, 0.3, 0.4]),
          "sensitive_features": np.array(["x", "x", "y", "y"]), **kw}
  with pytest.raises(ValueError, match=message):
    pp.fit_thresholds(args.pop("y_true"), args.pop("scores"), **args)


def test_prediction_refuses_groups_it_was_not_fitted_on():
  y, s, g = _data(7)
  rule = pp.fit_thresholds(y, s, sensitive_features=g)
  with pytest.raises(ValueError, match=r"not fitted on: \['d'\]"):
    pp.threshold_probabilities(rule, s[:3], sensitive_features=np.array(["a", "d", "b"]))
  with pytest.raises(ValueError, match="probabilities in"):
    group.group_rates(y, s, sensitive_features=g, probabilities=True)
