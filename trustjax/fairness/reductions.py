"""In-processing for group fairness: the exponentiated-gradient reduction.

Agarwal, Beygelzimer, Dudik, Langford and Wallach, "A Reductions Approach to Fair
Classification", ICML 2018. Fair classification over a class of classifiers H becomes a saddle
point of the Lagrangian L(Q, lambda) = err(Q) + lambda^T (gamma(Q) - eps) over randomised
classifiers Q (distributions over H) and multipliers lambda >= 0 with ||lambda||_1 <= B, where
gamma holds the constraint's moments (demographic parity: each group's selection rate minus the
overall one, both signs; equalized odds: the same within each label). The lambda-player runs
exponentiated gradient; the Q-player best-responds, which is a weighted classification problem
(each example relabelled by the sign of its Lagrangian cost of predicting 1 and weighted by its
size), solved by any `Learner`: a pure pair (fit, predict) over arrays, e.g.
`logistic_regression` (jitted Newton steps) or `flax_learner` (any Flax classifier). The loop
stops when the duality gap of the averaged iterates falls below nu; the returned mixture is the linear program's best over every classifier
found (the smallest err(Q) + B max(0, max_k gamma_k(Q) - eps)), which is never worse than the
average. Step size eta = eta0 / B and nu = 0.5 sd(|h_0 - y|) / sqrt(n) follow fairlearn's
defaults (its `ExponentiatedGradient`; the tests compare the two with the same learner).

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

CONSTRAINTS = ("demographic_parity", "equalized_odds")


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
  """The constraint's cells (DP: groups; EO: (group, label)) and the reference population each
  cell's rate is compared with (DP: everyone; EO: the same label)."""
  cell: np.ndarray  # int [n] each example's cell
  cell_ref: np.ndarray  # int [C] each cell's reference
  ref: np.ndarray  # int [n] each example's reference
  cell_count: np.ndarray  # float [C]
  ref_count: np.ndarray  # float [R]
  names: list  # [C] readable cell names

  def gamma(self, h: np.ndarray) -> np.ndarray:
    """[2C]: each cell's rate minus its reference's, then the negatives."""
    cell = np.bincount(self.cell, h, len(self.cell_count)) / self.cell_count
    ref = np.bincount(self.ref, h, len(self.ref_count)) / self.ref_count
    g = cell - ref[self.cell_ref]
    return np.concatenate([g, -g])

  def signed_cost(self, lam: np.ndarray) -> np.ndarray:
    """[n]: d (lambda . gamma(h)) / d h_i, the constraint part of example i's cost of h_i = 1."""
    c = len(self.cell_count)
    net = lam[:c] - lam[c:]
    per_ref = np.bincount(self.cell_ref, net, len(self.ref_count)) / self.ref_count
    return net[self.cell] / self.cell_count[self.cell] - per_ref[self.ref]


def _moments(y: np.ndarray, names: np.ndarray, ids: np.ndarray, constraint: str) -> _Moments:
  n = len(y)
  if constraint == "demographic_parity":
    cell, cell_ref, ref = ids, np.zeros(len(names), int), np.zeros(n, int)
    cell_names = [str(g) for g in names]
  else:
    cell, cell_ref, ref = 2 * ids + y.astype(int), np.tile([0, 1], len(names)), y.astype(int)
    cell_names = [f"{g}, y={label}" for g in names for label in (0, 1)]
  counts = np.bincount(cell, minlength=len(cell_ref)).astype(np.float64)
  if (counts == 0).any():
    raise ValueError(f"{constraint} needs examples in every cell; empty: "
                     f"{[cell_names[i] for i in np.flatnonzero(counts == 0)][:10]}")
  return _Moments(cell, cell_ref, ref, counts,
                  np.bincount(ref, minlength=cell_ref.max() + 1).astype(np.float64), cell_names)


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
                           min_iter: int = 5) -> ReductionResult:
  """Trains a randomised classifier whose `constraint` moments stay within eps on the data.

  Args:
    learner: the weighted classifier class H (`Learner`).
    X: [n, ...] features, passed to the learner as they are.
    y_true: [n] 0/1 labels.
    sensitive_features: [n] each example's group.
    constraint: "demographic_parity" (|P(h=1 | A=a) - P(h=1)| <= eps for each group a) or
      "equalized_odds" (the same conditioned on each label).
    eps: the allowed violation; the multipliers' bound is B = 1 / eps.
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
  if constraint not in CONSTRAINTS:
    raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {constraint=!r}")
  if not eps > 0:
    raise ValueError(f"eps must be positive, got {eps=}")
  if max_iter < 1 or min_iter < 0:
    raise ValueError(f"max_iter must be >= 1 and min_iter >= 0, got {max_iter=}, {min_iter=}")
  y = np.asarray(y_true).reshape(-1)
  if not np.isin(y, (0, 1)).all():
    raise ValueError("y_true must hold 0/1 labels")
  names, ids = group_metrics._groups(sensitive_features)  # pylint: disable=protected-access
  if not len(y) == len(ids) == len(X):
    raise ValueError(f"X, y_true and sensitive_features differ in length: {len(X)}, {len(y)}, "
                     f"{len(ids)}")
  y = y.astype(np.float64)
  n, bound = len(y), 1.0 / eps
  mom = _moments(y, names, ids, constraint)
  Xj = jnp.asarray(X)
  base_cost = (1.0 - 2.0 * y) / n  # d err(h) / d h_i
  hyps, preds, errs, gams = [], [], [], []

  def lagrangian(err, gam, lam):
    return err + lam @ (gam - eps)

  def error(h: np.ndarray) -> float:  # err(h) for predictions or P(y_hat = 1) h
    return float(np.mean(np.abs(h - y)))

  def best_h(lam: np.ndarray) -> int:
    """The index of the best response to lam among the classifiers found (a new fit added if it
    beats them)."""
    cost = base_cost + mom.signed_cost(lam)
    labels = (cost < 0).astype(np.float32)
    w = np.abs(cost)
    w = (w * n / w.sum() if w.sum() > 0 else np.ones(n)).astype(np.float32)
    params = learner.fit(Xj, jnp.asarray(labels), jnp.asarray(w))
    h = np.asarray(learner.predict(params, Xj), np.float64)
    err, gam = error(h), mom.gamma(h)
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
    err, gam = error(h), mom.gamma(h)
    value = lagrangian(err, gam, lam)
    high = err + bound * max(0.0, float((gam - eps).max()))  # lambda's best response
    k = best_h(lam)
    return max(value - lagrangian(errs[k], gams[k], lam), high - value)  # and Q's

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
  return ReductionResult(learner, params, w, error(h),
                         float((mom.gamma(h) - eps).max()), np.asarray(gaps),
                         lam_lp, mom.names)


def reduction_probabilities(result: ReductionResult, X) -> np.ndarray:
  """P(y_hat = 1) of the randomised classifier for each example: float64 [n]."""
  hs = jax.vmap(result.learner.predict, in_axes=(0, None))(result.params, jnp.asarray(X))
  return result.weights @ np.asarray(hs, np.float64)
