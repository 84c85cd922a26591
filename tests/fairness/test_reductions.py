"""The reductions of Agarwal et al. (2018): exponentiated gradient and grid search against
fairlearn's ExponentiatedGradient and GridSearch with the same learner, for every constraint;
the moments against float64 loops and their Lagrangian costs against finite differences; the
constraint exponentiated gradient guarantees; fairlearn's grid against a brute-force
enumeration."""

import warnings

import jax
import numpy as np
import pytest

from trustjax.fairness import group, reductions as rd


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


def _loop_means(y, groups, h, constraint):
  """By a float64 loop over the cells: each cell's mean utility (the prediction, or for
  error-rate parity the error |h - y|) and its reference population's."""
  util = np.abs(h - y) if constraint == "error_rate_parity" else h
  labels = {"equalized_odds": (0, 1), "true_positive_rate_parity": (1,),
            "false_positive_rate_parity": (0,)}.get(constraint)
  cell, ref_mean = [], []
  for v in sorted(set(groups)):
    for ref in ([np.ones(len(y), bool)] if labels is None else [y == lab for lab in labels]):
      cell.append(util[ref & (groups == v)].mean())
      ref_mean.append(util[ref].mean())
  return np.array(cell), np.array(ref_mean)


def _loop_moments(y, groups, h, constraint):
  """gamma's first half by the loop: each cell's mean minus its reference's."""
  cell, ref = _loop_means(y, groups, h, constraint)
  return cell - ref


def _loop_ratio_moments(y, groups, h, constraint, ratio):
  """The ratio form's gamma by the loop: r m_a - m, then r m - m_a."""
  cell, ref = _loop_means(y, groups, h, constraint)
  return np.concatenate([ratio * cell - ref, ratio * ref - cell])


@pytest.mark.parametrize("ratio", [None, 0.8])
@pytest.mark.parametrize("constraint", rd.CONSTRAINTS)
def test_the_best_response_costs_are_the_lagrangians_derivative(constraint, ratio):
  rng = np.random.default_rng(2)
  n = 60
  y = rng.integers(0, 2, n).astype(float)
  groups = rng.choice(np.array(["a", "b", "c"]), n)
  _, mom = rd._problem(np.zeros(n), y, groups, constraint,  # pylint: disable=protected-access
                       ratio)
  lam = rng.random(2 * len(mom.cell_count))
  for h in (rng.random(n), rng.integers(0, 2, n).astype(float)):
    want = _loop_ratio_moments(y, groups, h, constraint, ratio or 1.0)
    np.testing.assert_allclose(mom.gamma(h), want, atol=1e-12)
  e = np.eye(n)
  diff = np.array([lam @ (mom.gamma(h + e[i]) - mom.gamma(h)) for i in range(n)])
  np.testing.assert_allclose(mom.signed_cost(lam), diff, atol=1e-12)


_FAIRLEARN_MOMENTS = {"demographic_parity": "DemographicParity",
                      "equalized_odds": "EqualizedOdds",
                      "true_positive_rate_parity": "TruePositiveRateParity",
                      "false_positive_rate_parity": "FalsePositiveRateParity",
                      "error_rate_parity": "ErrorRateParity"}


def _moment(constraint, eps, ratio=None):
  import fairlearn.reductions  # pylint: disable=import-outside-toplevel
  cls = getattr(fairlearn.reductions, _FAIRLEARN_MOMENTS[constraint])
  return cls(difference_bound=eps) if ratio is None else cls(ratio_bound=ratio,
                                                             ratio_bound_slack=eps)


