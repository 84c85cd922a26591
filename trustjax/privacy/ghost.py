"""Per-example gradient norms and clipped sums without per-example gradients.

For a layer y = f(x; w), the gradient of example i's loss with respect to w is a function of that
example's layer input a_i and output gradient g_i = dL_i/dy_i. Both come out of one ordinary
forward and backward pass over the batch: inputs are recorded by intercepting the layer's
`__call__` (`flax.linen.intercept_methods`, so the model is not rewritten) and output gradients
are the gradients with respect to a zero "tap" added to each layer's output. Rules:

- Dense / DenseGeneral (T positions per example, I inputs, O outputs):
  ||dW_i||^2 = sum_{t,s} (a_t . a_s)(g_t . g_s)  (Gram form, O(T^2 (I + O)))  or
  ||a_i^T g_i||_F^2 (direct form, O(T I O)), whichever is cheaper; bias: ||sum_t g_t||^2.
- Embed: ||dE_i||^2 = sum_{t,s} [id_t == id_s] (g_t . g_s).
- LayerNorm: scale: ||sum_t g_t * xhat_t||^2; bias: ||sum_t g_t||^2.

A parameter whose module has no rule, or whose module is called more than once per forward pass
(so its gradient sums several calls), falls back to vmapped per-example gradients for those
parameters only.

Methods:
- "ghost": norms as above, then a second backward pass on sum_i c_i L_i (c_i the clip factors).
- "bookkeeping": the clipped sum from the same recorded inputs and output gradients, one weighted
  product per layer (sum_i c_i a_i^T g_i), no second backward pass.

References:
  Goodfellow, "Efficient Per-Example Gradient Computations", 2015 (the norm identity);
  Li et al., "Large Language Models Can Be Strong Differentially Private Learners", ICLR 2022
  (ghost clipping for sequences);
  Bu et al., "Differentially Private Optimization on Large Model at Small Cost", ICML 2023
  (book-keeping).
"""

from __future__ import annotations

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp

import kernels

from trustjax.privacy.clipping import FALLBACK_SCOPE, NORMS_SCOPE, SUM_SCOPE
from trustjax.types import Batch, LossFn, Params

_RULES = (nn.Dense, nn.DenseGeneral, nn.Embed, nn.LayerNorm)


def _normalize_axes(axis, ndim):
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(a % ndim for a in axis)


class _Tap:
  """What one intercepted layer call recorded: kind, module path, input, extra, output shape."""

  def __init__(self, kind, path, module, x, out_shape, extra=None):
    self.kind, self.path, self.module, self.x = kind, path, module, x
    self.out_shape, self.extra = out_shape, extra


def _make_interceptor(taps: list, perturb: dict | None):
  counts = collections.Counter()

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name != "__call__" or not isinstance(mod, _RULES):
      return next_fun(*args, **kwargs)
    path = tuple(mod.path)
    counts[path] += 1
    y = next_fun(*args, **kwargs)
    x = args[0] if args else next(iter(kwargs.values()))
    extra = None
    if isinstance(mod, nn.LayerNorm):
      if mod.reduction_axes not in (-1, (-1,)) or mod.feature_axes not in (-1, (-1,)):
        kind = "unsupported"
      else:
        kind = "layernorm"
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.maximum((xf * xf).mean(-1, keepdims=True) - mean * mean, 0.0)
        extra = (xf - mean) * jax.lax.rsqrt(var + mod.epsilon)
    elif isinstance(mod, nn.Embed):
      kind = "embed"
    elif isinstance(mod, nn.DenseGeneral):
      kind = "dense_general" if not mod.batch_dims else "unsupported"
    else:
      kind = "dense"
    taps.append(_Tap(kind, path, mod, x, y.shape, extra))
    key = _tap_key(path, counts[path])
    if perturb is not None and key in perturb:
      y = y + perturb[key].astype(y.dtype)
    return y

  return interceptor


def _tap_key(path, call_number):
  """The key of the `call_number`-th call (from 1) of the module at `path` in one forward pass."""
  return f"{'/'.join(path)}#{call_number}"


def _keys(taps):
  seen = collections.Counter()
  keys = []
  for t in taps:
    seen[t.path] += 1
    keys.append(_tap_key(t.path, seen[t.path]))
  return keys


