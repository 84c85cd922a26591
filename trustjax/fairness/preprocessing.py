"""Pre-processing for group fairness: remove the features' linear correlation with the group.

Each feature column is replaced by its residual after a least-squares fit on the centred
one-hot group indicators, X_filtered = X - (S - mean S) beta with
beta = argmin ||X - (S - mean S) beta||, then blended with the original:
alpha X_filtered + (1 - alpha) X. With one-hot groups the residual is exactly "subtract the
group's mean, add the overall mean", so after the transform (alpha = 1) every group has the
same mean feature vector on the fitting data and a linear model can no longer read the group
from the means. This is fairlearn's `CorrelationRemover` (its formula; its sensitive columns
being the one-hot indicators of `sensitive_features`); the tests compare the two. It is a
linear decorrelation: non-linear functions of the features can still carry the group.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from trustjax.fairness import group as group_metrics


class CorrelationRemover(NamedTuple):
  """A fitted linear decorrelation (`fit_correlation_remover`)."""
  groups: np.ndarray  # str [G] the sensitive-feature values (as strings), sorted
  sensitive_mean: np.ndarray  # float64 [G] each group's share of the fitting data
  coef: np.ndarray  # float64 [G, d] least-squares coefficients on the centred indicators
  alpha: float  # 1 removes the correlation fully, 0 leaves the features as they are


def _one_hot(groups: np.ndarray, sensitive_features) -> np.ndarray:
  ids = group_metrics.fitted_group_ids(groups, sensitive_features, "remover")
  return np.eye(len(groups))[ids]


def fit_correlation_remover(X, *, sensitive_features, alpha: float = 1.0) -> CorrelationRemover:
  """Fits the decorrelation of features X [n, d] from the groups `sensitive_features` [n].

  References:
    Bird et al., "Fairlearn: A toolkit for assessing and improving fairness in AI", 2020
    (`CorrelationRemover`).
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must lie in [0, 1], got {alpha=}")
  x = np.asarray(X, np.float64)
  if x.ndim != 2:
    raise ValueError(f"X must be [examples, features], got shape {x.shape}")
  names, _ = group_metrics._groups(sensitive_features)  # pylint: disable=protected-access
  s = _one_hot(names, sensitive_features)
  if len(s) != len(x):
    raise ValueError(f"X and sensitive_features differ in length: {len(x)}, {len(s)}")
  mean = s.mean(axis=0)
  coef = np.linalg.lstsq(s - mean, x, rcond=None)[0]
  return CorrelationRemover(names, mean, coef, float(alpha))


def remove_correlation(remover: CorrelationRemover, X, *, sensitive_features) -> np.ndarray:
  """The decorrelated features: float64 [n, d]."""
  x = np.asarray(X, np.float64)
  s = _one_hot(remover.groups, sensitive_features)
  if len(s) != len(x) or x.shape[1:] != remover.coef.shape[1:]:
    raise ValueError(f"X {x.shape} and sensitive_features ({len(s)}) do not match the "
                     f"remover's {remover.coef.shape[1]} features")
  filtered = x - (s - remover.sensitive_mean) @ remover.coef
  return remover.alpha * filtered + (1.0 - remover.alpha) * x
