"""Extrinsic fairness: group rates and their gaps, any metric per group (`metric_frame`), and
the bias AUCs of identity subgroups.

Group metrics take fairlearn's signatures (`y_true, y_pred, *, sensitive_features, method`) and
give its numbers (tested against fairlearn). Rates are weighted sums with a denominator per
group, computed with `jax.ops.segment_sum` so they also run inside jitted evaluation.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trustjax.stats import check_binary_scores, roc_auc

_METHODS = ("between_groups", "to_overall")


def _groups(sensitive_features) -> tuple[np.ndarray, np.ndarray]:
  names, ids = np.unique(np.asarray(sensitive_features, dtype=object).astype(str),
                         return_inverse=True)
  return names, ids.reshape(-1)


def fitted_group_ids(names: np.ndarray, sensitive_features, what: str) -> np.ndarray:
  """int [n]: each value's index in `names` (sorted strings, as `_groups` returns them from the
  fitting data); values never fitted are refused, naming them and `what` was fitted."""
  values = np.asarray(sensitive_features, dtype=object).astype(str).reshape(-1)
  ids = np.searchsorted(names, values)
  ok = (ids < len(names)) & (names[np.minimum(ids, len(names) - 1)] == values)
  if not ok.all():
    unknown = sorted(map(str, set(values[~ok])))
    raise ValueError(f"groups the {what} was not fitted on: {unknown[:10]}")
  return ids


def labelled_groups(X, y_true, sensitive_features):
  """A mitigation's training inputs checked: the 0/1 labels (float64 [n]), the sorted group
  names and each example's group index, with X, labels and groups of one length."""
  y = np.asarray(y_true).reshape(-1)
  if not np.isin(y, (0, 1)).all():
    raise ValueError("y_true must hold 0/1 labels")
  names, ids = _groups(sensitive_features)
  if not len(y) == len(ids) == len(X):
    raise ValueError(f"X, y_true and sensitive_features differ in length: {len(X)}, {len(y)}, "
                     f"{len(ids)}")
  return y.astype(np.float64), names, ids


def _binary(name, v) -> np.ndarray:
  v = np.asarray(v).reshape(-1)
  if not np.isin(v, (0, 1)).all():
    raise ValueError(f"{name} must hold 0/1 labels")
  return v.astype(np.float32)


def group_rates(y_true, y_pred, *, sensitive_features, sample_weight=None,
                probabilities: bool = False) -> dict:
  """Per group and overall: count, selection rate P[y_pred = 1], true-positive rate
  P[y_pred = 1 | y = 1], false-positive rate P[y_pred = 1 | y = 0] and accuracy.

  With `probabilities=True`, `y_pred` holds each example's P(y_pred = 1) in [0, 1] (a
  randomised predictor, e.g. `postprocessing.threshold_probabilities`) and the rates are their
  expectations (every rate is linear in the predictions).

  Returns:
    {"groups": [g] names, "count", "selection_rate", "tpr", "fpr", "accuracy": float [g]
     arrays, and "overall": the same five for everyone}. A rate whose denominator is empty in
    a group is NaN there.
  """
  y = _binary("y_true", y_true)
  if probabilities:
    p = np.asarray(y_pred, np.float32).reshape(-1)
    if not ((p >= 0) & (p <= 1)).all():
      raise ValueError("y_pred must hold probabilities in [0, 1] when probabilities=True")
  else:
    p = _binary("y_pred", y_pred)
  names, ids = _groups(sensitive_features)
  if not (len(y) == len(p) == len(ids)):
    raise ValueError(f"y_true, y_pred and sensitive_features differ in length: "
                     f"{len(y)}, {len(p)}, {len(ids)}")
  w = (np.ones_like(y) if sample_weight is None
       else np.asarray(sample_weight, np.float32).reshape(-1))
  out = {k: np.asarray(v, np.float64) for k, v in
         _rates(jnp.asarray(y), jnp.asarray(p), jnp.asarray(w), jnp.asarray(ids),
                len(names)).items()}
  overall = {k: float(v[0]) for k, v in
             _rates(jnp.asarray(y), jnp.asarray(p), jnp.asarray(w),
                    jnp.zeros(len(y), jnp.int32), 1).items()}
  return {"groups": names, **out, "overall": overall}


