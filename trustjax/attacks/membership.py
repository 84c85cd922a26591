"""Membership inference scores: the loss threshold, LiRA and RMIA.

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
                online: bool = True, global_variance: bool = False, eps: float = 1e-6,
                shadow_used: jax.Array | None = None) -> jax.Array:
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
    shadow_used: bool [m, n], which shadow models count for each example (None: all).

  Returns:
    float [n] scores, higher = more likely a member. Examples that lack "in" (online) or "out"
    shadow models get NaN: the test cannot be made for them.
  """
  target = jnp.asarray(target_stats, jnp.float32)
  shadow = jnp.asarray(shadow_stats, jnp.float32)
  inside = jnp.asarray(shadow_in, bool)
  used = jnp.ones(inside.shape, bool) if shadow_used is None else jnp.asarray(shadow_used, bool)
  if (shadow.ndim != 2 or shadow.shape != inside.shape or target.shape != shadow.shape[1:]
      or used.shape != inside.shape):
    raise ValueError(f"expected target_stats [n], shadow_stats, shadow_in and shadow_used "
                     f"[m, n]; got {target.shape}, {shadow.shape}, {inside.shape}, {used.shape}")
  mu_out, sd_out, n_out = _moments(shadow, ~inside & used, global_variance, eps)
  if online:
    mu_in, sd_in, n_in = _moments(shadow, inside & used, global_variance, eps)
    score = (jstats.norm.logpdf(target, mu_in, sd_in) - jstats.norm.logpdf(target, mu_out, sd_out))
    ok = (n_in > 0) & (n_out > 0)
  else:
    score = jstats.norm.logcdf(target, mu_out, sd_out)
    ok = n_out > 0
  return jnp.where(ok, score, jnp.nan)


def balanced_shadows(shadow_in: np.ndarray, rng) -> np.ndarray:
  """bool [m, n]: the shadow models to use per example so that as many trained on it as not,
  dropping models of the larger side at random.

  Leaving the target out of a design where every example is in exactly half the models leaves
  one "in" shadow fewer for the target's members and one "out" fewer for its non-members.
  LiRA's mean on the smaller side is then the noisier one, and the target's statistic lies
  closer to the other side's mean on average: with no membership signal at all, the pooled
  AUC falls below 0.5 (0.41 with 4 models, 0.48 with 8; tests/attacks/test_membership.py).
  Equal sides remove that bias.
  """
  inside = np.asarray(shadow_in, bool)
  rng = np.random.default_rng(rng)
  keys = rng.random(inside.shape)
  n_in, n_out = inside.sum(0), (~inside).sum(0)
  keep = np.minimum(n_in, n_out)
  # within each side, keep the `keep` models with the smallest random keys
  rank_in = np.where(inside, keys, np.inf).argsort(0).argsort(0)
  rank_out = np.where(~inside, keys, np.inf).argsort(0).argsort(0)
  return np.where(inside, rank_in < keep, rank_out < keep)


def leave_one_out_lira(stats: np.ndarray, is_in: np.ndarray, *, online: bool = True,
                       balance: bool = True, seed: int = 0, **kwargs) -> np.ndarray:
  """LiRA with each of m models as the target in turn and the other m - 1 as its shadows (the
  evaluation protocol of Carlini et al. 2022).

  Args:
    stats: float [m, n] phi of every model on every example.
    is_in: bool [m, n] membership.
    online: see `lira_scores`.
    balance: online, per example and target, use as many "in" as "out" shadows
      (`balanced_shadows`, from `seed`); without it, a design with every example in half the
      models biases the AUC below 0.5 when models are few.
    seed: for the shadows `balance` drops.
    **kwargs: passed to `lira_scores`.

  Returns:
    float [m, n]: row t holds the scores against target model t (compare with `is_in[t]`).
  """
  stats, is_in = np.asarray(stats), np.asarray(is_in, bool)
  m = stats.shape[0]
  if m < 2:
    raise ValueError(f"leave-one-out LiRA needs at least 2 models, got {m}")
  rng = np.random.default_rng(seed)
  rows = []
  for t in range(m):
    others = np.r_[0:t, t + 1:m]
    # (offline LiRA reads only the "out" side)
    used = balanced_shadows(is_in[others], rng) if balance and online else None
    rows.append(np.asarray(lira_scores(stats[t], stats[others], is_in[others], online=online,
                                       shadow_used=used, **kwargs)))
  return np.stack(rows)


