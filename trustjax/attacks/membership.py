"""Membership inference scores: the loss threshold and LiRA.

Every score is "higher = more likely a member", ready for `attacks.metrics`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import stats as jstats


def loss_threshold_scores(losses: jax.Array) -> jax.Array:
  """`-loss`: the attack of Yeom et al. ("Privacy Risk in Machine Learning: Analyzing the
  Connection to Overfitting", CSF 2018), which calls an example a member when its loss is low.

  Args:
    losses: float [..., n] per-example losses of the target model.
  """
  return -jnp.asarray(losses, jnp.float32)


def logit_confidence(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """phi = log(p_y / (1 - p_y)) for the softmax of `logits: [..., classes]` at `labels: [...]`,
  computed as z_y - logsumexp(z_{j != y}) so that it stays finite when p_y rounds to 1.

  The statistic LiRA models as Gaussian (Carlini et al. 2022, Sec. IV-C).
  """
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  z_y = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
  rest = jax.nn.logsumexp(jnp.where(onehot, -jnp.inf, logits), axis=-1)
  return z_y - rest


def _moments(stats, weights, global_variance: bool, eps: float):
  """Weighted mean and std over the shadow axis (0) per example; pooled std over examples when
  `global_variance`."""
  w = weights.astype(jnp.float32)
  count = w.sum(0)
  mean = (w * stats).sum(0) / jnp.maximum(count, 1.0)
  sq = (w * (stats - mean) ** 2).sum(0)
  if global_variance:
    var = jnp.full_like(mean, sq.sum() / jnp.maximum(count.sum() - 1.0, 1.0))
  else:
    var = sq / jnp.maximum(count - 1.0, 1.0)
  return mean, jnp.sqrt(var) + eps, count


def lira_scores(target_stats: jax.Array, shadow_stats: jax.Array, shadow_in: jax.Array, *,
                online: bool = True, global_variance: bool = False,
                eps: float = 1e-6) -> jax.Array:
  """The Likelihood Ratio Attack (LiRA) of Carlini et al., "Membership Inference Attacks From
  First Principles", IEEE S&P 2022.

  For each example, the target model's statistic phi (`logit_confidence`) is compared with
  Gaussians fitted to the shadow models' statistics for that example: those trained with it
  ("in") and without it ("out").

  Args:
    target_stats: float [n] phi of the target model on each example.
    shadow_stats: float [m, n] phi of each shadow model on each example.
    shadow_in: bool [m, n] whether shadow model m trained on example n.
    online: True: log N(phi; mu_in, s_in^2) - log N(phi; mu_out, s_out^2) (Eq. 4, online).
      False: the offline one-sided test, log Pr[Z <= phi] for Z ~ N(mu_out, s_out^2), which
      needs no "in" models.
    global_variance: one variance per side pooled over all examples (the paper's fix for few
      shadow models).
    eps: added to each standard deviation.

  Returns:
    float [n] scores, higher = more likely a member. Examples that lack "in" (online) or "out"
    shadow models get NaN: the test cannot be made for them.
  """
  target = jnp.asarray(target_stats, jnp.float32)
  shadow = jnp.asarray(shadow_stats, jnp.float32)
  inside = jnp.asarray(shadow_in, bool)
  if shadow.ndim != 2 or shadow.shape != inside.shape or target.shape != shadow.shape[1:]:
    raise ValueError(f"expected target_stats [n], shadow_stats and shadow_in [m, n]; got "
                     f"{target.shape}, {shadow.shape}, {inside.shape}")
  mu_out, sd_out, n_out = _moments(shadow, ~inside, global_variance, eps)
  if online:
    mu_in, sd_in, n_in = _moments(shadow, inside, global_variance, eps)
    score = (jstats.norm.logpdf(target, mu_in, sd_in) - jstats.norm.logpdf(target, mu_out, sd_out))
    ok = (n_in > 0) & (n_out > 0)
  else:
    score = jstats.norm.logcdf(target, mu_out, sd_out)
    ok = n_out > 0
  return jnp.where(ok, score, jnp.nan)


def leave_one_out_lira(stats: np.ndarray, is_in: np.ndarray, **kwargs) -> np.ndarray:
  """LiRA with each of m models as the target in turn and the other m - 1 as its shadows (the
  evaluation protocol of Carlini et al. 2022).

  Args:
    stats: float [m, n] phi of every model on every example.
    is_in: bool [m, n] membership.
    **kwargs: passed to `lira_scores`.

  Returns:
    float [m, n]: row t holds the scores against target model t (compare with `is_in[t]`).
  """
  stats, is_in = np.asarray(stats), np.asarray(is_in, bool)
  m = stats.shape[0]
  if m < 2:
    raise ValueError(f"leave-one-out LiRA needs at least 2 models, got {m}")
  rows = []
  for t in range(m):
    others = np.r_[0:t, t + 1:m]
    rows.append(np.asarray(lira_scores(stats[t], stats[others], is_in[others], **kwargs)))
  return np.stack(rows)