def _rates(y, p, w, ids, num_groups):
  seg = lambda v: jax.ops.segment_sum(v, ids, num_segments=num_groups)
  ratio = lambda a, b: jnp.where(b > 0, a / jnp.where(b > 0, b, 1.0), jnp.nan)
  count, pos, neg = seg(w), seg(w * y), seg(w * (1 - y))
  return {"count": count, "selection_rate": ratio(seg(w * p), count),
          "tpr": ratio(seg(w * p * y), pos), "fpr": ratio(seg(w * p * (1 - y)), neg),
          "accuracy": ratio(seg(w * (p * y + (1 - p) * (1 - y))), count)}


def _check_method(method: str) -> None:
  if method not in _METHODS:
    raise ValueError(f"method must be one of {_METHODS}, got {method=!r}")


def _gap(values: np.ndarray, overall: float, method: str) -> float:
  _check_method(method)
  if method == "between_groups":
    return float(np.nanmax(values) - np.nanmin(values))
  return float(np.nanmax(np.abs(values - overall)))


def _ratio(values: np.ndarray, overall: float, method: str) -> float:
  _check_method(method)
  if method == "between_groups":
    hi = np.nanmax(values)
    return float(np.nanmin(values) / hi) if hi > 0 else float("nan")
  r = np.minimum(values / overall, overall / values)
  return float(np.nanmin(r))


def demographic_parity_difference(y_true, y_pred, *, sensitive_features,
                                  method: str = "between_groups", sample_weight=None) -> float:
  """The largest gap in selection rate: between two groups ("between_groups") or between a group
  and everyone ("to_overall"). 0 means demographic parity."""
  r = group_rates(y_true, y_pred, sensitive_features=sensitive_features,
                  sample_weight=sample_weight)
  return _gap(r["selection_rate"], r["overall"]["selection_rate"], method)


def demographic_parity_ratio(y_true, y_pred, *, sensitive_features,
                             method: str = "between_groups", sample_weight=None) -> float:
  """The smallest ratio of selection rates (1 means demographic parity)."""
  r = group_rates(y_true, y_pred, sensitive_features=sensitive_features,
                  sample_weight=sample_weight)
  return _ratio(r["selection_rate"], r["overall"]["selection_rate"], method)


def _equalized_odds(y_true, y_pred, sensitive_features, method, sample_weight, agg,
                    measure, worst) -> float:
  """`measure` (_gap or _ratio) of the true- and of the false-positive rate, combined by
  `worst` (max or min) for agg="worst_case" or by their mean for agg="mean"."""
  if agg not in ("worst_case", "mean"):
    raise ValueError(f"agg must be 'worst_case' or 'mean', got {agg=!r}")
  r = group_rates(y_true, y_pred, sensitive_features=sensitive_features,
                  sample_weight=sample_weight)
  both = [measure(r[k], r["overall"][k], method) for k in ("tpr", "fpr")]
  return worst(both) if agg == "worst_case" else float(np.mean(both))


def equalized_odds_difference(y_true, y_pred, *, sensitive_features,
                              method: str = "between_groups", sample_weight=None,
                              agg: str = "worst_case") -> float:
  """The gap in true-positive rate and in false-positive rate (Hardt et al., "Equality of
  Opportunity in Supervised Learning", NeurIPS 2016): the larger of the two ("worst_case") or
  their mean ("mean")."""
  return _equalized_odds(y_true, y_pred, sensitive_features, method, sample_weight, agg, _gap,
                         max)