def rmia_marginal(probs: jax.Array, inside: jax.Array | None, *, online: bool = True,
                  offline_a: float = 0.3) -> jax.Array:
  """Pr(x), the probability of each point's label averaged over training sets, estimated from
  reference models (Zarifzadeh et al. 2024, Sec. 3; see `rmia_scores`).

  Args:
    probs: float [m, n] each reference model's softmax probability of each point's label.
    inside: bool [m, n] whether reference model m trained on point n; None: none did.
    online: use the models that trained on a point where there are any: Pr(x) =
      (mean_in + mean_out) / 2, every point being in half of the training sets. Points that no
      reference model trained on (`online=False`: every point) get the offline approximation
      Pr(x) = ((1 + a) mean_out + (1 - a)) / 2, i.e. Pr_in ~ a Pr_out + (1 - a).
    offline_a: a in [0, 1].

  Returns:
    float [n]; NaN where no reference model left the point out (nothing to average).
  """
  if not 0.0 <= offline_a <= 1.0:
    raise ValueError(f"offline_a must lie in [0, 1], got {offline_a}")
  p = jnp.asarray(probs, jnp.float32)
  inside = jnp.zeros(p.shape, bool) if inside is None else jnp.asarray(inside, bool)
  mean = lambda w: (jnp.sum(jnp.where(w, p, 0.0), 0) / jnp.maximum(w.sum(0), 1))
  n_in, n_out = inside.sum(0), (~inside).sum(0)
  mean_out = mean(~inside)
  offline = 0.5 * ((1.0 + offline_a) * mean_out + (1.0 - offline_a))
  both = 0.5 * (mean(inside) + mean_out)
  marginal = jnp.where((n_in > 0) & online, both, offline)
  return jnp.where(n_out > 0, marginal, jnp.nan)


def rmia_scores(target_probs: jax.Array, reference_probs: jax.Array,
                reference_in: jax.Array | None, population_target_probs: jax.Array,
                population_reference_probs: jax.Array,
                population_in: jax.Array | None = None, *, online: bool = True,
                offline_a: float = 0.3, gamma: float = 1.0) -> jax.Array:
  """The Robust Membership Inference Attack (RMIA) of Zarifzadeh, Liu and Shokri, "Low-Cost
  High-Power Membership Inference Attacks", ICML 2024.

  x is compared with population points z the target did not train on, through the pairwise
  likelihood ratio LR(x, z) = (Pr(x | target) / Pr(x)) / (Pr(z | target) / Pr(z)), where
  Pr(. | target) is the target's probability of the point's label and Pr(.) its average over
  training sets, from reference models (`rmia_marginal`). The score is the fraction of z with
  LR(x, z) >= gamma. For one target it ranks points as Pr(x | target) / Pr(x) does; the
  comparison with z puts different targets' scores on one scale (about uniform on [0, 1] for
  non-members).

  Args:
    target_probs: float [n] the target's probability of each point's label.
    reference_probs: float [m, n] the same under each reference model.
    reference_in: bool [m, n] whether reference model m trained on point n (None: none did).
    population_target_probs: float [k] the target's probability of each z's label.
    population_reference_probs: float [m, k] the same under each reference model.
    population_in: bool [m, k] whether reference model m trained on z (None: none did).
    online: see `rmia_marginal`.
    offline_a: a of the offline approximation (`rmia_marginal`); ML Privacy Meter uses 0.3.
    gamma: the threshold on LR(x, z), >= 1 in the paper (1 in ML Privacy Meter).

  Returns:
    float [n] in [0, 1], higher = more likely a member; NaN for points without a reference
    model that left them out. z without one are dropped from the population.
  """
  if gamma <= 0:
    raise ValueError(f"gamma must be positive, got {gamma}")
  x_t, x_ref = jnp.asarray(target_probs, jnp.float32), jnp.asarray(reference_probs, jnp.float32)
  z_t = jnp.asarray(population_target_probs, jnp.float32)
  z_ref = jnp.asarray(population_reference_probs, jnp.float32)
  if (x_ref.ndim != 2 or x_t.shape != x_ref.shape[1:] or z_ref.ndim != 2
      or z_t.shape != z_ref.shape[1:] or z_ref.shape[0] != x_ref.shape[0]):
    raise ValueError(f"expected target_probs [n], reference_probs [m, n], "
                     f"population_target_probs [k], population_reference_probs [m, k]; got "
                     f"{x_t.shape}, {x_ref.shape}, {z_t.shape}, {z_ref.shape}")
  ratio_x = x_t / rmia_marginal(x_ref, reference_in, online=online, offline_a=offline_a)
  ratio_z = z_t / rmia_marginal(z_ref, population_in, online=online, offline_a=offline_a)
  return _fraction_at_or_below(ratio_z, ratio_x / gamma)