def _fairlearn(X, y, g, constraint, eps, l2, ratio=None):
  from fairlearn.reductions import ExponentiatedGradient  # pylint: disable=import-outside-toplevel
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel

  eg = ExponentiatedGradient(LogisticRegression(C=1 / l2, tol=1e-10, max_iter=10000),
                             _moment(constraint, eps, ratio), eps=eps)
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
  error = lambda p: np.mean(np.where(y == 1, 1 - p, p))
  gap = lambda p: np.abs(_loop_moments(y, g, p, constraint)).max()
  assert error(prob) == pytest.approx(error(ref), abs=1e-4)
  assert gap(prob) == pytest.approx(gap(ref), abs=1e-4)
  if constraint != "error_rate_parity":  # (there the two linear programs' optima differ in the
    # mixture, at the same error and gap)
    assert np.mean(np.abs(prob - ref) > 1e-3) < 0.01  # the same randomised classifier, bar a
    # few points the two solvers' coefficients put on different sides of the boundary
  assert res.error == pytest.approx(error(prob), abs=1e-6)
  # The constraint holds: every cell's mean within eps of its reference (a float64 loop) ...
  assert gap(prob) <= 0.01 + 1e-9
  assert res.violation <= 1e-9 and res.gaps[-1] < res.gaps[0]
  # ... which the unconstrained learner breaks, at a lower error.
  lr = rd.logistic_regression(l2=1.0)
  plain = np.asarray(lr.predict(lr.fit(X, y.astype(np.float32), np.ones(len(y), np.float32)), X))
  assert gap(plain) > 2 * 0.01 and error(plain) < error(prob)


@pytest.mark.parametrize("constraint", rd.CONSTRAINTS)
def test_the_ratio_form_holds_and_matches_fairlearns_error(constraint):
  """ratio_bound r = 0.95 (binding for every constraint on this data): r m_a - m and r m - m_a
  within eps for every cell (a float64 loop), at fairlearn's error (its ratio_bound with slack
  eps) within 2e-3. Unlike the difference form the two mixtures differ on more than a few
  points: the two loops find different classifiers (they differ in that fairlearn shrinks its
  step when the gap stalls and returns the iterate with the best gap, ours the linear program
  over every classifier found; which of these matters here was not isolated)."""
  X, y, g = _data()
  r, eps = 0.95, 0.01
  res = rd.exponentiated_gradient(rd.logistic_regression(l2=1.0), X, y, sensitive_features=g,
                                  constraint=constraint, eps=eps, ratio_bound=r)
  prob = rd.reduction_probabilities(res, X)
  ref = _fairlearn(X, y, g, constraint, eps, 1.0, ratio=r)
  error = lambda p: np.mean(np.where(y == 1, 1 - p, p))
  worst = lambda p: _loop_ratio_moments(y, g, p, constraint, r).max()
  assert error(prob) == pytest.approx(error(ref), abs=2e-3)
  assert worst(prob) <= eps + 1e-9 and worst(ref) <= eps + 1e-9
  assert res.violation == pytest.approx(worst(prob) - eps, abs=1e-9) and res.error == \
      pytest.approx(error(prob), abs=1e-6)
  lr = rd.logistic_regression(l2=1.0)
  plain = np.asarray(lr.predict(lr.fit(X, y.astype(np.float32), np.ones(len(y), np.float32)), X))
  assert worst(plain) > 2 * eps and error(plain) < error(prob)
  # The four-fifths rule (r = 0.8) for demographic parity, read off a loop over the groups'
  # expected selection rates: each within [0.8, 1 / 0.8] of the overall rate up to the slack.
  if constraint == "demographic_parity":
    res8 = rd.exponentiated_gradient(rd.logistic_regression(l2=1.0), X, y, sensitive_features=g,
                                     eps=eps, ratio_bound=0.8)
    p8 = rd.reduction_probabilities(res8, X)
    rates = np.array([p8[g == v].mean() for v in "abc"])
    assert (rates / p8.mean() >= 0.8 - eps / p8.mean() - 1e-9).all()
    assert (p8.mean() / rates >= 0.8 - eps / rates - 1e-9).all()
    assert rates.min() / p8.mean() < 0.85  # (binding: a group near the bound)


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
    ({"ratio_bound": 1.2}, r"ratio_bound must be in \(0, 1\]"),
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