def equalized_odds_ratio(y_true, y_pred, *, sensitive_features, method: str = "between_groups",
                         sample_weight=None, agg: str = "worst_case") -> float:
  """The ratio counterpart of `equalized_odds_difference` (the smaller, or the mean, of the
  true- and false-positive-rate ratios)."""
  return _equalized_odds(y_true, y_pred, sensitive_features, method, sample_weight, agg, _ratio,
                         min)


def equal_opportunity_difference(y_true, y_pred, *, sensitive_features,
                                 method: str = "between_groups", sample_weight=None) -> float:
  """The largest gap in true-positive rate (Hardt et al. 2016)."""
  r = group_rates(y_true, y_pred, sensitive_features=sensitive_features,
                  sample_weight=sample_weight)
  return _gap(r["tpr"], r["overall"]["tpr"], method)


# ----------------------------------------------------------------------------- any metric


class MetricFrame(NamedTuple):
  """Metrics overall and per group (`metric_frame`); the summaries follow fairlearn's
  `MetricFrame` (differences and ratios between groups or to the overall value)."""
  overall: dict  # {metric: value}
  by_group: dict  # {group: {metric: value}}; a group is a value, or a tuple of values when
  # several sensitive features intersect
  counts: dict  # {group: examples}
  ci_quantiles: tuple | None = None  # the bootstrap intervals' quantiles (`n_boot`)
  samples: tuple | None = None  # one MetricFrame per bootstrap resample

  def _column(self, name: str) -> np.ndarray:
    return np.array([v[name] for v in self.by_group.values()], np.float64)

  def _resamples(self) -> tuple:
    if self.samples is None:
      raise ValueError("no bootstrap: pass n_boot and ci_quantiles to metric_frame")
    return self.samples

  def _ci(self, summary) -> dict:
    """Per metric, the quantiles over the resamples of summary(frame) (a {metric: value})."""
    values = [summary(f) for f in self._resamples()]
    return {k: np.quantile([v[k] for v in values], self.ci_quantiles).tolist()
            for k in self.overall}

  @property
  def overall_ci(self) -> dict:
    """{metric: [value at each of ci_quantiles]} over the bootstrap resamples."""
    return self._ci(lambda f: f.overall)

  @property
  def by_group_ci(self) -> dict:
    """{group: {metric: [value at each quantile]}}; a resample that misses a group leaves it
    out of that group's quantiles (NaN if every resample does)."""
    samples, nan = self._resamples(), {k: np.nan for k in self.overall}
    return {g: {k: np.nanquantile([f.by_group.get(g, nan)[k] for f in samples],
                                  self.ci_quantiles).tolist() for k in self.overall}
            for g in self.by_group}

  def group_min_ci(self) -> dict:
    return self._ci(lambda f: f.group_min())

  def group_max_ci(self) -> dict:
    return self._ci(lambda f: f.group_max())

  def difference_ci(self, method: str = "between_groups") -> dict:
    """Quantiles of `difference(method)` over the resamples."""
    _check_method(method)
    return self._ci(lambda f: f.difference(method))

  def ratio_ci(self, method: str = "between_groups") -> dict:
    """Quantiles of `ratio(method)` over the resamples."""
    _check_method(method)
    return self._ci(lambda f: f.ratio(method))

  def group_min(self) -> dict:
    return {k: float(np.nanmin(self._column(k))) for k in self.overall}

  def group_max(self) -> dict:
    return {k: float(np.nanmax(self._column(k))) for k in self.overall}

  def difference(self, method: str = "between_groups") -> dict:
    """Per metric, the largest gap between two groups or between a group and the overall."""
    return {k: _gap(self._column(k), v, method) for k, v in self.overall.items()}

  def ratio(self, method: str = "between_groups") -> dict:
    """Per metric, the smallest ratio (at most 1) between groups or to the overall."""
    return {k: _ratio(self._column(k), v, method) for k, v in self.overall.items()}