def _fraction_at_or_below(population: jax.Array, queries: jax.Array,
                          own: jax.Array | None = None) -> jax.Array:
  """For each query q, the fraction of the finite population values v <= q (NaN queries stay
  NaN). `own`, float [queries] where queries and population are the same points: the query's
  own value in the population (NaN where it is not in it), which is left out of its count and
  its denominator (a point is not its own z)."""
  ok = jnp.isfinite(population)
  k = ok.sum().astype(jnp.float32)
  sorted_pop = jnp.sort(jnp.where(ok, population, jnp.inf))
  below = jnp.searchsorted(sorted_pop, queries, side="right").astype(jnp.float32)
  if own is not None:
    mine = jnp.isfinite(own)
    below = below - (mine & (own <= queries))
    k = k - mine
  return jnp.where(jnp.isfinite(queries), below / jnp.maximum(k, 1.0), jnp.nan)


def leave_one_out_rmia(probs: np.ndarray, is_in: np.ndarray, *, gamma: float = 1.0,
                       online: bool = True, offline_a: float = 0.3) -> np.ndarray:
  """RMIA (`rmia_scores`) with each of m models as the target in turn, the other m - 1 as its
  reference models, and as its population z (data from the members' distribution that the
  target did not train on) the pool's points that the target did not train on, each point left
  out of its own comparison.

  Args:
    probs: float [m, n] every model's probability of every point's label.
    is_in: bool [m, n] membership.
    gamma, online, offline_a: see `rmia_scores`.

  Returns:
    float [m, n]: row t holds the scores against target model t (compare with `is_in[t]`).
  """
  probs, is_in = np.asarray(probs, np.float32), np.asarray(is_in, bool)
  m = probs.shape[0]
  if m < 2:
    raise ValueError(f"leave-one-out RMIA needs at least 2 models, got {m}")
  if probs.shape != is_in.shape:
    raise ValueError(f"probs and is_in must have one shape, got {probs.shape}, {is_in.shape}")
  if gamma <= 0:
    raise ValueError(f"gamma must be positive, got {gamma}")
  rows = []
  for t in range(m):
    others = np.r_[0:t, t + 1:m]
    marginal = rmia_marginal(probs[others], is_in[others], online=online, offline_a=offline_a)
    ratio = jnp.asarray(probs[t]) / marginal
    population = jnp.where(jnp.asarray(~is_in[t]), ratio, jnp.nan)
    # a non-member is in the population: not compared with itself
    rows.append(np.asarray(_fraction_at_or_below(population, ratio / gamma, own=population)))
  return np.stack(rows)