def _first_rows_in_order(X, y, g):
  """The rows reordered so that the groups first appear as a, b, c and the first label is 0:
  fairlearn's grid basis follows the order of first appearance (groups and labels), ours the
  sorted order."""
  first = [int(np.flatnonzero((g == v) & (y == (0 if v == "a" else y[g == v][0])))[0])
           for v in "abc"]
  order = np.concatenate([first, np.setdiff1d(np.arange(len(y)), first)])
  return X[order], y[order], g[order]


@pytest.mark.parametrize("ratio", [None, 0.8])
@pytest.mark.parametrize("constraint", rd.CONSTRAINTS)
def test_grid_search_matches_fairlearns_with_the_same_learner(constraint, ratio):
  from fairlearn.reductions import GridSearch  # pylint: disable=import-outside-toplevel
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel

  X, y, g = _first_rows_in_order(*_data(6))
  res = rd.grid_search(rd.logistic_regression(l2=1.0), X, y, sensitive_features=g,
                       constraint=constraint, grid_size=12, ratio_bound=ratio)
  gs = GridSearch(LogisticRegression(C=1.0, tol=1e-10, max_iter=10000),
                  _moment(constraint, 0.01, ratio), grid_size=12)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    gs.fit(X, y, sensitive_features=g)
  # fairlearn indexes each multiplier by (sign, event, group); ours by sign, then cell.
  cols = []
  for sign, event, grp in gs.lambda_vecs_.index:
    name = grp if event == "all" else f"{grp}, y={event.split('=')[1]}"
    cols.append(("+-".index(sign)) * len(res.cells) + res.cells.index(name))
  theirs = np.zeros_like(res.lambdas)
  theirs[:, cols] = gs.lambda_vecs_.to_numpy().T
  np.testing.assert_array_equal(res.lambdas, theirs)  # the same grid, point for point
  assert res.best == gs.best_idx_
  # Each point's error and largest moment (a boundary point or two may differ: float32 Newton
  # against scikit-learn's float64 solver).
  np.testing.assert_allclose(res.errors, gs.objectives_, atol=1.5e-3)
  np.testing.assert_allclose(res.gammas.max(1), gs.gammas_.max().to_numpy(), atol=1.5e-3)
  # ... and ours against the float64 loop of the selected classifier's moments.
  h = rd.grid_search_predict(res, X)
  want = _loop_ratio_moments(y, g, h, constraint, ratio or 1.0)
  np.testing.assert_allclose(res.gammas[res.best], want, atol=1e-12)
  assert res.errors[res.best] == pytest.approx(np.mean(h != y), abs=1e-12)
  # Where the grid holds lambda = 0, that point is the unconstrained fit (weights 1, labels y).
  for zero in np.flatnonzero(~res.lambdas.any(axis=1)):
    lr = rd.logistic_regression(l2=1.0)
    plain = lr.predict(lr.fit(X, y.astype(np.float32), np.ones(len(y), np.float32)), X)
    np.testing.assert_array_equal(rd.grid_search_predict(res, X, int(zero)), plain)


def test_the_grid_is_the_smallest_l1_ball_with_enough_points():
  import itertools  # pylint: disable=import-outside-toplevel

  for dim, size in ((1, 3), (2, 10), (2, 13), (3, 20), (4, 7)):
    grid, m = rd._integer_grid(dim, size)  # pylint: disable=protected-access
    ball = lambda r: sorted(p for p in itertools.product(range(-r, r + 1), repeat=dim)
                            if sum(map(abs, p)) <= r)
    assert len(ball(m)) >= size and (m == 0 or len(ball(m - 1)) < size)
    assert [tuple(p) for p in grid.astype(int)] == ball(m)[:size]  # lexicographic order


