"""Per-example gradients and the clipped gradient sum of DP-SGD.

The clipped sum is the quantity whose sensitivity DP-SGD bounds: under add/remove-one neighbouring
datasets it changes by at most `l2_clip` (in L2). Noise is added to it in `privatize`, never after
any scaling.

Reference: Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from trustjax.types import Batch, LossFn, Params, batch_size_of

# Named scopes (`jax.named_scope`) around each part of a training step, so that a profile
# (`trustjax.profiling`) can tell the DP work from the model's own forward and backward passes.
# Metadata only: they do not change the compiled computation.
NORMS_SCOPE = "dp_norms"  # per-example squared norms, layer by layer (ghost, book-keeping)
SUM_SCOPE = "dp_clipped_sum"  # the clip-weighted sum (book-keeping, vmap) or ghost's 2nd backward
FALLBACK_SCOPE = "dp_vmap_fallback"  # per-example gradients of leaves no layer rule covers
PER_EXAMPLE_SCOPE = "dp_per_example_grads"  # the vmap method's per-example gradients and norms
NOISE_SCOPE = "dp_noise"  # the Gaussian noise on the clipped sum
OPTIMIZER_SCOPE = "optimizer"  # the optimizer update and its application

METHODS = ("auto", "vmap", "ghost", "bookkeeping")


def resolve_method(method: str) -> str:
  """"auto" -> the fastest method that supports every model: book-keeping (layers without a rule
  fall back to vmap one parameter at a time). scripts/benchmark_dp.py measures the choice."""
  if method not in METHODS:
    raise ValueError(f"unknown clipping {method=}; implemented: {METHODS}")
  return "bookkeeping" if method == "auto" else method


def _single_example(loss_fn: LossFn):
  """Turns a batched loss into a loss of one example (no batch axis)."""

  def single(params, example):
    return loss_fn(params, jax.tree_util.tree_map(lambda x: x[None], example))[0]

  return single


def per_example_grads(loss_fn: LossFn, params: Params, batch: Batch) -> Params:
  """Gradients of each example's loss; every leaf gains a leading batch axis [B, ...]."""
  batch_size_of(batch)
  return jax.vmap(jax.grad(_single_example(loss_fn)), in_axes=(None, 0))(params, batch)


def tree_sq_norms(grads: Params) -> jax.Array:
  """Squared L2 norm per example over all leaves of per-example grads `[B, ...]` -> [B] (f32)."""
  leaves = jax.tree_util.tree_leaves(grads)
  return sum(jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1)
             for g in leaves)


NORMALIZATIONS = ("clip", "auto_s")


def check_normalization(normalization: str, gamma: float) -> None:
  """Raises ValueError for an unknown normalization, or a non-positive gamma with auto_s."""
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization=}")
  if normalization == "auto_s" and not gamma > 0:
    raise ValueError(f"gamma must be positive for auto_s, got {gamma=}")


def clip_factors(norms: jax.Array, l2_clip: float, mask: jax.Array, *,
                 normalization: str = "clip", gamma: float = 0.01) -> jax.Array:
  """Per-example weights c_i of the clipped sum sum_i c_i g_i; 0 for padded rows. [B] f32.

  "clip": c = min(1, C / ||g||) (Abadi et al. 2016).
  "auto_s": c = C / (||g|| + gamma), automatic clipping (Bu et al., "Automatic Clipping:
  Differentially Private Deep Learning Made Easier and Stronger", NeurIPS 2023): every gradient
  is normalised, so C only rescales the update and needs no tuning. ||c_i g_i|| < C in both
  cases, so the sum's add/remove-one sensitivity is C.
  """
  check_normalization(normalization, gamma)
  if normalization == "clip":
    factor = jnp.where(norms > l2_clip, l2_clip / jnp.maximum(norms, 1e-30), 1.0)
  else:
    factor = l2_clip / (norms + gamma)
  return factor * mask.astype(jnp.float32)


def _factors(norms, mask, *, l2_clip, normalization, gamma):
  return clip_factors(norms, l2_clip, mask, normalization=normalization, gamma=gamma)


PER_LAYER = ("equal", "by_size")


def check_per_layer(per_layer: str | None, method: str) -> None:
  """Raises ValueError for an unknown per-layer split, or per-layer clipping with "ghost" (whose
  second backward pass can weight each example by one factor only)."""
  if per_layer is None:
    return
  if per_layer not in PER_LAYER:
    raise ValueError(f"per_layer must be one of {PER_LAYER} or None, got {per_layer=}")
  if resolve_method(method) == "ghost":
    raise ValueError("per-layer clipping needs method 'bookkeeping' or 'vmap', got 'ghost'")


def layer_groups(params: Params) -> dict:
  """{top-level module name: group index} in sorted order: the layers of per-layer clipping."""
  return {name: i for i, name in enumerate(sorted(params))}