def bootstrap_resamples(n: int, n_boot: int, random_state: int = 0) -> np.ndarray:
  """int [n_boot, n]: row indices of `n_boot` resamples of n rows with replacement, drawn as
  fairlearn's `MetricFrame` draws them for an integer `random_state` (one uint32 seed per
  resample from numpy's default generator, then a `RandomState` choice of n of n rows), so the
  same random_state gives fairlearn's intervals."""
  if n < 1 or n_boot < 1:
    raise ValueError(f"n and n_boot must be >= 1, got {n=}, {n_boot=}")
  seeds = np.random.default_rng(int(random_state)).integers(
      0, np.iinfo(np.uint32).max, size=n_boot, dtype=np.uint32)
  return np.stack([np.random.RandomState(s).choice(n, size=n, replace=True) for s in seeds])


def metric_frame(metrics, y_true, y_pred, *, sensitive_features,
                 sample_params: dict | None = None, n_boot: int | None = None,
                 ci_quantiles=None, random_state: int = 0,
                 resamples: np.ndarray | None = None) -> MetricFrame:
  """Evaluates each metric on everyone and on each group, with bootstrap intervals on request.

  Args:
    metrics: a callable `fn(y_true, y_pred, **params) -> float` or a dict name -> callable
      (e.g. scikit-learn's metrics, or `stats.roc_auc` with scores as `y_pred`).
    y_true, y_pred: [n] arrays (labels, predictions or scores).
    sensitive_features: [n] group values, or a dict name -> [n] values (or an [n, k] array)
      whose combinations are the groups (intersectional: every combination present).
    sample_params: per metric name, a dict of [n] arrays sliced with the group (e.g.
      {"accuracy": {"sample_weight": w}}).
    n_boot, ci_quantiles: with both, the frame is recomputed on `n_boot` resamples of the rows
      (with replacement, groups not stratified: a group's size varies between resamples) and
      its `*_ci` members give each summary's quantiles over them (numpy's linear quantiles),
      as fairlearn's `MetricFrame(n_boot=, ci_quantiles=)` does; e.g. ci_quantiles=(0.025,
      0.975) for a 95% percentile interval.
    random_state: the resamples' seed (`bootstrap_resamples`).
    resamples: int [n_boot, n] row indices to use instead (e.g. the same resamples for two
      models' predictions, for a paired comparison); needs ci_quantiles.

  Returns:
    A `MetricFrame`.

  References:
    Bird et al., "Fairlearn: A toolkit for assessing and improving fairness in AI", 2020
    (`MetricFrame`).
  """
  fns = metrics if isinstance(metrics, dict) else {getattr(metrics, "__name__", "metric"):
                                                   metrics}
  yt, yp = np.asarray(y_true), np.asarray(y_pred)
  if isinstance(sensitive_features, dict):
    columns = [np.asarray(v, dtype=object).astype(str).reshape(-1)
               for v in sensitive_features.values()]
  else:
    sf = np.asarray(sensitive_features, dtype=object)
    columns = ([sf.astype(str).reshape(-1)] if sf.ndim == 1 else
               [sf[:, j].astype(str) for j in range(sf.shape[1])])
  if not all(len(c) == len(yt) == len(yp) for c in columns):
    raise ValueError(f"y_true, y_pred and sensitive_features differ in length: {len(yt)}, "
                     f"{len(yp)}, {[len(c) for c in columns]}")
  params = sample_params or {}
  unknown = sorted(set(params) - set(fns))
  if unknown:
    raise ValueError(f"sample_params names metrics that are not given: {unknown}")

  def evaluate(rows):
    return {k: float(f(yt[rows], yp[rows], **{p: np.asarray(v)[rows]
                                             for p, v in params.get(k, {}).items()}))
            for k, f in fns.items()}
  keys = list(zip(*columns))
  groups = sorted(set(keys))
  by_group, counts = {}, {}
  lookup = {g: i for i, g in enumerate(groups)}
  ids = np.array([lookup[k] for k in keys])
  for i, g in enumerate(groups):
    rows = ids == i
    name = str(g[0]) if len(columns) == 1 else tuple(map(str, g))  # plain strings
    by_group[name], counts[name] = evaluate(rows), int(rows.sum())
  frame = MetricFrame(evaluate(np.ones(len(yt), bool)), by_group, counts)
  if n_boot is None and resamples is None and ci_quantiles is None:
    return frame
  q = tuple(float(v) for v in np.atleast_1d(ci_quantiles)) if ci_quantiles is not None else ()
  if not q or not all(0.0 <= v <= 1.0 for v in q) or (n_boot is None) == (resamples is None):
    raise ValueError("bootstrap intervals need ci_quantiles in [0, 1] and one of n_boot or "
                     f"resamples, got {ci_quantiles=}, {n_boot=}, resamples "
                     f"{'given' if resamples is not None else None}")
  if resamples is None:
    resamples = bootstrap_resamples(len(yt), n_boot, random_state)
  resamples = np.asarray(resamples)
  if resamples.ndim != 2 or resamples.shape[1] != len(yt):
    raise ValueError(f"resamples must be [n_boot, {len(yt)}] row indices, got shape "
                     f"{resamples.shape}")
  samples = []
  for rows in resamples:
    sf = ({k: c[rows] for k, c in zip(sensitive_features, columns)}
          if isinstance(sensitive_features, dict) else np.stack([c[rows] for c in columns], 1))
    samples.append(metric_frame(
        fns, yt[rows], yp[rows], sensitive_features=sf,
        sample_params={k: {p: np.asarray(v)[rows] for p, v in ps.items()}
                       for k, ps in params.items()}))
  return frame._replace(ci_quantiles=q, samples=tuple(samples))


