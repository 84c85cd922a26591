"""Post-processing for group fairness: per-group randomised thresholds on a fixed score.

Hardt, Price and Srebro, "Equality of Opportunity in Supervised Learning", NeurIPS 2016: given
a trained model's scores and each example's group, choose for every group a (possibly
randomised) threshold rule so that a group-rate constraint holds exactly on the fitting data
while accuracy is as high as such rules allow. For each group, every threshold between two of
its distinct scores gives a point (constraint metric x, objective y) (for equalized odds
(FPR, TPR), the ROC curve); randomising between two thresholds reaches any point on the segment
between them, so the attainable set is the upper convex hull of those points.

- Single-rate constraints (`demographic_parity`: equal selection rates; `true_positive_rate_parity`
  and the other rate parities): on a grid of common values x, the objective summed over groups
  (weighted by group size) is maximised; each group then mixes the two hull vertices around x.
- `equalized_odds` (equal TPR and FPR): at each grid FPR x every group can reach the lowest of
  the groups' hull TPRs, by mixing its hull point with the constant prediction "1 with
  probability x" (the ROC diagonal, also at FPR x); the x with the best objective is chosen.

The fitted `ThresholdRule` is data (arrays per group); `threshold_probabilities` gives each
example's P(y_hat = 1) and `threshold_predict` draws the randomised predictions. The rule and its
probabilities equal fairlearn's `ThresholdOptimizer` (same threshold operations, grid and tie
conventions; tested). By default larger scores mean more positive (fairlearn's `flip=False`);
`flip=True` also offers each group the reversed rule "1 iff score < t" (its points reflected
through the centre of the trade-off plane, so a score that ranks a group backwards is still
used); `tol` relaxes a single-rate constraint to rates at most tol apart, as fairlearn's does.
The fitting runs on the host in float64 (a sort per group and one pass along the hull);
prediction compares with the thresholds in float64 too, so that a midpoint between two float32
scores is not rounded onto one of them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from trustjax.fairness import group as group_metrics

# Each single-rate constraint equalises one rate across groups.
_RATE_OF_CONSTRAINT = {
    "demographic_parity": "selection_rate",
    "true_positive_rate_parity": "true_positive_rate",
    "false_positive_rate_parity": "false_positive_rate",
    "true_negative_rate_parity": "true_negative_rate",
    "false_negative_rate_parity": "false_negative_rate",
}
CONSTRAINTS = tuple(_RATE_OF_CONSTRAINT) + ("equalized_odds",)
OBJECTIVES = ("accuracy", "balanced_accuracy", "selection_rate", "true_positive_rate",
              "true_negative_rate")
# Equalized odds needs an objective that does not fall as the true positive rate rises at a
# fixed false positive rate (the common TPR is the groups' lowest).
EQUALIZED_ODDS_OBJECTIVES = ("accuracy", "balanced_accuracy")
# The counts each rate divides by: a group without positives (negatives) has no such rate.
_NEEDS_POSITIVES = ("true_positive_rate", "false_negative_rate", "balanced_accuracy")
_NEEDS_NEGATIVES = ("false_positive_rate", "true_negative_rate", "balanced_accuracy")


class ThresholdRule(NamedTuple):
  """Per-group randomised threshold rule (`fit_thresholds`). Row g is group `groups[g]`; an
  example of that group with score s is predicted 1 with probability
  (1 - p_ignore[g]) * (weights[g, 0] [s > thresholds[g, 0]] + weights[g, 1] [s > thresholds[g, 1]])
  + p_ignore[g] * constant, where [s > t] reads [s < t] for the operations that `flips` marks.
  """
  groups: np.ndarray  # str [G], the sensitive-feature values (as strings), sorted
  thresholds: np.ndarray  # float64 [G, 2]; +inf predicts no one, -inf everyone
  weights: np.ndarray  # float64 [G, 2], each row sums to 1
  p_ignore: np.ndarray  # float64 [G], the share given to the constant prediction
  constant: float  # P(y_hat = 1) of the constant prediction (equalized odds: the common FPR)
  constraint: str
  objective: str
  value: float  # the equalised rate (equalized odds: the common FPR; with tol the lowest)
  objective_value: float  # the objective on the fitting data, in expectation
  values: np.ndarray | None = None  # float64 [G] each group's rate (all `value` without tol)
  tol: float | None = None  # the allowed spread of the groups' rates (None: exact)
  flips: np.ndarray | None = None  # bool [G, 2] True: "1 iff score < threshold" (None: none)


def _confusion(y: np.ndarray, s: np.ndarray):
  """True and false positives of "predict 1 iff score > t" for t = +inf, the midpoints between
  consecutive distinct scores (descending), and -inf: ([m + 1] each, and the thresholds)."""
  order = np.argsort(-s, kind="stable")
  s, y = s[order], y[order]
  desc, first = np.unique(-s, return_index=True)  # distinct scores, descending; first rows
  desc = -desc
  ends = np.concatenate([[0], first[1:], [len(s)]])  # rows above each threshold
  tp = np.concatenate([[0], np.cumsum(y)])[ends]
  fp = ends - tp
  thresholds = np.concatenate([[np.inf], (desc[:-1] + desc[1:]) / 2, [-np.inf]])
  return tp.astype(np.float64), fp.astype(np.float64), thresholds


def _metric(name: str, tp, fp, pos: float, neg: float) -> np.ndarray:
  n = pos + neg
  if name == "selection_rate":
    return (tp + fp) / n
  if name == "true_positive_rate":
    return tp / pos
  if name == "false_positive_rate":
    return fp / neg
  if name == "true_negative_rate":
    return (neg - fp) / neg
  if name == "false_negative_rate":
    return (pos - tp) / pos
  if name == "accuracy":
    return (tp + (neg - fp)) / n
  # balanced_accuracy
  return 0.5 * tp / pos + 0.5 * (neg - fp) / neg


def _upper_hull(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Indices of the upper convex hull of the points (x, y), by increasing x (Andrew's monotone
  chain over the points sorted by x, then y, then position; a point equal to or on the line
  through the last two vertices replaces the last, so of equal points the hull keeps the first
  at its start and the last elsewhere, as fairlearn's chain does; only the start can hold two
  vertices with the same x, and the grid never uses the lower one)."""
  hull: list[int] = []
  for i in np.lexsort((y, x)):
    while len(hull) >= 2:
      a, b = hull[-2], hull[-1]
      if (y[b] - y[a]) * (x[i] - x[a]) <= (y[i] - y[a]) * (x[b] - x[a]):
        hull.pop()
      else:
        break
    hull.append(int(i))
  return np.asarray(hull)


