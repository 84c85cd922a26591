"""Adaptive clipping: the clip norm follows a private estimate of a quantile of the norms.

Each round the fraction of norms at most the current clip C is released with Gaussian noise, and
C moves geometrically towards the target quantile gamma:
    b = (sum_i mask_i * (1[||x_i|| <= C] - 1/2) + N(0, sigma_b^2)) / expected_count + 1/2
    C <- max(C_min, C * exp(-eta * (b - gamma))).
The centred indicators have sensitivity 1/2 under add/remove-one, so the count release is a
Gaussian mechanism with noise multiplier 2 sigma_b. Released together with the clipped sum (noise
multiplier sigma_sum), the pair costs as much as one Gaussian mechanism with
    sigma_eff = (sigma_sum^-2 + (2 sigma_b)^-2)^(-1/2),
so for a target sigma_eff the sum gets sigma_sum = (sigma_eff^-2 - (2 sigma_b)^-2)^(-1/2), and the
ledger records sigma_eff: the count's privacy cost is in the reported epsilon.

The floor C_min (0 by default: Andrew et al.'s unbounded update) is bounded adaptive clipping
(Zhao, Rehn, Heikkila, Tajeddine and Honkela 2025): a quantile of the norms that the majority's
well-fitted examples drive towards 0 would otherwise suppress the few large gradients of a
minority or a hard class. Taking the maximum with a public constant is post-processing of the
released count: it costs no privacy.

References: Andrew et al., "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021
(Algorithm 1 and Theorem 1); Zhao et al., "Mitigating Disparate Impact of Differentially Private
Learning through Bounded Adaptive Clipping", arXiv:2506.01396 (2025).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from trustjax.types import PRNGKey


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantileClipping:
  """Adaptive clipping settings.

  Attributes:
    target_quantile: gamma in (0, 1): fraction of norms the clip should exceed.
    learning_rate: eta > 0 of the geometric update.
    count_noise_multiplier: sigma_b > 0, std of the noise on the count.
    initial_clip: C at step 0.
    min_clip: C_min >= 0, the floor of bounded adaptive clipping (0: unbounded).
  """

  target_quantile: float = 0.5
  learning_rate: float = 0.2
  count_noise_multiplier: float = 1.0
  initial_clip: float = 0.1
  min_clip: float = 0.0

  def __post_init__(self):
    if not 0.0 < self.target_quantile < 1.0:
      raise ValueError(f"target_quantile must lie in (0, 1), got {self.target_quantile=}")
    for name in ("learning_rate", "count_noise_multiplier", "initial_clip"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name} must be positive, got {name}={getattr(self, name)}")
    if not 0.0 <= self.min_clip <= self.initial_clip:
      raise ValueError(f"min_clip must lie in [0, initial_clip={self.initial_clip}], got "
                       f"min_clip={self.min_clip}")


def from_config(cfg) -> QuantileClipping:
  """QuantileClipping from a config node with target_quantile, clip_learning_rate,
  count_noise_multiplier, l2_clip (the initial clip) and min_clip: the `dp` node of both
  drivers."""
  return QuantileClipping(target_quantile=cfg.target_quantile,
                          learning_rate=cfg.clip_learning_rate,
                          count_noise_multiplier=cfg.count_noise_multiplier,
                          initial_clip=cfg.l2_clip, min_clip=cfg.min_clip)


def sum_noise_multiplier(effective: float, count_noise_multiplier: float) -> float:
  """sigma_sum such that (sigma_sum, sigma_b) together cost one Gaussian with `effective`."""
  if not effective > 0:
    raise ValueError(f"adaptive clipping needs a positive noise multiplier, got {effective=}")
  rest = effective ** -2 - (2.0 * count_noise_multiplier) ** -2
  if rest <= 0:
    raise ValueError(
        f"count_noise_multiplier={count_noise_multiplier} is too small for noise_multiplier="
        f"{effective}: need 2 * count_noise_multiplier > noise_multiplier")
  return rest ** -0.5


def effective_noise_multiplier(sum_multiplier: float, count_noise_multiplier: float) -> float:
  """Inverse of `sum_noise_multiplier`."""
  return (sum_multiplier ** -2 + (2.0 * count_noise_multiplier) ** -2) ** -0.5


def update_clip(clip: jax.Array, norms: jax.Array, mask: jax.Array, key: PRNGKey, *,
                expected_count: float, config: QuantileClipping) -> tuple[jax.Array, jax.Array]:
  """One private quantile step. Returns (new clip, noisy unclipped fraction b).

  Args:
    clip: current C (scalar f32).
    norms: [B] norms of the contributions (per example or per client).
    mask: [B] 1 for real contributions, 0 for padding.
    key: PRNG key (used once).
    expected_count: q * N, the public denominator.
    config: QuantileClipping.
  """
  mask = mask.astype(jnp.float32)
  below = (norms <= clip).astype(jnp.float32) - 0.5
  noisy = jnp.sum(mask * below) + config.count_noise_multiplier * jax.random.normal(key, ())
  frac = noisy / expected_count + 0.5
  new_clip = clip * jnp.exp(-config.learning_rate * (frac - config.target_quantile))
  new_clip = jnp.maximum(new_clip, config.min_clip)  # bounded adaptive clipping (0: no floor)
  return new_clip.astype(jnp.float32), frac


def check_expected_count(expected_count: float) -> None:
  if not (expected_count > 0 and math.isfinite(expected_count)):
    raise ValueError(f"expected_count must be positive, got {expected_count=}")