# ----------------------------------------------------------------------------- bias AUCs
#
# Borkan, Dixon, Sorensen, Thain and Vasserman, "Nuanced Metrics for Measuring Unintended Bias
# with Real Data for Text Classification", WWW 2019 companion.


def subgroup_auc(y_true, scores, in_subgroup) -> float:
  """ROC AUC on the examples that mention the identity: can the model tell toxic from non-toxic
  comments within the subgroup?"""
  y, s = check_binary_scores(y_true, scores)
  g = np.asarray(in_subgroup, bool).reshape(-1)
  return roc_auc(y[g], s[g])


def bpsn_auc(y_true, scores, in_subgroup) -> float:
  """Background Positive, Subgroup Negative AUC: the subgroup's negatives against the other
  examples' positives. Low when non-toxic mentions of the identity score high."""
  y, s = check_binary_scores(y_true, scores)
  g = np.asarray(in_subgroup, bool).reshape(-1)
  keep = (g & ~y) | (~g & y)
  return roc_auc(y[keep], s[keep])


def bnsp_auc(y_true, scores, in_subgroup) -> float:
  """Background Negative, Subgroup Positive AUC: the subgroup's positives against the other
  examples' negatives. Low when toxic mentions of the identity score low."""
  y, s = check_binary_scores(y_true, scores)
  g = np.asarray(in_subgroup, bool).reshape(-1)
  keep = (g & y) | (~g & ~y)
  return roc_auc(y[keep], s[keep])


def generalized_mean_bias(aucs, p: float = -5.0) -> float:
  """The power mean (mean(auc^p))^(1/p) over subgroups; p = -5 weights the worst subgroups most
  (the aggregate of the Jigsaw Unintended Bias challenge, after Borkan et al. 2019). For
  p <= 0 a subgroup AUC of 0 makes the mean 0, its limit."""
  a = np.asarray(aucs, np.float64).reshape(-1)
  if not a.size or not np.isfinite(a).all() or (a < 0).any():
    raise ValueError("aucs must be a non-empty list of non-negative numbers")
  if p <= 0 and (a == 0).any():
    return 0.0
  if p == 0:
    return float(np.exp(np.log(a).mean()))
  return float(np.mean(a ** p) ** (1.0 / p))