class _Curve(NamedTuple):
  y: np.ndarray  # [grid] the hull's value at each grid x
  lo: np.ndarray  # [grid] the thresholds of the two hull vertices around x
  hi: np.ndarray
  w_lo: np.ndarray  # [grid] the weight of the lower vertex (1 - that of the upper)


def _hull_on_grid(x, y, thresholds, grid) -> _Curve:
  """The upper hull of (x, y) evaluated at each grid value g, with x[i] < g <= x[i + 1] picking
  the segment (g at the first vertex's x: the last vertex there, weight 1 on it). `thresholds`
  may carry any per-point payload along its first axis."""
  h = _upper_hull(x, y)
  hx, hy, ht = x[h], y[h], thresholds[h]
  i = np.searchsorted(hx, grid, side="right") - 1
  i[1:] -= grid[1:] == hx[i[1:]]
  i = np.clip(i, 0, len(hx) - 2)
  w_lo = (hx[i + 1] - grid) / (hx[i + 1] - hx[i])
  return _Curve(w_lo * hy[i] + (1 - w_lo) * hy[i + 1], ht[i], ht[i + 1], w_lo)


def _operations(y: np.ndarray, s: np.ndarray, flip: bool):
  """Every threshold operation of one group: its true and false positives and [threshold,
  flipped] rows. With flip, each threshold t of "1 iff score > t" is followed by "1 iff
  score < t" (the complementary predictions), in the order fairlearn lists them."""
  tp, fp, thr = _confusion(y, s)
  ops = np.stack([thr, np.zeros_like(thr)], axis=1)
  if not flip:
    return tp, fp, ops
  pos, neg = tp[-1], fp[-1]  # the threshold -inf selects everyone
  inter = lambda a, b: np.stack([a, b], axis=1).reshape(-1)
  return (inter(tp, pos - tp), inter(fp, neg - fp),
          np.stack([inter(thr, thr), inter(np.zeros_like(thr), np.ones_like(thr))], axis=1))