def _dense_ops(tap, g):
  """(a [B, T, I], g [B, T, O]) for a Dense/DenseGeneral call with output gradient g."""
  x = tap.x
  b = x.shape[0]
  if tap.kind == "dense":
    contract = (x.ndim - 1,)
    feat_nd = 1
  else:
    contract = _normalize_axes(tap.module.axis, x.ndim)
    feats = tap.module.features
    feat_nd = 1 if isinstance(feats, int) else len(feats)
  if 0 in contract:
    return None
  keep = [d for d in range(1, x.ndim) if d not in contract]
  a = jnp.transpose(x, (0, *keep, *contract))
  n_in = 1
  for d in contract:
    n_in *= x.shape[d]
  a = a.reshape(b, -1, n_in)
  n_out = 1
  for d in g.shape[g.ndim - feat_nd:]:
    n_out *= d
  return a.astype(jnp.float32), g.reshape(b, -1, n_out).astype(jnp.float32)


def _pairwise_sq_norm(a, g):
  """sum_{t,s} (a_t.a_s)(g_t.g_s) per example, or ||a^T g||^2 directly if cheaper. [B]"""
  _, t, i = a.shape
  o = g.shape[-1]
  if t * t * (i + o) <= t * i * o:
    return jnp.einsum("bts,bts->b", jnp.einsum("bti,bsi->bts", a, a),
                      jnp.einsum("bto,bso->bts", g, g))
  return kernels.seq_dense_sq_norms(a, g)  # Pallas on GPU/TPU, the same einsum on CPU


def _layer_terms(tap, g):
  """Per-example squared norms {param_name: [B]} of one intercepted call, or None."""
  b = g.shape[0]
  if tap.kind in ("dense", "dense_general"):
    ops = _dense_ops(tap, g)
    if ops is None:
      return None
    a, gg = ops
    out = {"kernel": _pairwise_sq_norm(a, gg)}
    if tap.module.use_bias:
      out["bias"] = jnp.sum(jnp.square(gg.sum(1)), axis=-1)
    return out
  if tap.kind == "embed":
    ids = tap.x.reshape(b, -1)
    gg = g.reshape(b, ids.shape[1], -1).astype(jnp.float32)
    same = (ids[:, :, None] == ids[:, None, :]).astype(jnp.float32)
    return {"embedding": jnp.einsum("bts,bts->b", same, jnp.einsum("btd,bsd->bts", gg, gg))}
  if tap.kind == "layernorm":
    d = g.shape[-1]
    gg = g.reshape(b, -1, d).astype(jnp.float32)
    xh = tap.extra.reshape(b, -1, d)
    out = {}
    if tap.module.use_scale:
      out["scale"] = jnp.sum(jnp.square((gg * xh).sum(1)), axis=-1)
    if tap.module.use_bias:
      out["bias"] = jnp.sum(jnp.square(gg.sum(1)), axis=-1)
    return out
  return None


def _layer_clipped_sum(tap, g, c, layer_params):
  """sum_i c_i * (example i's gradient) for each parameter of one intercepted call."""
  b = g.shape[0]
  if tap.kind in ("dense", "dense_general"):
    a, gg = _dense_ops(tap, g)
    kshape = layer_params["kernel"].shape
    out = {"kernel": kernels.weighted_outer_sum(a, gg, c).reshape(kshape)}
    if tap.module.use_bias:
      bshape = layer_params["bias"].shape
      out["bias"] = jnp.einsum("bto,b->o", gg, c).reshape(bshape)
    return out
  if tap.kind == "embed":
    ids = tap.x.reshape(-1)
    gg = (g.reshape(b, -1, g.shape[-1]).astype(jnp.float32) * c[:, None, None]).reshape(
        -1, g.shape[-1])
    return {"embedding": jax.ops.segment_sum(gg, ids, num_segments=tap.module.num_embeddings)}
  d = g.shape[-1]
  gg = g.reshape(b, -1, d).astype(jnp.float32)
  xh = tap.extra.reshape(b, -1, d)
  out = {}
  if tap.module.use_scale:
    out["scale"] = jnp.einsum("btd,b->d", gg * xh, c)
  if tap.module.use_bias:
    out["bias"] = jnp.einsum("btd,b->d", gg, c)
  return out


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _leaf_paths(tree, prefix=()):
  if hasattr(tree, "items"):
    return [q for k, v in tree.items() for q in _leaf_paths(v, prefix + (k,))]
  return [prefix]


