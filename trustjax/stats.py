"""Statistics shared by the attacks and the fairness metrics: host-side numpy in float64, and
bootstrap confidence intervals whose resamples are one jitted, vectorised jnp program.

Arguments follow scikit-learn's order `(labels, scores)`; a higher score means the positive class
(a member, a toxic comment).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special, stats


def check_binary_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
  """(bool [n], float64 [n]) from binary labels and finite scores; both classes must occur."""
  y = np.asarray(labels).reshape(-1)
  s = np.asarray(scores, np.float64).reshape(-1)
  if y.shape != s.shape:
    raise ValueError(f"labels and scores differ in size: {y.shape} vs {s.shape}")
  if y.dtype != bool:
    if not np.isin(y, (0, 1)).all():
      raise ValueError("labels must be boolean or 0/1")
    y = y.astype(bool)
  if not np.isfinite(s).all():
    raise ValueError(f"scores hold {int((~np.isfinite(s)).sum())} non-finite values")
  if y.all() or not y.any():
    raise ValueError(f"need both classes (e.g. members and non-members), got {int(y.sum())} "
                     f"positives of {y.size}")
  return y, s


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(fpr, tpr, thresholds): one point per distinct score, from the highest down, plus the
  (0, 0) point at threshold +inf. Predicting positive (e.g. "member") when score >= threshold."""
  y, s = check_binary_scores(labels, scores)
  order = np.argsort(-s, kind="stable")
  s, y = s[order], y[order]
  last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct score
  tp = np.cumsum(y)[last]
  fp = np.cumsum(~y)[last]
  return (np.r_[0.0, fp / (~y).sum()], np.r_[0.0, tp / y.sum()], np.r_[np.inf, s[last]])