def layer_clips(params: Params, l2_clip, split: str):
  """Per-group thresholds C_l with sum_l C_l^2 = C^2, so each example's clipped gradient has
  total norm <= sqrt(sum_l C_l^2) = C and the sum's add/remove-one sensitivity stays C.

  "equal": C_l = C / sqrt(L); "by_size": C_l = C * sqrt(d_l / D) (d_l parameters in group l).
  Returns float32 [L] in the order of `layer_groups`.

  Reference: McMahan et al., "Learning Differentially Private Recurrent Language Models",
  ICLR 2018 (per-layer clipping with sum_l C_l^2 = C^2).
  """
  if split not in PER_LAYER:
    raise ValueError(f"per_layer must be one of {PER_LAYER}, got {split=}")
  names = sorted(params)
  if split == "equal":
    w = jnp.ones(len(names), jnp.float32)
  else:
    w = jnp.asarray([sum(x.size for x in jax.tree_util.tree_leaves(params[n])) for n in names],
                    jnp.float32)
  return l2_clip * jnp.sqrt(w / w.sum())


CLIP_SCALE = "clip_scale"  # optional batch key: each row's clip is l2_clip times this (> 0)


def _chunk(loss_fn: LossFn, params: Params, batch: Batch, l2_clip: float, method: str,
           factors_fn, per_layer: str | None = None):
  group_of = layer_groups(params) if per_layer else None
  if CLIP_SCALE in batch:  # per-row clips C * s_i (group-wise clipping); the model never sees s
    batch = dict(batch)
    factors_fn = functools.partial(factors_fn, l2_clip=l2_clip * batch.pop(CLIP_SCALE))
  if method != "vmap":
    from trustjax.privacy import ghost  # pylint: disable=import-outside-toplevel
    return ghost.clipped_grad_sum_fast(loss_fn, params, batch, method=method,
                                       factors_fn=factors_fn, group_of=group_of)
  mask = batch["mask"]
  m = mask.astype(jnp.float32)
  with jax.named_scope(PER_EXAMPLE_SCOPE):
    losses, grads = jax.vmap(jax.value_and_grad(_single_example(loss_fn)), in_axes=(None, 0))(
        params, batch)
    if group_of is None:
      norms = jnp.sqrt(tree_sq_norms(grads))
      factors = factors_fn(norms, mask)
    else:
      names = sorted(group_of)
      group_sq = jnp.stack([tree_sq_norms(grads[n]) for n in names], axis=1)  # [B, L]
      norms = jnp.sqrt(group_sq.sum(1))
      factors = factors_fn(jnp.sqrt(group_sq) * m[:, None], mask[:, None])
  with jax.named_scope(SUM_SCOPE):
    if group_of is None:
      summed = jax.tree_util.tree_map(
          lambda g: jnp.einsum("b,b...->...", factors, g.astype(jnp.float32)), grads)
    else:
      summed = {n: jax.tree_util.tree_map(
          lambda g, j=group_of[n]: jnp.einsum("b,b...->...", factors[:, j],
                                              g.astype(jnp.float32)),
          grads[n]) for n in names}
  return summed, {"norms": norms * m, "losses": losses.astype(jnp.float32) * m}


