"""DPSGD-F: each group's clip bound grows with the share of its examples that the base clip cuts.

Each step, for every group k (here: every class, the example's label) the batch's examples whose
gradient norm exceeds the base clip C0 (m_k) and those within it (o_k) are counted and released
with Gaussian noise of std sigma_1 (rounded down, at least 0). With the noisy counts,
    r_k = m_k / (m_k + o_k)   (1 when the group's noisy count is 0),
    C_k = C0 * (1 + r_k / mean_j r_j),
and each example of group k is clipped to C_k. A group whose gradients the base clip cuts more
often than the average group's gets a larger bound, so clipping biases it less. The clipped sum's
add/remove-one sensitivity is max_k C_k, so its noise is sigma_2 * max_k C_k.

Privacy: the count vector (m_1, o_1, ..., m_K, o_K) changes by one in one entry when one example is
added or removed: a Gaussian mechanism with noise multiplier sigma_1. The clipped sum, given the
released bounds, is a Gaussian mechanism with multiplier sigma_2. Released on the same Poisson
sample, the pair composes (adaptively) into one Gaussian mechanism with
    sigma_eff = (sigma_1^-2 + sigma_2^-2)^(-1/2),
which the ledger records, so the counts' cost is in the reported epsilon (the argument of
`quantile`'s adaptive clipping, Andrew et al. 2021, Theorem 1). For a target sigma_eff the sum
gets sigma_2 = (sigma_eff^-2 - sigma_1^-2)^(-1/2).

Reference: Xu, Du and Wu, "Removing Disparate Impact on Model Accuracy in Differentially Private
Stochastic Gradient Descent", KDD 2021 (Algorithm 1, DPSGD-F); the rule above follows Esipova et
al.'s public reimplementation for "Disparate Impact in Differential Privacy from Gradient
Misalignment" (ICLR 2023), which releases both counts of each group.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from trustjax.types import PRNGKey


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupAdaptiveClipping:
  """DPSGD-F settings.

  Attributes:
    num_groups: K, the groups (the classes: an example's group is its label).
    count_noise_multiplier: sigma_1 > 0, the std of the noise on each count.
  """

  num_groups: int
  count_noise_multiplier: float = 10.0

  def __post_init__(self):
    if self.num_groups < 1:
      raise ValueError(f"num_groups must be >= 1, got {self.num_groups}")
    if not self.count_noise_multiplier > 0:
      raise ValueError(f"count_noise_multiplier must be positive, got "
                       f"{self.count_noise_multiplier}")


def sum_noise_multiplier(effective: float, count_noise_multiplier: float) -> float:
  """sigma_2 such that the counts (sigma_1) and the sum (sigma_2) cost one Gaussian with
  multiplier `effective`."""
  if not effective > 0:
    raise ValueError(f"DPSGD-F needs a positive noise multiplier, got {effective=}")
  rest = effective ** -2 - count_noise_multiplier ** -2
  if rest <= 0:
    raise ValueError(f"count_noise_multiplier={count_noise_multiplier} is too small for "
                     f"noise_multiplier={effective}: it must exceed it")
  return rest ** -0.5


def group_clips(norms: jax.Array, groups: jax.Array, mask: jax.Array, key: PRNGKey, *,
                l2_clip: float, config: GroupAdaptiveClipping) -> tuple[jax.Array, jax.Array]:
  """The step's bounds from noisy counts. Returns (each row's bound [B], each group's [K]).

  Args:
    norms: [B] per-example gradient norms.
    groups: [B] int group ids in [0, K).
    mask: [B] 1 for real rows; padding is not counted.
    key: PRNG key of the counts' noise (the same key gives the same bounds).
    l2_clip: C0, the base clip.
    config: the settings.
  """
  real = mask.astype(bool)
  onehot = jax.nn.one_hot(groups, config.num_groups, dtype=jnp.float32)  # [B, K]
  over = jnp.where(real & (norms > l2_clip), 1.0, 0.0) @ onehot
  within = jnp.where(real & (norms <= l2_clip), 1.0, 0.0) @ onehot
  noise = config.count_noise_multiplier * jax.random.normal(key, (2, config.num_groups))
  over = jnp.maximum(jnp.floor(over + noise[0]), 0.0)
  within = jnp.maximum(jnp.floor(within + noise[1]), 0.0)
  total = over + within
  share = jnp.where(total > 0, over / jnp.maximum(total, 1.0), 1.0)
  bounds = l2_clip * (1.0 + share / (jnp.mean(share) + 1e-8))
  return bounds[groups], bounds