def test_grid_search_constant_points_and_bad_input():
  X = np.random.default_rng(7).normal(size=(8, 2)).astype(np.float32)
  g = np.array(["x", "y"] * 4)
  # All labels 1 and lambda = 0: every relabelled example says 1, so the point is that constant.
  res = rd.grid_search(rd.logistic_regression(), X, np.ones(8), sensitive_features=g,
                       grid=np.zeros((1, 4)))
  assert res.params == [None] and res.constants[0] == 1.0 and res.errors[0] == 0.0
  np.testing.assert_array_equal(rd.grid_search_predict(res, X), np.ones(8))
  y = np.array([0, 1] * 4)
  for kw, message in [({"constraint_weight": 1.5}, "constraint_weight must be in"),
                      ({"grid_size": 0}, "grid_size must be"),
                      ({"grid": -np.ones((2, 4))},
                       r"grid must be non-negative with shape \[G, 4\]"),
                      ({"grid": np.zeros((2, 3))}, "got shape"),
                      ({"sensitive_features": np.array(["x"] * 8)}, "needs at least two groups")]:
    with pytest.raises(ValueError, match=message):
      rd.grid_search(rd.logistic_regression(), X, y, **{"sensitive_features": g, **kw})
  with pytest.raises(ValueError, match="index must be in"):
    rd.grid_search_predict(res, X, index=3)


def test_multiplier_grid_unit_balls_and_scales():
  X, y, g = _data(8, n=300)
  for constraint, basis in (("demographic_parity", 2), ("equalized_odds", 4)):
    grid = rd.multiplier_grid(y, sensitive_features=g, constraint=constraint, grid_size=None,
                              grid_limit=0.5)
    c = grid.shape[1] // 2
    signed = grid[:, :c] - grid[:, c:]
    # 0 and +-0.5 on each basis cell (each label's groups but the last, "c"): 2D + 1 points
    assert grid.shape[0] == 2 * basis + 1 and (grid >= 0).all()
    assert sorted(np.abs(signed).sum(1).tolist()) == [0.0] + [0.5] * (2 * basis)
    assert (np.count_nonzero(signed, axis=1) <= 1).all() and not (grid[:, :c] * grid[:, c:]).any()
    last = [i for i, name in enumerate(rd._moments(  # pylint: disable=protected-access
        y.astype(float), *group._groups(g), constraint).names) if name.startswith("c")]
    assert not signed[:, last].any()
    # grid_search on that grid fits exactly those points
    res = rd.grid_search(rd.logistic_regression(), X, y, sensitive_features=g,
                         constraint=constraint, grid=grid)
    np.testing.assert_array_equal(res.lambdas, grid)
    with pytest.raises(ValueError, match="grid_limit positive"):
      rd.multiplier_grid(y, sensitive_features=g, constraint=constraint, grid_limit=0.0)


def _loop_control_moments(y, groups, strata, h, constraint):
  """gamma's first half with control strata, by a float64 loop: each (stratum, group[, label])
  cell's mean utility minus its (stratum[, label])'s, strata and groups in sorted order."""
  util = np.abs(h - y) if constraint == "error_rate_parity" else h
  labels = {"equalized_odds": (0, 1), "true_positive_rate_parity": (1,),
            "false_positive_rate_parity": (0,)}.get(constraint)
  out = []
  for s in sorted(set(strata)):
    for v in sorted(set(groups)):
      for ref in ([strata == s] if labels is None else [(strata == s) & (y == lab)
                                                        for lab in labels]):
        out.append(util[ref & (groups == v)].mean() - util[ref].mean())
  return np.array(out)


