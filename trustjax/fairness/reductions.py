"""In-processing for group fairness: the reductions of Agarwal et al. (2018).

Agarwal, Beygelzimer, Dudik, Langford and Wallach, "A Reductions Approach to Fair
Classification", ICML 2018. Fair classification over a class of classifiers H becomes a saddle
point of the Lagrangian L(Q, lambda) = err(Q) + lambda^T (gamma(Q) - eps) over randomised
classifiers Q (distributions over H) and multipliers lambda >= 0 with ||lambda||_1 <= B, where
gamma holds the constraint's moments (demographic parity: each group's selection rate minus the
overall one, both signs; equalized odds: the same within each label; true or false positive
rate parity: within one label; error-rate parity: each group's error rate minus the overall
one; with `ratio_bound` r, r times the group's minus the overall and r times the overall minus
the group's, which bound their ratio, as fairlearn's `ratio_bound` does). For a fixed lambda
the best classifier is a weighted classification problem (each example
relabelled by the sign of its Lagrangian cost of predicting 1 and weighted by its size), solved
by any `Learner`: a pure pair (fit, predict) over arrays, e.g. `logistic_regression` (jitted
Newton steps) or `flax_learner` (any Flax classifier).

`exponentiated_gradient` (the paper's Algorithm 1) runs exponentiated gradient on lambda
against those best responses. The loop stops when the duality gap of the averaged iterates
falls below nu; the returned mixture is the linear program's best over every classifier found
(the smallest err(Q) + B max(0, max_k gamma_k(Q) - eps)), which is never worse than the average.
Step size eta = eta0 / B and nu = 0.5 sd(|h_0 - y|) / sqrt(n) follow fairlearn's defaults (its
`ExponentiatedGradient`; the tests compare the two with the same learner), and so does the gap
check: Q's side of the gap also takes the learner's responses to 2, 5 and 10 times lambda
while the gap stays below nu, each new classifier joining the linear program. With
`control_features` every constraint holds within each stratum (its cells are (stratum, group)
pairs compared with their stratum).

`grid_search` (the paper's Section 3.4, for few constraints) fits one deterministic classifier
per point of a grid of multipliers and keeps the one with the smallest
(1 - w) err(h) + w max_k gamma_k(h): no randomisation, and no guarantee that the constraint
holds. Its grid is fairlearn's `GridSearch` grid (the tests compare the two).

Everything but the learner runs on the host in float64: the moments are group means and the
loop holds one prediction vector per classifier found. The constraints hold on the training
sample: a learner that can fit that sample without errors meets equalized odds there by itself
(TPR 1 and FPR 0 in every group), and the reduction then leaves it unconstrained.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linprog

from trustjax.fairness import group as group_metrics

CONSTRAINTS = ("demographic_parity", "equalized_odds", "true_positive_rate_parity",
               "false_positive_rate_parity", "error_rate_parity")


class Learner(NamedTuple):
  """A weighted binary classifier as two pure functions: fit(X, labels, weights) -> params
  (labels 0/1 and weights >= 0, both float32 [n]) and predict(params, X) -> 0/1 [n]."""
  fit: Callable
  predict: Callable


def logistic_regression(l2: float = 1.0, steps: int = 15) -> Learner:
  """Weighted L2-regularised logistic regression: minimises
  sum_i w_i log(1 + exp(-(2 y_i - 1)(x_i . beta + b))) + l2 / 2 ||beta||^2 (the intercept b
  unpenalised; scikit-learn's `LogisticRegression` objective with C = 1 / l2) by `steps` Newton
  steps, each taking the best of eight halvings of the full step. Predicts 1 where the logit is
  positive."""
  if not l2 > 0:
    raise ValueError(f"l2 must be positive, got {l2=}")

  def objective(theta, X1, s, w, reg):
    return (w * jax.nn.softplus(-s * (X1 @ theta))).sum() + 0.5 * (reg * theta * theta).sum()

  @jax.jit
  def fit(X, labels, weights):
    X1 = jnp.concatenate([jnp.asarray(X, jnp.float32), jnp.ones((X.shape[0], 1))], axis=1)
    s, w = 2.0 * labels - 1.0, weights
    reg = jnp.full(X1.shape[1], l2).at[-1].set(0.0)
    scales = 0.5 ** jnp.arange(8.0)

    def step(theta, _):
      z = X1 @ theta
      p = jax.nn.sigmoid(-s * z)  # the derivative's weight: d softplus(-s z) / dz = -s p
      grad = X1.T @ (-w * s * p) + reg * theta
      hess = (X1 * (w * p * (1 - p))[:, None]).T @ X1 + jnp.diag(reg + 1e-6)
      d = jnp.linalg.solve(hess, grad)
      values = jax.vmap(lambda a: objective(theta - a * d, X1, s, w, reg))(scales)
      best = jnp.argmin(values)
      keep = values[best] < objective(theta, X1, s, w, reg)
      return jnp.where(keep, theta - scales[best] * d, theta), None

    theta, _ = jax.lax.scan(step, jnp.zeros(X1.shape[1]), None, length=steps)
    return theta

  @jax.jit
  def predict(theta, X):
    return (jnp.asarray(X, jnp.float32) @ theta[:-1] + theta[-1] > 0).astype(jnp.float32)

  return Learner(fit, predict)


def flax_learner(model, *, steps: int = 300, learning_rate: float = 1e-2,
                 seed: int = 0) -> Learner:
  """Any Flax classifier with two output logits as a `Learner`: full-batch Adam on the weighted
  cross-entropy sum_i w_i CE_i / sum_i w_i for `steps` steps from the same initialisation
  (`seed`) every fit, all in one jitted `lax.scan`; predicts the larger logit. Deterministic,
  so the reduction's best responses are reproducible; a non-convex model's best response is
  only as good as its training."""
  import optax  # pylint: disable=import-outside-toplevel

  if steps < 1 or not learning_rate > 0:
    raise ValueError(f"steps and learning_rate must be positive, got {steps=}, "
                     f"{learning_rate=}")
  opt = optax.adam(learning_rate)

  @jax.jit
  def fit(X, labels, weights):
    X = jnp.asarray(X)
    params = model.init(jax.random.PRNGKey(seed), X[:1])["params"]

    def loss(p):
      ce = optax.softmax_cross_entropy_with_integer_labels(
          model.apply({"params": p}, X).astype(jnp.float32), labels.astype(jnp.int32))
      return (weights * ce).sum() / weights.sum()

    def step(carry, _):
      p, state = carry
      updates, state = opt.update(jax.grad(loss)(p), state, p)
      return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return params

  @jax.jit
  def predict(params, X):
    return jnp.argmax(model.apply({"params": params}, jnp.asarray(X)), -1).astype(jnp.float32)

  return Learner(fit, predict)


class _Moments(NamedTuple):
  """The constraint's cells and the reference population each cell's mean utility is compared
  with: demographic parity, groups against everyone; equalized odds, (group, label) against the
  same label; true (false) positive rate parity, the groups' positives (negatives) against all
  positives (negatives); error-rate parity, groups against everyone. Example i's utility is
  offset_i + slope_i h_i (the prediction h_i for the rate constraints; the error
  y_i + (1 - 2 y_i) h_i for error-rate parity), as in Agarwal et al.'s g(X, A, Y, h(X))."""
  cell: np.ndarray  # int [n] each example's cell, -1 where it is in none
  cell_ref: np.ndarray  # int [C] each cell's reference
  ref: np.ndarray  # int [n] each example's reference, -1 where it is in none
  cell_count: np.ndarray  # float [C]
  ref_count: np.ndarray  # float [R]
  names: list  # [C] readable cell names
  offset: np.ndarray  # float [n]
  slope: np.ndarray  # float [n]
  cell_group: np.ndarray  # int [C] each cell's group (an index into the sorted group names)
  ratio: float = 1.0  # r of the ratio form; 1: the difference form

  def gamma(self, h: np.ndarray) -> np.ndarray:
    """[2C]: r times each cell's mean utility minus its reference's, then r times the
    reference's minus the cell's (r = 1: the differences, both signs)."""
    m = self.cell >= 0
    util = (self.offset + self.slope * h)[m]
    cell = np.bincount(self.cell[m], util, len(self.cell_count)) / self.cell_count
    ref = np.bincount(self.ref[m], util, len(self.ref_count)) / self.ref_count
    ref = ref[self.cell_ref]
    return np.concatenate([self.ratio * cell - ref, self.ratio * ref - cell])

  def signed_cost(self, lam: np.ndarray) -> np.ndarray:
    """[n]: d (lambda . gamma(h)) / d h_i, the constraint part of example i's cost of h_i = 1."""
    c, r = len(self.cell_count), self.ratio
    on_cell = r * lam[:c] - lam[c:]  # each cell's multiplier on its own mean
    on_ref = np.bincount(self.cell_ref, r * lam[c:] - lam[:c], len(self.ref_count))
    m = self.cell >= 0
    cell, ref = np.where(m, self.cell, 0), np.where(m, self.ref, 0)
    return np.where(m, self.slope * (on_cell[cell] / self.cell_count[cell]
                                     + on_ref[ref] / self.ref_count[ref]), 0.0)

  def basis(self) -> np.ndarray:
    """int [D]: the cells whose multipliers span every distinct Lagrangian, each reference's
    cells but its last group's (within a reference the multipliers' weighted sum of a shift
    changes nothing, so the last group's can be taken as 0); references first, then groups,
    in sorted order."""
    return np.array([k for r in range(len(self.ref_count))
                     for k in sorted(np.flatnonzero(self.cell_ref == r),
                                     key=lambda k: self.cell_group[k])[:-1]], dtype=int)


def _moments(y: np.ndarray, names: np.ndarray, ids: np.ndarray, constraint: str,
             ratio: float = 1.0, controls: tuple | None = None) -> _Moments:
  """The constraint's cells: (control stratum, group, event) with the event the label for
  equalized odds, else one event (the rows of one label for true/false positive rate parity);
  each cell's reference is its (stratum, event). `controls` is (stratum names, each row's
  stratum) or None (one stratum)."""
  n, k = len(y), len(names)
  label = y.astype(int)
  offset, slope = np.zeros(n), np.ones(n)
  group_names = [str(g) for g in names]
  if constraint == "equalized_odds":
    events, event, suffix = 2, label, lambda e: f", y={e}"
  elif constraint in ("true_positive_rate_parity", "false_positive_rate_parity"):
    v = int(constraint == "true_positive_rate_parity")
    events, event, suffix = 1, np.where(label == v, 0, -1), lambda e: f", y={v}"
  else:
    events, event, suffix = 1, np.zeros(n, int), lambda e: ""
    if constraint == "error_rate_parity":
      offset, slope = y.astype(np.float64), 1.0 - 2.0 * y
  strata, stratum = (np.array([""]), np.zeros(n, int)) if controls is None else controls
  m = event >= 0
  cell = np.where(m, (stratum * k + ids) * events + event, -1)
  ref = np.where(m, stratum * events + event, -1)
  idx = np.arange(len(strata) * k * events)
  cell_ref = (idx // (k * events)) * events + idx % events
  cell_group = (idx // events) % k
  prefix = (lambda c: "") if controls is None else (lambda c: f"{strata[c // (k * events)]}: ")
  cell_names = [f"{prefix(c)}{group_names[cell_group[c]]}{suffix(c % events)}" for c in idx]
  counts = np.bincount(cell[m], minlength=len(idx)).astype(np.float64)
  if (counts == 0).any():
    raise ValueError(f"{constraint} needs examples in every cell; empty: "
                     f"{[cell_names[i] for i in np.flatnonzero(counts == 0)][:10]}")
  return _Moments(cell, cell_ref, ref, counts,
                  np.bincount(ref[m], minlength=len(strata) * events).astype(np.float64),
                  cell_names, offset, slope, cell_group, float(ratio))


def _problem(X, y_true, sensitive_features, constraint: str,
             ratio_bound: float | None = None,
             control_features=None) -> tuple[np.ndarray, _Moments]:
  """Checks a reduction's inputs; returns the labels (float64 [n]) and the moments."""
  if constraint not in CONSTRAINTS:
    raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {constraint=!r}")
  if ratio_bound is not None and not 0 < ratio_bound <= 1:
    raise ValueError(f"ratio_bound must be in (0, 1] (or None), got {ratio_bound=}")
  y, names, ids = group_metrics.labelled_groups(X, y_true, sensitive_features)
  controls = None
  if control_features is not None:
    controls = group_metrics._groups(control_features)  # pylint: disable=protected-access
    if len(controls[1]) != len(y):
      raise ValueError(f"control_features has {len(controls[1])} rows, y_true {len(y)}")
  return y, _moments(y, names, ids, constraint, 1.0 if ratio_bound is None else ratio_bound,
                     controls)


def _cost(y: np.ndarray, mom: _Moments, lam: np.ndarray) -> np.ndarray:
  """[n]: d (err(h) + lambda . gamma(h)) / d h_i, example i's Lagrangian cost of h_i = 1; the
  relabelled problem's label is cost < 0 and its weight |cost|."""
  return (1.0 - 2.0 * y) / len(y) + mom.signed_cost(lam)


def _error(h: np.ndarray, y: np.ndarray) -> float:
  """err(h) for 0/1 predictions or P(y_hat = 1) h."""
  return float(np.mean(np.abs(h - y)))


class ReductionResult(NamedTuple):
  """A randomised classifier: classifier j (params stacked on a leading axis) drawn with
  probability weights[j]."""
  learner: Learner
  params: object  # pytree, leading axis [m]
  weights: np.ndarray  # float64 [m]
  error: float  # err(Q) on the training data
  violation: float  # max_k gamma_k(Q) - eps on the training data (<= 0: satisfied)
  gaps: np.ndarray  # float64 [iterations] the duality gap of the averaged iterates
  lambdas: np.ndarray  # float64 [2C] the final linear program's multipliers
  cells: list  # [C] the constraint's cells


def exponentiated_gradient(learner: Learner, X, y_true, *, sensitive_features,
                           constraint: str = "demographic_parity", eps: float = 0.01,
                           max_iter: int = 50, nu: float | None = None, eta0: float = 2.0,
                           min_iter: int = 5, ratio_bound: float | None = None,
                           control_features=None) -> ReductionResult:
  """Trains a randomised classifier whose `constraint` moments stay within eps on the data.

  Args:
    learner: the weighted classifier class H (`Learner`).
    X: [n, ...] features, passed to the learner as they are.
    y_true: [n] 0/1 labels.
    sensitive_features: [n] each example's group.
    constraint: "demographic_parity" (|P(h=1 | A=a) - P(h=1)| <= eps for each group a),
      "equalized_odds" (the same conditioned on each label), "true_positive_rate_parity" or
      "false_positive_rate_parity" (conditioned on y = 1 or y = 0 only), or
      "error_rate_parity" (|P(h != y | A=a) - P(h != y)| <= eps).
    eps: the allowed violation; the multipliers' bound is B = 1 / eps.
    ratio_bound: r in (0, 1] for the ratio form of the same constraint (fairlearn's
      `ratio_bound`): r m_a - m <= eps and r m - m_a <= eps for each cell's mean m_a and its
      reference's m, i.e. m_a / m within [r, 1 / r] up to the slack eps (fairlearn's
      `ratio_bound_slack`; here positive, as it also sets B). r = 0.8 with demographic
      parity is the "four-fifths rule" against the overall selection rate. None: the
      difference form |m_a - m| <= eps.
    control_features: optional [n] strata (any values, compared as strings): the constraint
      then holds within each stratum, each group's rate against its stratum's (fairlearn's
      `control_features`; e.g. demographic parity conditioned on a qualification). Every
      (stratum, group) cell (and label, for equalized odds) needs examples.
    max_iter: most exponentiated-gradient iterations.
    nu: stop once the duality gap is below nu (after `min_iter` iterations); default
      0.5 sd(|h_0 - y|) / sqrt(n) with h_0 the first best response.
    eta0: the step size is eta0 / B.

  Returns:
    A `ReductionResult`; `reduction_probabilities` gives P(y_hat = 1).

  References:
    Agarwal, Beygelzimer, Dudik, Langford and Wallach, "A Reductions Approach to Fair
    Classification", ICML 2018 (Algorithm 1).
  """
  if not eps > 0:
    raise ValueError(f"eps must be positive, got {eps=}")
  if max_iter < 1 or min_iter < 0:
    raise ValueError(f"max_iter must be >= 1 and min_iter >= 0, got {max_iter=}, {min_iter=}")
  y, mom = _problem(X, y_true, sensitive_features, constraint, ratio_bound, control_features)
  n, bound = len(y), 1.0 / eps
  Xj = jnp.asarray(X)
  hyps, preds, errs, gams = [], [], [], []

  def lagrangian(err, gam, lam):
    return err + lam @ (gam - eps)

  def best_h(lam: np.ndarray) -> int:
    """The index of the best response to lam among the classifiers found (a new fit added if it
    beats them)."""
    cost = _cost(y, mom, lam)
    labels = (cost < 0).astype(np.float32)
    w = np.abs(cost)
    w = (w * n / w.sum() if w.sum() > 0 else np.ones(n)).astype(np.float32)
    params = learner.fit(Xj, jnp.asarray(labels), jnp.asarray(w))
    h = np.asarray(learner.predict(params, Xj), np.float64)
    err, gam = _error(h, y), mom.gamma(h)
    value = lagrangian(err, gam, lam)
    if hyps:
      old = [lagrangian(e, g, lam) for e, g in zip(errs, gams)]
      j = int(np.argmin(old))
      if old[j] <= value + 1e-8:
        return j
    hyps.append(params)
    preds.append(h)
    errs.append(err)
    gams.append(gam)
    return len(hyps) - 1

  def best_mixture():
    """The linear program over the classifiers found: min_Q err(Q) + B xi subject to
    gamma_k(Q) - eps <= xi, xi >= 0; returns Q and the constraints' multipliers (its dual)."""
    m = len(hyps)
    G = np.stack(gams, axis=1)  # [2C, m]
    res = linprog(np.concatenate([errs, [bound]]),
                  A_ub=np.concatenate([G, -np.ones((G.shape[0], 1))], axis=1),
                  b_ub=np.full(G.shape[0], eps),
                  A_eq=np.concatenate([np.ones((1, m)), [[0.0]]], axis=1), b_eq=[1.0],
                  bounds=[(0, None)] * (m + 1), method="highs")
    if res.status != 0:
      raise RuntimeError(f"the linear program over the classifiers failed: {res.message}")
    q = np.clip(res.x[:m], 0.0, None)
    return q / q.sum(), np.clip(-res.ineqlin.marginals, 0.0, None)

  def gap(q: np.ndarray, lam: np.ndarray) -> float:
    """The duality gap of (Q, lambda): how far each is from a best response to the other."""
    h = q @ np.stack(preds)
    err, gam = _error(h, y), mom.gamma(h)
    value = lagrangian(err, gam, lam)
    high = err + bound * max(0.0, float((gam - eps).max()))  # lambda's best response
    # Q's side: the learner's response to lambda and, as fairlearn probes, to larger
    # multiples of it while the gap stays below nu (each new classifier joins the pool).
    low = value
    for mul in (1.0, 2.0, 5.0, 10.0):
      k = best_h(mul * lam)
      low = min(low, lagrangian(errs[k], gams[k], lam))
      if max(value - low, high - value) > nu + 1e-8:
        break
    return max(value - low, high - value)

  theta = np.zeros(2 * len(mom.cell_count))
  counts: dict[int, float] = {}
  lam_sum = np.zeros_like(theta)
  gaps = []
  eta = eta0 / bound
  for t in range(max_iter):
    lam = bound * np.exp(theta) / (1.0 + np.exp(theta).sum())
    lam_sum += lam
    lam_avg = lam_sum / (t + 1)
    j = best_h(lam)
    if t == 0 and nu is None:
      nu = 0.5 * np.std(np.abs(preds[j] - y)) / np.sqrt(n)
    counts[j] = counts.get(j, 0.0) + 1.0
    q = np.zeros(len(hyps))
    q[list(counts)] = list(counts.values())
    gaps.append(gap(q / q.sum(), lam_avg))  # the averaged iterates (Algorithm 1)
    if t > 0:  # and the saddle point over the classifiers found so far
      gaps[-1] = min(gaps[-1], gap(*best_mixture()))
    if gaps[-1] < nu and t >= min_iter:
      break
    theta = theta + eta * (gams[j] - eps)

  w, lam_lp = best_mixture()  # never worse than the average in err(Q) + B max(0, violation)
  h = w @ np.stack(preds)
  params = jax.tree.map(lambda *a: jnp.stack(a), *hyps)
  return ReductionResult(learner, params, w, _error(h, y),
                         float((mom.gamma(h) - eps).max()), np.asarray(gaps),
                         lam_lp, mom.names)


def reduction_probabilities(result: ReductionResult, X) -> np.ndarray:
  """P(y_hat = 1) of the randomised classifier for each example: float64 [n]."""
  hs = jax.vmap(result.learner.predict, in_axes=(0, None))(result.params, jnp.asarray(X))
  return result.weights @ np.asarray(hs, np.float64)


def _integer_grid(dim: int, size: int) -> tuple[np.ndarray, int]:
  """The first `size` integer points x with ||x||_1 <= m, for the smallest m that has that
  many, in lexicographic order (each coordinate from -m' to m', m' what the earlier ones leave);
  and m. fairlearn's `GridSearch` grid (no forced norm, negative coefficients allowed), started
  from its lower bound on m."""
  def points(d, budget):
    if d == 0:
      yield ()
      return
    for v in range(-budget, budget + 1):
      for rest in points(d - 1, budget - abs(v)):
        yield (v,) + rest

  m = max(0, int(np.floor((size / 2.0 ** dim) ** (1.0 / dim) - 1)))
  while True:
    grid = []
    for p in points(dim, m):
      grid.append(p)
      if len(grid) == size:
        return np.array(grid, dtype=np.float64), m
    m += 1


def _multiplier_grid(mom: _Moments, grid_size: int | None, grid_limit: float) -> np.ndarray:
  if grid_size is not None and grid_size < 1 or not grid_limit > 0:
    raise ValueError(f"grid_size must be >= 1 and grid_limit positive, got {grid_size=}, "
                     f"{grid_limit=}")
  basis = mom.basis()
  if len(basis) == 0:
    raise ValueError(f"the constraint needs at least two groups, got cells {mom.names}")
  coef, m = _integer_grid(len(basis), 2 * len(basis) + 1 if grid_size is None else grid_size)
  coef = coef * (grid_limit / m) if m > 0 else coef
  c = len(mom.cell_count)
  lam = np.zeros((len(coef), 2 * c))
  lam[:, basis] = np.maximum(coef, 0.0)
  lam[:, c + basis] = np.maximum(-coef, 0.0)
  return lam


def multiplier_grid(y_true, *, sensitive_features, constraint: str = "demographic_parity",
                    grid_size: int | None = 10, grid_limit: float = 2.0,
                    control_features=None) -> np.ndarray:
  """float64 [G, 2C]: the multiplier vectors `grid_search` fits at, laid out as its `lambdas`
  (each cell's positive part, then the negative parts). Each is a vector of coefficients on
  the basis cells (each label's groups but the last, in sorted order) with L1 norm at most
  `grid_limit`: the first `grid_size` points, in lexicographic order, of the integer lattice's
  smallest L1 ball that has that many, scaled to `grid_limit` (fairlearn's `GridSearch` grid).
  grid_size=None takes the unit ball's 2D + 1 points (0 and plus or minus grid_limit on each
  of the D basis cells); the union of such grids at several limits is a grid over scales.
  With control_features the basis is each (stratum, label)'s groups but the last."""
  _, mom = _problem(np.zeros(len(np.asarray(y_true).reshape(-1))), y_true, sensitive_features,
                    constraint, control_features=control_features)
  return _multiplier_grid(mom, grid_size, grid_limit)


class GridSearchResult(NamedTuple):
  """One deterministic classifier per grid point and the one selected (`best`)."""
  learner: Learner
  params: list  # [G] each point's fitted params, None where its relabelled data held one class
  constants: np.ndarray  # float64 [G] that one class's prediction there, NaN where fitted
  best: int  # the selected point
  lambdas: np.ndarray  # float64 [G, 2C] the grid of multipliers
  errors: np.ndarray  # float64 [G] err(h) on the training data
  gammas: np.ndarray  # float64 [G, 2C] the moments (each cell's gap, both signs)
  cells: list  # [C] the constraint's cells


def grid_search(learner: Learner, X, y_true, *, sensitive_features,
                constraint: str = "demographic_parity", constraint_weight: float = 0.5,
                grid_size: int | None = 10, grid_limit: float = 2.0,
                grid: np.ndarray | None = None, ratio_bound: float | None = None,
                control_features=None) -> GridSearchResult:
  """Fits one classifier per multiplier vector of a grid and selects the one with the smallest
  (1 - constraint_weight) err(h) + constraint_weight max_k gamma_k(h).

  At each grid point lambda the classifier is the learner's fit of the relabelled problem: each
  example's label is 1 where predicting 1 lowers err(h) + lambda^T gamma(h) and its weight is the
  size of that change times n (fairlearn's unnormalised weights; the same for every point, so
  a regularised learner sees the same data scale as fairlearn's). Where every relabelled example
  has the same label the point's classifier is that constant, unfitted (as fairlearn does).

  Args:
    learner: the weighted classifier class H (`Learner`).
    X, y_true, sensitive_features, constraint: as for `exponentiated_gradient`.
    constraint_weight: w in [0, 1], the selection's weight on the largest moment.
    grid_size: the number of grid points (fairlearn's default 10); None: 0 and plus or minus
      grid_limit on each basis cell (`multiplier_grid`).
    grid_limit: the largest L1 norm of a point's basis coefficients.
    grid: optional float [G, 2C] multipliers to use instead, laid out as the result's `lambdas`
      (each cell's positive part in `cells` order, then the negative parts), e.g. several
      `multiplier_grid`s stacked.
    ratio_bound: the ratio form's r (as for `exponentiated_gradient`): the moments become
      r m_a - m and r m - m_a, in the relabelling and in the selection; the grid is the same
      (fairlearn's, whose basis leaves out each label's last group for either form).
    control_features: strata within which the constraint holds (as for
      `exponentiated_gradient`).

  Returns:
    A `GridSearchResult`; `grid_search_predict` gives the selected classifier's predictions.

  References:
    Agarwal, Beygelzimer, Dudik, Langford and Wallach, "A Reductions Approach to Fair
    Classification", ICML 2018 (Section 3.4).
  """
  if not 0.0 <= constraint_weight <= 1.0:
    raise ValueError(f"constraint_weight must be in [0, 1], got {constraint_weight=}")
  y, mom = _problem(X, y_true, sensitive_features, constraint, ratio_bound, control_features)
  n = len(y)
  if grid is None:
    lambdas = _multiplier_grid(mom, grid_size, grid_limit)
  else:
    lambdas = np.asarray(grid, np.float64)
    if lambdas.ndim != 2 or lambdas.shape[1] != 2 * len(mom.cell_count) or (lambdas < 0).any():
      raise ValueError(f"grid must be non-negative with shape [G, {2 * len(mom.cell_count)}], "
                       f"got shape {lambdas.shape}")
  Xj = jnp.asarray(X)
  params, constants, errors, gammas = [], [], [], []
  for lam in lambdas:
    cost = _cost(y, mom, lam)
    labels = (cost < 0).astype(np.float32)
    if labels.min() == labels.max():
      params.append(None)
      constants.append(float(labels[0]))
      h = np.full(n, float(labels[0]))
    else:
      p = learner.fit(Xj, jnp.asarray(labels), jnp.asarray(np.abs(cost) * n, jnp.float32))
      params.append(p)
      constants.append(np.nan)
      h = np.asarray(learner.predict(p, Xj), np.float64)
    errors.append(_error(h, y))
    gammas.append(mom.gamma(h))
  errors, gammas = np.asarray(errors), np.stack(gammas)
  losses = (1.0 - constraint_weight) * errors + constraint_weight * gammas.max(axis=1)
  return GridSearchResult(learner, params, np.asarray(constants), int(np.argmin(losses)),
                          lambdas, errors, gammas, mom.names)


def grid_search_predict(result: GridSearchResult, X, index: int | None = None) -> np.ndarray:
  """0/1 predictions (float64 [n]) of the selected classifier, or of grid point `index`."""
  i = result.best if index is None else index
  if not 0 <= i < len(result.params):
    raise ValueError(f"index must be in [0, {len(result.params)}), got {index=}")
  if result.params[i] is None:
    return np.full(len(X), result.constants[i])
  return np.asarray(result.learner.predict(result.params[i], jnp.asarray(X)), np.float64)