def clipped_grad_sum(loss_fn: LossFn, params: Params, batch: Batch, *, l2_clip: float,
                     method: str = "auto", microbatch_size: int | None = None,
                     normalization: str = "clip", gamma: float = 0.01,
                     per_layer: str | None = None, row_clips_fn=None):
  """Sum over real rows of per-example gradients, each clipped to L2 norm `l2_clip`.

  Args:
    loss_fn: `loss_fn(params, batch) -> [B]` per-example losses.
    params: model parameters.
    batch: dict of arrays [B, ...]; `batch["mask"]` (bool [B]) marks real rows (default: all).
    l2_clip: clipping norm C > 0.
    method: "auto" (= "bookkeeping", the fastest here), "vmap" (per-example gradients by
      `jax.vmap`, the reference), "ghost" (per-example
      norms from layer inputs and output gradients, then a second backward pass on the
      clip-weighted loss) or "bookkeeping" (the clipped sum from the same recorded inputs and
      output gradients, no second backward). See `privacy.ghost` for the layer rules.
    microbatch_size: if set, the batch is processed in chunks of this many rows by `lax.scan`
      (padded with masked rows to a multiple), bounding memory to one chunk of per-example
      gradients. The result is the same sum.
    normalization: "clip" (min(1, C/||g||)) or "auto_s" (C / (||g|| + gamma)); see clip_factors.
    gamma: the AUTO-S stability constant.
    per_layer: None (one flat clip over all parameters), or "equal" / "by_size": each top-level
      layer l is clipped separately to C_l (see `layer_clips`; sum_l C_l^2 = C^2, so the
      sensitivity is still C). With methods "vmap" and "bookkeeping".

  `batch["clip_scale"]` (float [B] > 0, optional) clips row i to C * s_i instead of C, so the
  sum's sensitivity becomes C * max_i s_i (`dp_sgd.DPConfig.class_clip_scales` sets s from the
  label). Not with per_layer.

  `row_clips_fn(norms, mask) -> [B]`, if given, sets each row's clip from the whole batch's
  norms (DPSGD-F's group bounds, `dpsgd_f.group_clips`) in place of `l2_clip`; it must see the
  whole batch, so not with microbatching, per_layer or clip scales.

  Returns:
    (clipped_sum, aux): clipped_sum has the structure of `params` in float32; aux has "norms"
    [B] (unclipped per-example gradient norms) and "losses" [B], both 0 on padded rows.
  """
  if isinstance(l2_clip, (int, float)) and not l2_clip > 0:  # arrays: adaptive clipping
    raise ValueError(f"l2_clip must be positive, got {l2_clip=}")
  method = resolve_method(method)
  check_normalization(normalization, gamma)
  check_per_layer(per_layer, method)
  if per_layer and CLIP_SCALE in batch:
    raise ValueError("per-row clip scales (batch['clip_scale']) are for one flat clip, not "
                     f"per_layer={per_layer!r}")
  clip = layer_clips(params, l2_clip, per_layer) if per_layer else l2_clip
  factors_fn = functools.partial(_factors, l2_clip=clip, normalization=normalization,
                                 gamma=gamma)
  b = batch_size_of(batch)
  if row_clips_fn is not None:
    if per_layer or CLIP_SCALE in batch or (microbatch_size is not None and microbatch_size < b):
      raise ValueError("row_clips_fn needs the whole batch's norms and one flat clip: not with "
                       "microbatching, per_layer or batch['clip_scale']")
    factors_fn = lambda norms, mask: clip_factors(norms, row_clips_fn(norms, mask), mask,
                                                  normalization=normalization, gamma=gamma)
  batch = dict(batch)
  batch["mask"] = batch.get("mask", jnp.ones((b,), bool))
  if microbatch_size is None or microbatch_size >= b:
    return _chunk(loss_fn, params, batch, l2_clip, method, factors_fn, per_layer)
  if microbatch_size <= 0:
    raise ValueError(f"microbatch_size must be positive, got {microbatch_size=}")
  chunks = -(-b // microbatch_size)
  pad = chunks * microbatch_size - b

  def reshape(x):
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))  # padded rows get mask False
    return x.reshape((chunks, microbatch_size) + x.shape[1:])

  stacked = jax.tree_util.tree_map(reshape, batch)
  zero = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

  def body(acc, chunk):
    summed, aux = _chunk(loss_fn, params, chunk, l2_clip, method, factors_fn, per_layer)
    return jax.tree_util.tree_map(jnp.add, acc, summed), aux

  total, aux = jax.lax.scan(body, zero, stacked)
  # Per-example entries [chunks, m] -> [B]; per-chunk scalars (same in every chunk) -> one.
  aux = jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:])[:b] if x.ndim > 1
                               else x[0], aux)
  return total, aux


_jitted_sum = jax.jit(clipped_grad_sum, static_argnums=0, static_argnames=("l2_clip", "method"))


def check_rules(loss_fn: LossFn, params: Params, batch: Batch, *, method: str = "auto",
                rtol: float = 1e-3) -> float:
  """Checks a fast method's per-example norms against the vmap reference on `batch`.

  The layer rules of ghost clipping and book-keeping assume what `privacy.ghost` states (each
  recorded layer sees the batch on its leading axis and no layer mixes examples); a model that
  breaks an assumption the traced checks cannot see would get wrong norms, and so clipped
  gradients larger than the clip. Call this once before training on inputs that do not come
  from the private data (random ids of the same shapes: `experiments.run` does), so the check
  itself costs no privacy. Raises ValueError if any norm differs by more than `rtol` times the
  largest; returns the largest relative difference. Method "vmap" is the reference: returns 0.
  Models computing in bfloat16 round the two methods differently by up to a few percent: pass a
  looser `rtol` (0.05) for them.
  """
  method = resolve_method(method)
  if method == "vmap":
    return 0.0
  ref = _jitted_sum(loss_fn, params, batch, l2_clip=1e30, method="vmap")[1]["norms"]
  got = _jitted_sum(loss_fn, params, batch, l2_clip=1e30, method=method)[1]["norms"]
  scale = float(jnp.max(ref))
  err = float(jnp.max(jnp.abs(got - ref))) / max(scale, 1e-30)
  if not err <= rtol:  # NaN fails too
    raise ValueError(
        f"DP method {method!r} computes per-example gradient norms that differ from the vmap "
        f"reference by {err:.3g} of the largest norm (> {rtol}) on this model, so its clipping "
        f"would not bound each example's contribution: use method 'vmap' (dp.method=\"vmap\") "
        f"or make every layer see the batch on its leading axis (norms {got} vs {ref})")
  return err
