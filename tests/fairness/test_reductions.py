"""The exponentiated-gradient reduction (Agarwal et al. 2018) against fairlearn's
ExponentiatedGradient with the same learner, its Lagrangian costs against finite differences,
and the constraint it guarantees."""

import warnings

import jax
import numpy as np
import pytest

from trustjax.fairness import group, postprocessing as pp, reductions as rd


def _data(seed: int = 0, n: int = 2000):
  """Three groups whose features (and so labels and an unconstrained model's predictions) are
  shifted differently."""
  rng = np.random.default_rng(seed)
  g = rng.choice(np.array(["a", "b", "c"]), n, p=[0.5, 0.3, 0.2])
  X = rng.normal(size=(n, 5)) + np.select([g == "b", g == "c"], [0.8, -0.6], 0.0)[:, None]
  y = (X @ np.array([1.0, -0.5, 0.3, 0, 0]) + 0.5 * rng.normal(size=n) > 0.2).astype(int)
  return X.astype(np.float32), y, g


def test_logistic_regression_equals_scikit_learns_weighted_fit():
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel

  X, y, _ = _data()
  w = np.random.default_rng(1).random(len(y)) * 2
  for l2 in (0.1, 3.0):
    lr = rd.logistic_regression(l2=l2)
    theta = np.asarray(lr.fit(X, y.astype(np.float32), w.astype(np.float32)))
    ref = LogisticRegression(C=1 / l2, tol=1e-10, max_iter=10000).fit(X, y, sample_weight=w)
    np.testing.assert_allclose(theta[:-1], ref.coef_[0], rtol=1e-4, atol=1e-4)  # float32
    np.testing.assert_allclose(theta[-1], ref.intercept_[0], rtol=1e-4, atol=1e-4)
    assert np.mean(np.asarray(lr.predict(theta, X)) != ref.predict(X)) <= 1e-3


@pytest.mark.parametrize("constraint", rd.CONSTRAINTS)
def test_the_best_response_costs_are_the_lagrangians_derivative(constraint):
  rng = np.random.default_rng(2)
  n = 60
  y = rng.integers(0, 2, n).astype(float)
  groups = rng.choice(np.array(["a", "b", "c"]), n)
  names, ids = group._groups(groups)  # pylint: disable=protected-access
  mom = rd._moments(y, names, ids, constraint)  # pylint: disable=protected-access
  lam = rng.random(2 * len(mom.cell_count))
  h = rng.random(n)
  # gamma by a float64 loop over the cells: each cell's mean minus its reference's
  cells = [(ids == i) for i in range(len(names))] if constraint == "demographic_parity" else [
      (ids == i) & (y == label) for i in range(len(names)) for label in (0, 1)]
  refs = [np.ones(n, bool)] * len(names) if constraint == "demographic_parity" else [
      y == label for _ in range(len(names)) for label in (0, 1)]
  want = np.array([h[c].mean() - h[r].mean() for c, r in zip(cells, refs)])
  np.testing.assert_allclose(mom.gamma(h), np.concatenate([want, -want]), atol=1e-12)
  e = np.eye(n)
  diff = np.array([lam @ (mom.gamma(h + e[i]) - mom.gamma(h)) for i in range(n)])
  np.testing.assert_allclose(mom.signed_cost(lam), diff, atol=1e-12)


def _fairlearn(X, y, g, constraint, eps, l2):
  from fairlearn.reductions import (  # pylint: disable=import-outside-toplevel
      DemographicParity, EqualizedOdds, ExponentiatedGradient)
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel

  moment = {"demographic_parity": DemographicParity,
            "equalized_odds": EqualizedOdds}[constraint](difference_bound=eps)
  eg = ExponentiatedGradient(LogisticRegression(C=1 / l2, tol=1e-10, max_iter=10000), moment,
                             eps=eps)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    eg.fit(X, y, sensitive_features=g)
  return eg._pmf_predict(X)[:, 1]  # pylint: disable=protected-access