@pytest.mark.parametrize("constraint", rd.CONSTRAINTS)
def test_control_features_stratify_every_constraint(constraint):
  """With control strata each cell is compared with its stratum: the moments against a float64
  loop, the costs against finite differences; exponentiated gradient meets the constraint in
  every stratum and, for the constraints where fairlearn's moment is the same one, reaches
  fairlearn's error (its ExponentiatedGradient with the same control_features) within 1e-3."""
  X, y, g = _data()
  strata = np.where(X[:, 1] > 0, "high", "low")
  rng = np.random.default_rng(3)
  _, mom = rd._problem(X, y, g, constraint,  # pylint: disable=protected-access
                       control_features=strata)
  h = rng.random(len(y))
  want = _loop_control_moments(y, g, strata, h, constraint)
  np.testing.assert_allclose(mom.gamma(h), np.concatenate([want, -want]), atol=1e-12)
  assert mom.names[0].startswith("high: a")
  lam = rng.random(2 * len(mom.cell_count))
  e = np.eye(len(y))[:40]
  diff = np.array([lam @ (mom.gamma(h + e[i]) - mom.gamma(h)) for i in range(40)])
  np.testing.assert_allclose(mom.signed_cost(lam)[:40], diff, atol=1e-12)

  res = rd.exponentiated_gradient(rd.logistic_regression(l2=1.0), X, y, sensitive_features=g,
                                  constraint=constraint, control_features=strata)
  prob = rd.reduction_probabilities(res, X)
  assert np.abs(_loop_control_moments(y, g, strata, prob, constraint)).max() <= 0.01 + 1e-9
  plain = _loop_control_moments(y, g, strata, _unconstrained(X, y), constraint)
  assert np.abs(plain).max() > 0.02  # (binding)
  if constraint in ("true_positive_rate_parity", "false_positive_rate_parity"):
    # fairlearn 0.15 merges the control into every row's event, so the rows of the other
    # label (its event NaN) become events of their own: with control features its TPR and
    # FPR parity constrain both labels, i.e. they are its equalized odds.
    m = _moment(constraint, 0.01)
    m.load_data(X, y, sensitive_features=g, control_features=strata)
    assert "control=high,nan" in set(m.index.get_level_values(1))
    return
  from fairlearn.reductions import ExponentiatedGradient  # pylint: disable=import-outside-toplevel
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel
  eg = ExponentiatedGradient(LogisticRegression(C=1.0, tol=1e-10, max_iter=10000),
                             _moment(constraint, 0.01), eps=0.01)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    eg.fit(X, y, sensitive_features=g, control_features=strata)
  ref = eg._pmf_predict(X)[:, 1]  # pylint: disable=protected-access
  error = lambda p: np.mean(np.where(y == 1, 1 - p, p))
  assert error(prob) == pytest.approx(error(ref), abs=1e-3)


def _unconstrained(X, y):
  lr = rd.logistic_regression(l2=1.0)
  return np.asarray(lr.predict(lr.fit(X, y.astype(np.float32), np.ones(len(y), np.float32)), X),
                    np.float64)


def test_grid_search_with_control_features():
  """Demographic parity within two strata: the grid's basis is each stratum's groups but the last
  (fairlearn's rule; its GridSearch itself does not take control features), and every point's
  error and moments equal a float64 loop over its predictions."""
  X, y, g = _data(6, n=600)
  strata = np.where(X[:, 1] > 0, "high", "low")
  grid = rd.multiplier_grid(y, sensitive_features=g, control_features=strata, grid_size=None,
                            grid_limit=1.0)
  res = rd.grid_search(rd.logistic_regression(l2=1.0), X, y, sensitive_features=g,
                       control_features=strata, grid=grid)
  assert res.cells == ["high: a", "high: b", "high: c", "low: a", "low: b", "low: c"]
  assert grid.shape == (2 * 4 + 1, 12)  # 0 and +-1 on each of 2 strata x (3 - 1) groups
  assert not grid[:, [2, 5, 8, 11]].any()  # each stratum's last group: no multiplier
  for i in range(len(grid)):
    h = rd.grid_search_predict(res, X, i)
    want = _loop_control_moments(y, g, strata, h, "demographic_parity")
    np.testing.assert_allclose(res.gammas[i], np.concatenate([want, -want]), atol=1e-12)
    assert res.errors[i] == pytest.approx(np.mean(h != y), abs=1e-12)
  losses = 0.5 * res.errors + 0.5 * res.gammas.max(axis=1)
  assert res.best == int(np.argmin(losses))
  with pytest.raises(ValueError, match="control_features has 3 rows"):
    rd.grid_search(rd.logistic_regression(), X, y, sensitive_features=g,
                   control_features=strata[:3])