def _copy(tree):
  """A copy of the nested-dict structure (leaves shared), safe to assign into."""
  return {k: _copy(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def _set(tree, path, value):
  _get(tree, path[:-1])[path[-1]] = value


def clipped_grad_sum_fast(loss_fn: LossFn, params: Params, batch: Batch, *, method: str,
                          factors_fn, group_of: dict | None = None):
  """The clipped sum by "ghost" or "bookkeeping" (see the module docstring).

  Called by `clipping.clipped_grad_sum`, which supplies `factors_fn(norms, mask) -> c` (the
  clipping rule). With `group_of` (top-level module name -> group index; per-layer clipping,
  book-keeping only, checked by the caller) norms and factors are [B, groups] and each layer is
  weighted by its group's factor. Same contract: returns (clipped_sum, {"norms", "losses",
  "vmap_fallback_leaves"}), padded rows contribute nothing; the last counts the parameter leaves
  no rule covered (their per-example gradients came from vmap). Assumes each example's loss
  depends only on that example's inputs (no cross-example layers such as batch norm), and that
  every intercepted layer's input has the batch as its leading axis.
  """
  mask = batch["mask"].astype(jnp.float32)
  b = mask.shape[0]

  # 1) Discover which layers are called, and their output shapes, by abstract evaluation.
  shape_taps: list = []

  def discover(p):
    with nn.intercept_methods(_make_interceptor(shape_taps, None)):
      return loss_fn(p, batch)

  jax.eval_shape(discover, params)
  keys = _keys(shape_taps)
  calls = collections.Counter(t.path for t in shape_taps)
  zeros = {k: jnp.zeros(t.out_shape, jnp.float32) for k, t in zip(keys, shape_taps)
           if t.kind != "unsupported" and calls[t.path] == 1 and t.out_shape[:1] == (b,)}

  # 2) One forward/backward: losses, recorded inputs, and output gradients at the taps.
  meta: list = []  # the taps' static metadata; their arrays leave the trace through aux

  def tapped(z):
    taps = []
    with nn.intercept_methods(_make_interceptor(taps, z)):
      losses = loss_fn(params, batch).astype(jnp.float32)
    meta[:] = taps
    return jnp.sum(losses * mask), (losses, [(t.x, t.extra) for t in taps])

  out_grads, (losses, arrays) = jax.grad(tapped, has_aux=True)(zeros)
  taps = [_Tap(t.kind, t.path, t.module, x, t.out_shape, extra)
          for t, (x, extra) in zip(meta, arrays)]
  by_key = dict(zip(_keys(taps), taps))

  # 3) Per-example squared norms, rule by rule; which params each rule covered.
  num_groups = 1 if group_of is None else max(group_of.values()) + 1
  gid = (lambda path: 0) if group_of is None else (lambda path: group_of[path[0]])
  sq = jnp.zeros((b, num_groups), jnp.float32)
  covered = set()
  terms = {}
  for key, g in out_grads.items():
    tap = by_key[key]
    with jax.named_scope(f"{NORMS_SCOPE}/{'/'.join(tap.path)}"):
      t = _layer_terms(tap, g)
    if t is None:
      continue
    terms[key] = tap
    for name, v in t.items():
      sq = sq.at[:, gid(tap.path)].add(v)
      covered.add(tap.path + (name,))

  # 4) Vmap fallback for every parameter no rule covered.
  rest = [p for p in _leaf_paths(params) if p not in covered]
  rest_grads = None
  if rest:
    def loss_rest(sub, example):
      full = _copy(params)
      for path, val in zip(rest, sub):
        _set(full, path, val)
      one = jax.tree_util.tree_map(lambda x: x[None], example)
      return loss_fn(full, one)[0]

    sub = [_get(params, p) for p in rest]
    with jax.named_scope(FALLBACK_SCOPE):
      rest_grads = jax.vmap(jax.grad(loss_rest), in_axes=(None, 0))(sub, batch)
      for path, gr in zip(rest, rest_grads):
        sq = sq.at[:, gid(path)].add(jnp.sum(jnp.square(gr.astype(jnp.float32)).reshape(b, -1),
                                             axis=1))

  norms = jnp.sqrt(sq.sum(1)) * mask
  if group_of is None:
    c = factors_fn(norms, mask)
    c_of = lambda path: c
  else:
    c = factors_fn(jnp.sqrt(sq) * mask[:, None], mask[:, None])  # [B, groups]
    c_of = lambda path: c[:, gid(path)]

  # 5) The clipped sum.
  if method == "ghost":
    with jax.named_scope(SUM_SCOPE):
      total = jax.grad(lambda p: jnp.sum(loss_fn(p, batch).astype(jnp.float32) * c))(params)
      total = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), total)
  else:
    total = _copy(jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), params))
    for key, tap in terms.items():
      with jax.named_scope(f"{SUM_SCOPE}/{'/'.join(tap.path)}"):
        for name, v in _layer_clipped_sum(tap, out_grads[key], c_of(tap.path),
                                          _get(params, tap.path)).items():
          _set(total, tap.path + (name,), v)
    with jax.named_scope(SUM_SCOPE):
      for path, gr in zip(rest, rest_grads or []):
        _set(total, path, jnp.einsum("b,b...->...", c_of(path), gr.astype(jnp.float32)))
  return total, {"norms": norms, "losses": losses * mask,
                 "vmap_fallback_leaves": jnp.asarray(len(rest), jnp.int32)}