@pytest.mark.parametrize("constraint", rd.CONSTRAINTS)
def test_matches_fairlearns_exponentiated_gradient_with_the_same_learner(constraint):
  X, y, g = _data()
  res = rd.exponentiated_gradient(rd.logistic_regression(l2=1.0), X, y, sensitive_features=g,
                                  constraint=constraint, eps=0.01)
  prob = rd.reduction_probabilities(res, X)
  ref = _fairlearn(X, y, g, constraint, 0.01, 1.0)
  ours, theirs = (pp.expected_rates(y, p, sensitive_features=g) for p in (prob, ref))
  key = f"{constraint}_difference"
  assert ours["accuracy"] == pytest.approx(theirs["accuracy"], abs=1e-4)
  assert ours[key] == pytest.approx(theirs[key], abs=1e-4)
  assert np.mean(np.abs(prob - ref) > 1e-3) < 0.01  # the same randomised classifier, bar a few
  # points the two solvers' coefficients put on different sides of the boundary
  assert res.error == pytest.approx(np.mean(np.where(y == 1, 1 - prob, prob)), abs=1e-6)
  # The constraint holds: every cell's rate within eps of its reference (a float64 loop).
  for v in ("a", "b", "c"):
    for ref_rows in ([np.ones(len(y), bool)] if constraint == "demographic_parity" else
                     [y == 0, y == 1]):
      cell = ref_rows & (g == v)
      assert abs(prob[cell].mean() - prob[ref_rows].mean()) <= 0.01 + 1e-9
  assert res.violation <= 1e-9 and res.gaps[-1] < res.gaps[0]
  # ... which the unconstrained learner breaks, at a lower error.
  lr = rd.logistic_regression(l2=1.0)
  plain = np.asarray(lr.predict(lr.fit(X, y.astype(np.float32), np.ones(len(y), np.float32)), X))
  unconstrained = pp.expected_rates(y, plain, sensitive_features=g)
  assert unconstrained[key] > 0.1 and unconstrained["accuracy"] > ours["accuracy"]


def test_a_loose_constraint_returns_the_unconstrained_learner():
  X, y, g = _data(3)
  lr = rd.logistic_regression(l2=1.0)
  plain = np.asarray(lr.predict(lr.fit(X, y.astype(np.float32), np.ones(len(y), np.float32)), X))
  res = rd.exponentiated_gradient(lr, X, y, sensitive_features=g, eps=1.0)
  # (its weights sum to n in float32, so a point on the boundary may fall either way)
  assert np.mean(rd.reduction_probabilities(res, X) != plain) <= 1e-3
  assert res.error == pytest.approx(np.mean(plain != y), abs=1e-3)


@pytest.mark.parametrize("kw,message", [
    ({"constraint": "parity"}, "constraint must be one of"), ({"eps": 0.0}, "eps must be"),
    ({"max_iter": 0}, "max_iter must be"), ({"y_true": np.array([0, 2, 1, 0])}, "0/1 labels"),
    ({"X": np.zeros((3, 2))}, "differ in length"),
    ({"y_true": np.array([1, 1, 0, 0]), "constraint": "equalized_odds"},
     r"empty: \['x, y=0', 'y, y=1'\]")])
def test_bad_input_is_named(kw, message):
  args = {"X": np.zeros((4, 2)), "y_true": np.array([0, 1, 1, 0]),
          "sensitive_features": np.array(["x", "x", "y", "y"]), **kw}
  with pytest.raises(ValueError, match=message):
    rd.exponentiated_gradient(rd.logistic_regression(), args.pop("X"), args.pop("y_true"),
                              **args)
  with pytest.raises(ValueError, match="l2 must be positive"):
    rd.logistic_regression(l2=0.0)


def test_flax_learner_weights_act_as_repeated_examples():
  from trustjax import models  # pylint: disable=import-outside-toplevel

  X, y, g = _data(4, n=300)
  learner = rd.flax_learner(models.MLPClassifier(hidden=(16,), num_classes=2), steps=50)
  w = np.random.default_rng(5).integers(1, 4, len(y))
  # Integer weights = each example repeated that many times (the weighted mean is the mean
  # over the repeated rows): the same full-batch steps from the same initialisation.
  weighted = learner.fit(X, y.astype(np.float32), w.astype(np.float32))
  rows = np.repeat(np.arange(len(y)), w)
  repeated = learner.fit(X[rows], y[rows].astype(np.float32), np.ones(len(rows), np.float32))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), weighted,
               repeated)
  pred = np.asarray(learner.predict(weighted, X))
  assert np.mean(pred == y) > 0.8  # it learns the labels
  # ... and serves the reduction: the constraint holds on the training data.
  res = rd.exponentiated_gradient(learner, X, y, sensitive_features=g, eps=0.02)
  prob = rd.reduction_probabilities(res, X)
  for v in ("a", "b", "c"):
    assert abs(prob[g == v].mean() - prob.mean()) <= 0.02 + 1e-9
  with pytest.raises(ValueError, match="steps and learning_rate"):
    rd.flax_learner(models.MLPClassifier(hidden=(4,), num_classes=2), steps=0)