def roc_auc(labels, scores) -> float:
  """Area under the ROC curve (ties count one half): the probability that a random positive
  (e.g. a member) scores above a random negative."""
  y, s = check_binary_scores(labels, scores)
  ranks = stats.rankdata(s)  # average ranks for ties
  n1, n0 = y.sum(), (~y).sum()
  return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def mean_and_sd(records, keys) -> dict[str, float]:
  """Over runs (e.g. seeds): {k: mean, f"{k}_sd": sample standard deviation (ddof 1; 0 for a
  single run)} for each k in `keys`, from a list of dicts holding those keys."""
  out = {}
  for k in keys:
    v = np.asarray([r[k] for r in records], np.float64)
    out[k] = float(v.mean())
    out[f"{k}_sd"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
  return out


# ----------------------------------------------------------------------------- the bootstrap


class BootstrapInterval(NamedTuple):
  """Per statistic (arrays of the statistic's shape): the estimate on the data, the interval's
  ends, and the bootstrap standard error (sample standard deviation of the resamples)."""
  estimate: np.ndarray
  low: np.ndarray
  high: np.ndarray
  standard_error: np.ndarray


def bootstrap_weights(rng: jax.Array | int, n: int, num_resamples: int,
                      strata=None) -> jax.Array:
  """float32 [num_resamples, n]: how many times each of n units is drawn in each resample (n
  draws with replacement, or within each stratum as many as it holds when `strata` [n] gives
  each unit's stratum). A statistic of the weighted sample equals the statistic of the resampled
  data whenever it depends on the data only through its empirical distribution (AUCs, rates,
  means)."""
  key = jax.random.key(rng) if isinstance(rng, int) else rng
  if strata is None:
    groups = [np.arange(n)]
  else:
    strata = np.asarray(strata).reshape(-1)
    if strata.size != n:
      raise ValueError(f"strata has {strata.size} entries for {n} units")
    groups = [np.flatnonzero(strata == g) for g in np.unique(strata)]
  drawn = jnp.concatenate([  # [num_resamples, n]: the unit of each draw, stratum by stratum
      jnp.asarray(members)[jax.random.randint(jax.random.fold_in(key, g),
                                              (num_resamples, members.size), 0, members.size)]
      for g, members in enumerate(groups)], axis=1)
  rows = jnp.arange(num_resamples)[:, None]
  return jnp.zeros((num_resamples, n), jnp.float32).at[rows, drawn].add(1.0)


def bootstrap_interval(statistic: Callable[[jax.Array], jax.Array], n: int, *,
                       rng: jax.Array | int = 0, num_resamples: int = 2000,
                       confidence: float = 0.95, method: str = "bca", strata=None,
                       weights=None, batch_size: int = 64) -> BootstrapInterval:
  """Two-sided bootstrap confidence interval of `statistic(weights)`, a jnp function of unit
  weights [n] (ones: the data as observed) returning a scalar or an array of statistics.

  The resamples (`bootstrap_weights`) are evaluated by one jitted program, `lax.map` over
  batches of `batch_size` vmapped resamples; `weights` [num_resamples, n] replaces them (for
  reproducing an interval from known resamples). `method="percentile"` takes the quantiles
  (1 -+ confidence) / 2 of the resampled statistics (linear interpolation, as numpy's
  default); `"bca"` (the default, as scipy.stats.bootstrap's) corrects them for bias and
  skewness, with the acceleration from the jackknife (each unit left out in turn: n more
  evaluations, batched the same way).

  Reference: Efron and Tibshirani, "An Introduction to the Bootstrap", 1993 (ch. 13 percentile,
  ch. 14 BCa: eq. 14.10 z0, eq. 14.15 acceleration).
  """
  if method not in ("percentile", "bca"):
    raise ValueError(f"method must be 'percentile' or 'bca', got {method!r}")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must lie in (0, 1), got {confidence=}")
  if n < 2 or num_resamples < 2:
    raise ValueError(f"need n >= 2 units and num_resamples >= 2, got {n=}, {num_resamples=}")
  if weights is None:
    weights = bootstrap_weights(rng, n, num_resamples, strata)
  elif np.shape(weights) != (num_resamples, n):
    raise ValueError(f"weights must be [num_resamples, n] = {(num_resamples, n)}, got "
                     f"{np.shape(weights)}")
  jack = method == "bca"

  @jax.jit
  def evaluate(w):
    """The resamples, then (BCa) the jackknife's n leave-one-out weights, built row by row (an
    n x n matrix would be quadratic), all in one program (one compilation)."""
    def row(i):
      resample = w[jnp.minimum(i, num_resamples - 1)]
      left_out = jnp.ones(n, jnp.float32).at[i - num_resamples].set(0.0)
      return statistic(jnp.where(i < num_resamples, resample, left_out))
    return jax.lax.map(row, jnp.arange(num_resamples + (n if jack else 0)),
                       batch_size=batch_size)

  theta = np.asarray(statistic(jnp.ones(n, jnp.float32)), np.float64)
  every = np.asarray(evaluate(jnp.asarray(weights, jnp.float32)), np.float64)
  boot = every[:num_resamples]
  alpha = (1.0 - confidence) / 2
  if method == "percentile":
    q_low = np.full(theta.shape, alpha)
    q_high = np.full(theta.shape, 1.0 - alpha)
  else:
    z0 = special.ndtri(((boot < theta).sum(0) + (boot <= theta).sum(0)) / (2.0 * num_resamples))
    left_out = every[num_resamples:]
    d = left_out.mean(0) - left_out
    accel = (d ** 3).sum(0) / (6.0 * (d ** 2).sum(0) ** 1.5)
    z = special.ndtri(np.array([alpha, 1.0 - alpha])).reshape((2,) + (1,) * theta.ndim)
    q_low, q_high = special.ndtr(z0 + (z0 + z) / (1.0 - accel * (z0 + z)))
  flat = boot.reshape(num_resamples, -1)
  low = np.array([np.quantile(flat[:, i], q) for i, q in enumerate(np.ravel(q_low))])
  high = np.array([np.quantile(flat[:, i], q) for i, q in enumerate(np.ravel(q_high))])
  return BootstrapInterval(theta, low.reshape(theta.shape), high.reshape(theta.shape),
                           np.asarray(boot.std(0, ddof=1)))


def weighted_auc(labels, scores) -> Callable[[jax.Array], jax.Array]:
  """A jnp function weights [n] -> the AUC (ties count one half) of the sample in which row i
  counts weights[i] times: sum over positive i, negative j of w_i w_j ([s_i > s_j] + [s_i = s_j]
  / 2), over (sum of positive weights)(sum of negative weights). The scores are sorted and their
  ties grouped once here, so each call is O(n): what `bootstrap_interval` resamples. Rows with
  weight 0 drop out (a mask times the bootstrap weights restricts it to a subgroup); NaN when
  the weighted sample lacks a class."""
  y, s = check_binary_scores(labels, scores)
  order = np.argsort(s, kind="stable")
  s_sorted, y_sorted = s[order], jnp.asarray(y[order])
  tie_group = jnp.asarray(np.r_[0, np.cumsum(s_sorted[1:] != s_sorted[:-1])])
  groups = int(tie_group[-1]) + 1
  order = jnp.asarray(order)

  def auc(weights: jax.Array) -> jax.Array:
    w = jnp.asarray(weights, jnp.float32)[order]
    pos = jax.ops.segment_sum(jnp.where(y_sorted, w, 0.0), tie_group, groups)
    neg = jax.ops.segment_sum(jnp.where(y_sorted, 0.0, w), tie_group, groups)
    below = jnp.cumsum(neg) - neg  # negative weight strictly below each distinct score
    return jnp.sum(pos * (below + 0.5 * neg)) / (jnp.sum(pos) * jnp.sum(neg))

  return auc
