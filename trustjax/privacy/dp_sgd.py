"""DP-SGD: clipped sum -> Gaussian noise on the sum -> any optax optimizer.

The mechanism's parameters live in one frozen `DPConfig`; the step, the sampler and the ledger all
read them from there, so the numbers the accountant sees are the numbers the step used.

Reference: Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from trustjax.privacy import accounting, dpsgd_f, quantile, sampling
from trustjax.privacy.clipping import (METHODS, NOISE_SCOPE, OPTIMIZER_SCOPE,
                                       check_normalization, check_per_layer, clipped_grad_sum)
from trustjax.privacy.noise import privatize
from trustjax.types import Batch, LossFn, Params, PRNGKey


def check_mechanism_fields(config) -> None:
  """Raises ValueError naming the first bad field that DPConfig and DPFTRLConfig share: the
  clip, the noise, the dataset size and how the clipped sum is computed."""
  if not config.l2_clip > 0:
    raise ValueError(f"l2_clip must be positive, got l2_clip={config.l2_clip}")
  if not config.noise_multiplier >= 0:
    raise ValueError(f"noise_multiplier must be >= 0, got "
                     f"noise_multiplier={config.noise_multiplier}")
  if config.num_examples <= 0:
    raise ValueError(f"num_examples must be positive (empty dataset?), got "
                     f"num_examples={config.num_examples}")
  if config.method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got method={config.method!r}")
  check_normalization(config.normalization, config.auto_s_gamma)
  if not config.auto_s_gamma > 0:
    raise ValueError(f"auto_s_gamma must be positive, got auto_s_gamma={config.auto_s_gamma}")
  if config.microbatch_size is not None and config.microbatch_size <= 0:
    raise ValueError(f"microbatch_size must be positive, got "
                     f"microbatch_size={config.microbatch_size}")
  check_per_layer(config.per_layer, config.method)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPConfig:
  """The DP-SGD mechanism.

  Attributes:
    l2_clip: per-example clipping norm C (the sum's L2 sensitivity under add/remove-one).
    noise_multiplier: sigma; noise std on the clipped sum is sigma * C.
    sampling_rate: Poisson sampling probability q.
    num_examples: N, the training-set size (expected batch size = q * N).
    max_batch_size: static padded batch size for Poisson batches (see privacy.sampling).
    method: clipping method (see clipping.clipped_grad_sum); "auto" = book-keeping.
    microbatch_size: rows per chunk when computing the clipped sum (bounds memory).
    normalization: "clip" (min(1, C/||g||)) or "auto_s" (C / (||g|| + gamma), Bu et al. 2023);
      both bound each example's contribution by C, so the accounting is the same.
    auto_s_gamma: gamma of AUTO-S.
    per_layer: None, "equal" or "by_size": clip each top-level layer separately with thresholds
      C_l, sum_l C_l^2 = C^2 (clipping.layer_clips); the sensitivity stays C.
    adaptive: optional `quantile.QuantileClipping`: the clip norm follows a private estimate of a
      quantile of the per-example norms (Andrew et al. 2021) and is state (`dp_sgd_step_adaptive`);
      `noise_multiplier` is then the effective multiplier of the sum and the count together, the
      one the ledger records, and the sum's own noise is raised to
      `sum_noise_multiplier` accordingly. `l2_clip` is ignored in favour of adaptive.initial_clip.
    class_clip_scales: optional s_k > 0 per class (group-wise clipping): an example of class k
      (its `batch["label"]`) is clipped to C * s_k, and the noise is sigma * C * max_k s_k,
      the sum's sensitivity (`sensitivity`), so the accounting is unchanged. The scales must
      not depend on the private data (a public class prior, or chosen beforehand): a class given
      s_k > 1 keeps more of its clipped gradients, at the price of more noise for every class.
      A fixed-bound form of DPSGD-F (Xu, Du and Wu, "Removing Disparate Impact on Model Accuracy
      in Differentially Private Stochastic Gradient Descent", KDD 2021), whose group bounds
      adapt through private counts of clipped examples; not with per_layer or adaptive.
    group_adaptive: optional `dpsgd_f.GroupAdaptiveClipping`: DPSGD-F itself (Xu et al. 2021),
      each class's bound set every step from noisy counts of its clipped and unclipped
      examples; `noise_multiplier` is then the effective multiplier of the counts and the sum
      together (the ledger's), and the sum's own is `sum_noise_multiplier`. With the "clip"
      normalization and a whole batch at once (no microbatching, per_layer, adaptive or scales).
  """

  l2_clip: float
  noise_multiplier: float
  sampling_rate: float
  num_examples: int
  max_batch_size: int
  method: str = "auto"
  microbatch_size: int | None = None
  normalization: str = "clip"
  auto_s_gamma: float = 0.01
  per_layer: str | None = None
  adaptive: quantile.QuantileClipping | None = None
  class_clip_scales: tuple[float, ...] | None = None
  group_adaptive: dpsgd_f.GroupAdaptiveClipping | None = None

  def __post_init__(self):
    check_mechanism_fields(self)
    if self.group_adaptive is not None and (
        self.adaptive is not None or self.class_clip_scales is not None or self.per_layer
        or self.microbatch_size is not None or self.normalization != "clip"):
      raise ValueError("group_adaptive (DPSGD-F) clips the whole batch at once with the 'clip' "
                       "normalization: not with adaptive, class_clip_scales, per_layer or "
                       "microbatch_size")
    if self.class_clip_scales is not None:
      scales = tuple(float(x) for x in self.class_clip_scales)
      if not scales or not all(x > 0 and math.isfinite(x) for x in scales):
        raise ValueError(
            f"class_clip_scales must be positive numbers, got {self.class_clip_scales}")
      if self.per_layer is not None or self.adaptive is not None:
        raise ValueError("class_clip_scales is for one fixed flat clip: not with per_layer or "
                         "adaptive")
      object.__setattr__(self, "class_clip_scales", scales)
    if not 0.0 < self.sampling_rate <= 1.0:
      raise ValueError(f"sampling_rate must lie in (0, 1], got sampling_rate={self.sampling_rate}")
    if self.max_batch_size <= 0:
      raise ValueError(f"max_batch_size must be positive, got max_batch_size={self.max_batch_size}")
    if self.adaptive is not None or self.group_adaptive is not None:
      self.sum_noise_multiplier  # pylint: disable=pointless-statement  (validates the split)

  @property
  def sum_noise_multiplier(self) -> float:
    """The noise multiplier applied to the clipped sum (raised when the clip is adaptive or
    DPSGD-F's counts are released too)."""
    if self.group_adaptive is not None:
      return dpsgd_f.sum_noise_multiplier(self.noise_multiplier,
                                          self.group_adaptive.count_noise_multiplier)
    if self.adaptive is None:
      return self.noise_multiplier
    return quantile.sum_noise_multiplier(self.noise_multiplier,
                                         self.adaptive.count_noise_multiplier)

  @property
  def sensitivity(self) -> float:
    """The clipped sum's add/remove-one L2 sensitivity: C, or C * max_k s_k with class scales."""
    return self.l2_clip * max(self.class_clip_scales or (1.0,))

  @property
  def expected_batch_size(self) -> float:
    return self.sampling_rate * self.num_examples

  @property
  def overflow_probability(self) -> float:
    return sampling.overflow_probability(self.num_examples, self.sampling_rate, self.max_batch_size)

  def batch(self, seed: int, step: int) -> sampling.PoissonBatch:
    """Step `step`'s Poisson sample (`sampling.poisson_batch`)."""
    return sampling.poisson_batch(seed, step, self.num_examples, self.sampling_rate,
                                  self.max_batch_size)

  def record(self, ledger: accounting.PrivacyLedger, steps: int = 1) -> None:
    """Records `steps` steps of this mechanism in `ledger`."""
    ledger.record(noise_multiplier=self.noise_multiplier, sampling_rate=self.sampling_rate,
                  steps=steps, overflow_probability=self.overflow_probability)


def _row_scales(config, batch: Batch):
  """Each row's clip scale from its label under group-wise clipping, else None."""
  scales = getattr(config, "class_clip_scales", None)  # DP-SGD's only (DPFTRLConfig lacks it)
  return None if scales is None else jnp.asarray(scales, jnp.float32)[batch["label"]]


def _row_clips(config, batch: Batch):
  """The clip each row of `batch` is held to: C, or C * s_(label) (for the "clipped" count)."""
  scales = _row_scales(config, batch)
  return config.l2_clip if scales is None else config.l2_clip * scales


def _clipped_sum(loss_fn: LossFn, params: Params, batch: Batch, config: DPConfig, clip=None):
  scales = _row_scales(config, batch)
  if scales is not None:
    batch = dict(batch, clip_scale=scales)
  return clipped_grad_sum(loss_fn, params, batch,
                          l2_clip=config.l2_clip if clip is None else clip, method=config.method,
                          microbatch_size=config.microbatch_size,
                          normalization=config.normalization, gamma=config.auto_s_gamma,
                          per_layer=config.per_layer)


def _noisy_update(grad_sum: Params, key: PRNGKey, params: Params, opt_state: optax.OptState, *,
                  l2_clip, noise_multiplier: float, optimizer: optax.GradientTransformation,
                  config: DPConfig):
  """Noise on the clipped sum (privatize), then one optimizer step. Returns (params, opt_state)."""
  with jax.named_scope(NOISE_SCOPE):
    grads = privatize(grad_sum, key, l2_clip=l2_clip, noise_multiplier=noise_multiplier,
                      expected_batch_size=config.expected_batch_size)
  with jax.named_scope(OPTIMIZER_SCOPE):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _metrics(aux: dict, mask: jax.Array, l2_clip: float) -> dict:
  m = mask.astype(jnp.float32)
  return {"loss_sum": aux["losses"].sum(), "count": m.sum(),
          "clipped": ((aux["norms"] > l2_clip) * m).sum(), "norm_sum": aux["norms"].sum()}


def dp_sgd_step(params: Params, opt_state: optax.OptState, batch: Batch, key: PRNGKey, *,
                loss_fn: LossFn, optimizer: optax.GradientTransformation, config: DPConfig):
  """One DP-SGD step on a (Poisson-sampled, padded) batch.

  Args:
    params, opt_state: current parameters and optimizer state.
    batch: dict of arrays [max_batch_size, ...] with "mask".
    key: PRNG key for this step's noise (fold the step number in; never reuse).
    loss_fn: per-example loss.
    optimizer: any optax transformation; it receives the privatized mean gradient.
    config: the mechanism.

  Returns:
    (params, opt_state, metrics) with metrics as sums: loss_sum, count, clipped, norm_sum; with
    DPSGD-F also "clip", the step's largest bound (a function of the released counts).
  """
  if config.adaptive is not None:
    raise ValueError("config.adaptive is set: use dp_sgd_step_adaptive, which carries the clip")
  if config.group_adaptive is not None:
    return _dpsgd_f_step(params, opt_state, batch, key, loss_fn=loss_fn, optimizer=optimizer,
                         config=config)
  grad_sum, aux = _clipped_sum(loss_fn, params, batch, config)
  params, opt_state = _noisy_update(grad_sum, key, params, opt_state, l2_clip=config.sensitivity,
                                    noise_multiplier=config.noise_multiplier,
                                    optimizer=optimizer, config=config)
  return params, opt_state, _metrics(aux, batch["mask"], _row_clips(config, batch))


def _dpsgd_f_step(params, opt_state, batch, key, *, loss_fn, optimizer, config: DPConfig):
  """DPSGD-F (dpsgd_f): the bounds from this batch's noisy counts, the sum clipped to them, noise
  at the largest bound. The group bounds that the clipping used are the ones kept for the noise
  (not recomputed, so no rounding can make the two differ)."""
  k_sum, k_count = jax.random.split(key)
  used = []

  def row_clips(norms, mask):  # called once, in this trace, by the clipped sum
    row, group = dpsgd_f.group_clips(norms, batch["label"], mask, k_count, l2_clip=config.l2_clip,
                                     config=config.group_adaptive)
    used.append(group)
    return row

  grad_sum, aux = clipped_grad_sum(loss_fn, params, batch, l2_clip=config.l2_clip,
                                   method=config.method, row_clips_fn=row_clips)
  (group,) = used
  row = group[batch["label"]]
  params, opt_state = _noisy_update(grad_sum, k_sum, params, opt_state, l2_clip=jnp.max(group),
                                    noise_multiplier=config.sum_noise_multiplier,
                                    optimizer=optimizer, config=config)
  metrics = _metrics(aux, batch["mask"], row)
  metrics["clip"] = jnp.max(group)  # the largest bound, which the noise is at (a release)
  return params, opt_state, metrics


def dp_sgd_step_adaptive(params: Params, opt_state: optax.OptState, clip: jax.Array, batch: Batch,
                         key: PRNGKey, *, loss_fn: LossFn, optimizer: optax.GradientTransformation,
                         config: DPConfig):
  """DP-SGD with adaptive quantile clipping (Andrew et al., NeurIPS 2021).

  The batch's gradients are clipped to the current `clip`; the sum gets noise with multiplier
  `config.sum_noise_multiplier`; the fraction of norms <= clip is released with noise
  (quantile.update_clip) and moves the clip for the next step. Sum and count together cost one
  Gaussian mechanism with multiplier `config.noise_multiplier`, which `config.record` puts in the
  ledger, so the reported epsilon includes the clip's estimate.

  Returns:
    (params, opt_state, next clip, metrics) with metrics as in dp_sgd_step plus "clip" (the
    clip used this step) and "unclipped_fraction" (the noisy estimate).
  """
  if config.adaptive is None:
    raise ValueError("dp_sgd_step_adaptive needs config.adaptive (a QuantileClipping)")
  k_sum, k_count = jax.random.split(key)
  grad_sum, aux = _clipped_sum(loss_fn, params, batch, config, clip)
  params, opt_state = _noisy_update(grad_sum, k_sum, params, opt_state, l2_clip=clip,
                                    noise_multiplier=config.sum_noise_multiplier,
                                    optimizer=optimizer, config=config)
  new_clip, frac = quantile.update_clip(clip, aux["norms"], batch["mask"], k_count,
                                        expected_count=config.expected_batch_size,
                                        config=config.adaptive)
  metrics = _metrics(aux, batch["mask"], clip)
  metrics.update(clip=clip, unclipped_fraction=frac)
  return params, opt_state, new_clip, metrics


class VirtualBatch(NamedTuple):
  """Accumulator of a logical batch split over physical batches."""

  grad_sum: Params  # float32, structure of params: the running clipped sum
  metrics: dict  # running metric sums


def virtual_batch_init(params: Params) -> VirtualBatch:
  zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  z = jnp.zeros((), jnp.float32)
  return VirtualBatch(zeros, {"loss_sum": z, "count": z, "clipped": z, "norm_sum": z})


def virtual_batch_accumulate(acc: VirtualBatch, params: Params, batch: Batch, *,
                             loss_fn: LossFn, config: DPConfig) -> VirtualBatch:
  """Adds one physical batch's clipped sum; no noise yet."""
  if config.group_adaptive is not None or config.adaptive is not None:
    raise ValueError("virtual batches clip to the fixed clip norm: not with adaptive or "
                     "group_adaptive (their clips come from the whole logical batch)")
  grad_sum, aux = _clipped_sum(loss_fn, params, batch, config)
  metrics = _metrics(aux, batch["mask"], _row_clips(config, batch))
  return VirtualBatch(jax.tree_util.tree_map(jnp.add, acc.grad_sum, grad_sum),
                      jax.tree_util.tree_map(jnp.add, acc.metrics, metrics))


def virtual_batch_apply(acc: VirtualBatch, params: Params, opt_state: optax.OptState,
                        key: PRNGKey, *, optimizer: optax.GradientTransformation,
                        config: DPConfig):
  """Adds noise ONCE to the logical batch's clipped sum and applies the update.

  The physical batches of one logical step must together be one Poisson sample (for example the
  rows of one `poisson_batch` split into chunks), and the ledger records one step.
  """
  params, opt_state = _noisy_update(acc.grad_sum, key, params, opt_state,
                                    l2_clip=config.sensitivity,
                                    noise_multiplier=config.noise_multiplier,
                                    optimizer=optimizer, config=config)
  return params, opt_state, acc.metrics