def _relaxed_choice(grid: np.ndarray, weighted: np.ndarray, tol: float):
  """Per group a grid index, all within a window of width tol on the grid, maximising the sum
  of weighted[g, index_g]: for each window end, each group's best index in the window (ties to
  the larger rate); the best window wins, ties to the smaller spread of rates and then the
  later window (fairlearn's `maximize_objective_with_tolerance` conventions)."""
  best, best_total, best_spread = None, -np.inf, np.inf
  start = 0
  for end in range(len(grid)):
    while grid[end] - grid[start] > tol:
      start += 1
    idx = end - np.argmax(weighted[:, start:end + 1][:, ::-1], axis=1)
    total = sum(float(weighted[g, i]) for g, i in enumerate(idx))  # in group order
    spread = float(np.ptp(grid[idx]))
    if total > best_total or (total == best_total and spread <= best_spread):
      best, best_total, best_spread = idx, total, spread
  return best, best_total


def _check_inputs(y_true, scores, sensitive_features):
  y = np.asarray(y_true).reshape(-1)
  s = np.asarray(scores, np.float64).reshape(-1)
  names, ids = group_metrics._groups(sensitive_features)  # pylint: disable=protected-access
  if not len(y) == len(s) == len(ids):
    raise ValueError(f"y_true, scores and sensitive_features differ in length: {len(y)}, "
                     f"{len(s)}, {len(ids)}")
  if not len(y):
    raise ValueError("no examples")
  if not np.isin(y, (0, 1)).all():
    raise ValueError("y_true must hold 0/1 labels")
  if not np.isfinite(s).all():
    raise ValueError(f"scores must be finite; {int((~np.isfinite(s)).sum())} are not")
  return y.astype(np.float64), s, names, ids


def fit_thresholds(y_true, scores, *, sensitive_features,
                   constraint: str = "demographic_parity", objective: str = "accuracy",
                   grid_size: int = 1000, tol: float | None = None,
                   flip: bool = False) -> ThresholdRule:
  """Fits per-group randomised thresholds that satisfy `constraint` exactly on this data.

  Args:
    y_true: [n] 0/1 labels.
    scores: [n] a trained model's scores, larger = more positive (e.g. P(y = 1)).
    sensitive_features: [n] each example's group (any values; compared as strings).
    constraint: one of `CONSTRAINTS`.
    objective: one of `OBJECTIVES` ("accuracy", "balanced_accuracy", or a rate to maximise:
      "selection_rate", "true_positive_rate", "true_negative_rate"; equalized odds takes the
      first two only). For the single-rate constraints it is taken per group and weighted by
      group size (exact for accuracy and the selection rate; for the others the same
      approximation fairlearn makes); for equalized odds it is that of the pooled data.
    grid_size: the common rate is searched on linspace(0, 1, grid_size + 1).
    tol: relaxes a single-rate constraint: each group takes its own rate on that grid, the
      groups' rates at most tol apart (largest minus smallest), maximising the same objective
      (fairlearn's `ThresholdOptimizer(tol=)`); None or 0 = equal rates. Not for equalized odds.
    flip: also consider, in every group, the reversed rules "1 iff score < t" (fairlearn's
      `flip=True`); where one of them lies on a group's hull, `ThresholdRule.flips` marks it.

  Returns:
    A `ThresholdRule`.

  References:
    Hardt, Price and Srebro, "Equality of Opportunity in Supervised Learning", NeurIPS 2016.
  """
  if constraint not in CONSTRAINTS:
    raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {constraint=!r}")
  if objective not in OBJECTIVES:
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective=!r}")
  if constraint == "equalized_odds" and objective not in EQUALIZED_ODDS_OBJECTIVES:
    raise ValueError(f"equalized_odds takes objective {EQUALIZED_ODDS_OBJECTIVES[0]!r} or "
                     f"{EQUALIZED_ODDS_OBJECTIVES[1]!r}, got {objective=!r}")
  if int(grid_size) != grid_size or grid_size < 1:
    raise ValueError(f"grid_size must be a positive integer, got {grid_size=}")
  if tol is not None and not 0 <= tol <= 1:
    raise ValueError(f"tol must be in [0, 1] (or None), got {tol=}")
  if tol and constraint == "equalized_odds":
    raise ValueError("tol relaxes single-rate constraints only, not equalized_odds")
  y, s, names, ids = _check_inputs(y_true, scores, sensitive_features)
  grid = np.linspace(0.0, 1.0, int(grid_size) + 1)
  x_name = _RATE_OF_CONSTRAINT.get(constraint, "false_positive_rate")
  y_name = objective if constraint != "equalized_odds" else "true_positive_rate"
  needs_pos = x_name in _NEEDS_POSITIVES or y_name in _NEEDS_POSITIVES
  needs_neg = x_name in _NEEDS_NEGATIVES or y_name in _NEEDS_NEGATIVES
  curves, sizes = [], []
  for g, name in enumerate(names):
    yg, sg = y[ids == g], s[ids == g]
    pos, neg = float(yg.sum()), float(len(yg) - yg.sum())
    if (needs_pos and pos == 0) or (needs_neg and neg == 0):
      raise ValueError(f"group {str(name)!r} has only {'negative' if pos == 0 else 'positive'} "
                       f"labels; {constraint} with {objective} needs "
                       f"{'positives' if pos == 0 else 'negatives'} in every group")
    tp, fp, ops = _operations(yg, sg, flip)
    curves.append(_hull_on_grid(_metric(x_name, tp, fp, pos, neg),
                                _metric(y_name, tp, fp, pos, neg), ops, grid))
    sizes.append(len(yg))
  hull_y = np.stack([c.y for c in curves])  # [G, grid]
  if constraint == "equalized_odds":
    pos, neg = float(y.sum()), float(len(y) - y.sum())
    tpr = hull_y.min(axis=0)  # every group can come down to the lowest TPR at that FPR
    tp, fp = pos * tpr, neg * grid
    total = np.around(_metric(objective, tp, fp, pos, neg), 15)
    best = int(np.argmax(total))
    x, y_best = grid[best], tpr[best]
    h = hull_y[:, best]
    # Mix each group's hull point (x, h) with the diagonal point (x, x) to bring its TPR to
    # y_best; both have FPR x.
    p_ignore = np.where(h == x, 0.0, (h - y_best) / np.where(h == x, 1.0, h - x))
    constant = float(x)
  else:
    weighted = np.asarray(sizes, np.float64)[:, None] / len(y) * hull_y
    total = weighted.sum(axis=0)
    best = int(np.argmax(total))
    p_ignore, constant = np.zeros(len(names)), 0.0
  if tol:  # (single-rate constraints only, checked above)
    per_group, objective_value = _relaxed_choice(grid, weighted, tol)
  else:
    per_group, objective_value = np.full(len(names), best), total[best]
  w_lo = np.array([c.w_lo[i] for c, i in zip(curves, per_group)])
  ops = np.array([[c.lo[i], c.hi[i]] for c, i in zip(curves, per_group)])  # [G, 2, 2]
  return ThresholdRule(
      groups=names,
      thresholds=ops[..., 0],
      weights=np.stack([w_lo, 1.0 - w_lo], axis=1),
      p_ignore=p_ignore, constant=constant, constraint=constraint, objective=objective,
      value=float(grid[per_group].min()), objective_value=float(objective_value),
      values=grid[per_group].astype(np.float64), tol=float(tol) if tol else None,
      flips=ops[..., 1] == 1 if flip else None)


def threshold_probabilities(rule: ThresholdRule, scores, *, sensitive_features) -> np.ndarray:
  """P(y_hat = 1) for each example under `rule`: float64 [n]."""
  s = np.asarray(scores, np.float64).reshape(-1)
  g = group_metrics.fitted_group_ids(rule.groups, sensitive_features, "rule")
  if len(g) != len(s):
    raise ValueError(f"scores and sensitive_features differ in length: {len(s)}, {len(g)}")
  above = s[:, None] > rule.thresholds[g]
  if rule.flips is not None:
    above = np.where(rule.flips[g], s[:, None] < rule.thresholds[g], above)
  q = (rule.weights[g] * above).sum(axis=1)
  return (1.0 - rule.p_ignore[g]) * q + rule.p_ignore[g] * rule.constant


def threshold_predict(rule: ThresholdRule, scores, *, sensitive_features,
                      rng: jax.Array | int = 0) -> np.ndarray:
  """The randomised 0/1 predictions of `rule` (one independent draw per example): int [n]."""
  p = threshold_probabilities(rule, scores, sensitive_features=sensitive_features)
  key = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
  u = np.asarray(jax.random.uniform(key, p.shape), np.float64)
  return (u < p).astype(np.int32)


def expected_rates(y_true, prob, *, sensitive_features) -> dict:
  """The group rates (`group.group_rates`) of a randomised predictor in expectation, from each
  example's P(y_hat = 1), with its demographic parity and equalized odds differences
  (between groups) and accuracy."""
  r = group_metrics.group_rates(y_true, prob, sensitive_features=sensitive_features,
                                probabilities=True)
  between = group_metrics._gap  # pylint: disable=protected-access
  gap = lambda k: between(r[k], r["overall"][k], "between_groups")
  return {**r, "demographic_parity_difference": gap("selection_rate"),
          "equalized_odds_difference": max(gap("tpr"), gap("fpr")),
          "accuracy": r["overall"]["accuracy"]}
