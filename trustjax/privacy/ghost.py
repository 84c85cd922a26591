"""Per-example gradient norms and clipped sums without per-example gradients.

For a layer y = f(x; w), the gradient of example i's loss with respect to w is a function of that
example's layer input a_i and output gradient g_i = dL_i/dy_i. Both come out of one ordinary
forward and backward pass over the batch: inputs are recorded by intercepting the layer's
`__call__` (`flax.linen.intercept_methods`, so the model is not rewritten) and output gradients
are the gradients with respect to a zero "tap" added to each layer's output. Rules:

- Dense / DenseGeneral (T positions per example, I inputs, O outputs):
  ||dW_i||^2 = sum_{t,s} (a_t . a_s)(g_t . g_s)  (Gram form, O(T^2 (I + O)))  or
  ||a_i^T g_i||_F^2 (direct form, O(T I O)), whichever is cheaper; bias: ||sum_t g_t||^2.
- Embed: ||dE_i||^2 = sum_{t,s} [id_t == id_s] (g_t . g_s); `Embed.attend(q)` (a tied output
  layer, logits q E^T) is a Dense layer with kernel E^T.
- LayerNorm: scale: ||sum_t g_t * xhat_t||^2; bias: ||sum_t g_t||^2.
- `models.LSTMLayer`'s recurrent weight R (z_t = u_t + h_{t-1} R, u its input projection): the
  Dense form with inputs h_{t-1} (the layer's outputs shifted by one step) and output gradients
  dL/dz_t = dL/du_t, the input projection's (its own Dense rule covers W and b).

A module called several times in one forward pass (a shared layer, or an embedding tied to the
output layer through `attend`) has one gradient per example, the sum over its calls: the rules
take the calls together (a Dense layer's calls as one longer sequence; for a tied embedding,
the lookups' term, the output layer's term and twice their inner product,
sum_{t,s} G_s[id_t] (g_t . q_s) with G the logits' gradient).

Which parameters the rules may cover is checked on the traced program (`jax.make_jaxpr`): each
recorded call runs under its own named scope, and a parameter is covered only if every op that
reads it (after dtype casts) lies inside a recorded call of its own module, at the top level of
the loss. A parameter read anywhere else (an attribute such as `embed.embedding` used by the
parent, a layer subclass, a layer inside `nn.scan` or a jitted function), and every parameter
of a module that no rule covers, falls back to vmapped per-example gradients for those
parameters only; so an unforeseen use costs time, never the clipping bound.

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
from jax.extend import core as jex_core

import kernels

from trustjax.models.language import LSTMLayer
from trustjax.privacy.clipping import FALLBACK_SCOPE, NORMS_SCOPE, SUM_SCOPE
from trustjax.types import Batch, LossFn, Params

_RULES = (nn.Dense, nn.DenseGeneral, nn.Embed, nn.LayerNorm, LSTMLayer)
_TAP_SCOPE = "dp_tap"
# Ops through which a parameter may pass outside its layer (mixed precision casts).
_CASTS = frozenset({"convert_element_type", "copy", "copy_p", "device_put"})
# The coverage check's scopes exist only in the abstract trace, never in the compiled step; a
# reference of their own keeps them apart from the profiling scopes (which a test switches off).
_call_scope = jax.named_scope


def _normalize_axes(axis, ndim):
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(a % ndim for a in axis)


class _Tap:
  """What one intercepted layer call recorded: kind, module path, input, extra, output shape."""

  def __init__(self, kind, path, module, x, out_shape, extra=None, out_dtype=None):
    self.kind, self.path, self.module, self.x = kind, path, module, x
    self.out_shape, self.extra, self.out_dtype = out_shape, extra, out_dtype


def _make_interceptor(taps: list, perturb: dict | None, skip=frozenset(), scopes=None):
  """Records each call of a rule module (exact types only: a subclass may change the math) in
  `taps`, adding `perturb[key]` to its output. Paths in `skip` run unrecorded. With `scopes`
  (a dict filled as calls come), each call runs under a named scope `scopes[path]`."""
  counts = collections.Counter()

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if type(mod) not in _RULES or context.method_name == "setup":
      return next_fun(*args, **kwargs)
    path = tuple(mod.path)
    if path in skip:
      return next_fun(*args, **kwargs)
    if scopes is not None:
      scope = scopes.setdefault(path, f"{_TAP_SCOPE}<{len(scopes)}>")
      with _call_scope(scope):
        y = next_fun(*args, **kwargs)
    else:
      y = next_fun(*args, **kwargs)
    counts[path] += 1
    x = args[0] if args else next(iter(kwargs.values()))
    extra = None
    if context.method_name == "attend" and isinstance(mod, nn.Embed):
      kind = "attend"
    elif context.method_name != "__call__":
      kind, extra = "unsupported", f"its method {context.method_name!r} has no rule"
    elif isinstance(mod, LSTMLayer):
      kind, extra = "recurrent", y  # its outputs: h_{t-1} = y_{t-1} feeds the recurrent weight
    elif isinstance(mod, nn.LayerNorm):
      if mod.reduction_axes not in (-1, (-1,)) or mod.feature_axes not in (-1, (-1,)):
        kind, extra = "unsupported", "LayerNorm over other axes than the last"
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
      extra = "DenseGeneral with batch_dims" if mod.batch_dims else None
    else:
      kind = "dense"
    taps.append(_Tap(kind, path, mod, x, y.shape, extra, y.dtype))
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
  """(a [B, T, I], g [B, T, O]) for a Dense/DenseGeneral call (or `Embed.attend`, whose kernel
  is the embedding's transpose) with output gradient g; None if its contraction takes the batch
  axis."""
  x = tap.x
  b = x.shape[0]
  if tap.kind in ("dense", "attend"):
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


def _concat_dense_ops(calls):
  """Each call's (a, g), and all of them as one sequence: [B, sum T, I], [B, sum T, O]."""
  ops = [_dense_ops(tap, g) for tap, g in calls]
  if len(ops) == 1:
    return ops, ops[0]
  return ops, (jnp.concatenate([a for a, _ in ops], 1), jnp.concatenate([g for _, g in ops], 1))


def _recurrent_ops(calls):
  """An LSTMLayer's (h_{t-1} [B, sum T, H], dL/dz [B, sum T, 4H]) over its calls: the previous
  hidden states (zero before the first step) and its input projection's output gradients."""
  hs = []
  for tap, _ in calls:
    y = tap.extra.astype(jnp.float32)
    hs.append(jnp.concatenate([jnp.zeros_like(y[:, :1]), y[:, :-1]], axis=1))
  gs = [g.astype(jnp.float32) for _, g in calls]
  if len(calls) == 1:
    return hs[0], gs[0]
  return jnp.concatenate(hs, 1), jnp.concatenate(gs, 1)


def _lookups(calls, b):
  """An Embed's lookups as ids [B, T] and output gradients [B, T, D] (calls concatenated)."""
  ids = [tap.x.reshape(b, -1) for tap, _ in calls]
  gs = [g.reshape(b, i.shape[1], -1).astype(jnp.float32) for (_, g), i in zip(calls, ids)]
  return jnp.concatenate(ids, 1), jnp.concatenate(gs, 1)


def _sum_over_calls(calls, fn):
  total = None
  for tap, g in calls:
    v = fn(tap, g)
    total = v if total is None else total + v
  return total


def _layer_terms(calls, b):
  """Per-example squared norms {param_name: [B]} of one module from all its calls
  [(tap, output gradient)] (the gradient of a shared module sums its calls)."""
  kind = calls[0][0].kind
  mod = calls[0][0].module
  if kind in ("dense", "dense_general"):
    ops, (a, gg) = _concat_dense_ops(calls)
    out = {"kernel": _pairwise_sq_norm(a, gg)}
    if mod.use_bias:
      out["bias"] = jnp.sum(jnp.square(sum(g.sum(1) for _, g in ops)), axis=-1)
    return out
  if kind == "recurrent":
    a, gg = _recurrent_ops(calls)
    return {"recurrent": _pairwise_sq_norm(a, gg)}
  if kind in ("embed", "attend"):
    looks = [c for c in calls if c[0].kind == "embed"]
    tied = [c for c in calls if c[0].kind == "attend"]
    sq = jnp.zeros((b,), jnp.float32)
    if looks:
      ids, gl = _lookups(looks, b)
      same = (ids[:, :, None] == ids[:, None, :]).astype(jnp.float32)
      sq = sq + jnp.einsum("bts,bts->b", same, jnp.einsum("btd,bsd->bts", gl, gl))
    if tied:
      _, (q, lg) = _concat_dense_ops(tied)  # queries [B, S, D], logits' gradients [B, S, V]
      sq = sq + _pairwise_sq_norm(q, lg)
    if looks and tied:
      # <sum_t e_{id_t} g_t^T, sum_s G_s q_s^T> = sum_{t,s} G_s[id_t] (g_t . q_s)
      picked = jnp.take_along_axis(
          lg, jnp.broadcast_to(ids[:, None, :], (b, lg.shape[1], ids.shape[1])), axis=2)
      sq = sq + 2.0 * jnp.einsum("bst,bts->b", picked, jnp.einsum("btd,bsd->bts", gl, q))
    return {"embedding": sq}
  d = calls[0][1].shape[-1]
  out = {}
  if mod.use_scale:
    out["scale"] = jnp.sum(jnp.square(_sum_over_calls(
        calls, lambda t, g: (g.reshape(b, -1, d).astype(jnp.float32)
                             * t.extra.reshape(b, -1, d)).sum(1))), axis=-1)
  if mod.use_bias:
    out["bias"] = jnp.sum(jnp.square(_sum_over_calls(
        calls, lambda t, g: g.reshape(b, -1, d).astype(jnp.float32).sum(1))), axis=-1)
  return out


def _call_clipped_sum(tap, g, c, layer_params):
  """sum_i c_i * (example i's gradient through this one call) for each parameter it uses."""
  b = g.shape[0]
  if tap.kind in ("dense", "dense_general"):
    a, gg = _dense_ops(tap, g)
    kshape = layer_params["kernel"].shape
    out = {"kernel": kernels.weighted_outer_sum(a, gg, c).reshape(kshape)}
    if tap.module.use_bias:
      bshape = layer_params["bias"].shape
      out["bias"] = jnp.einsum("bto,b->o", gg, c).reshape(bshape)
    return out
  if tap.kind == "recurrent":
    a, gg = _recurrent_ops([(tap, g)])
    return {"recurrent": kernels.weighted_outer_sum(a, gg, c).reshape(
        layer_params["recurrent"].shape)}
  if tap.kind == "attend":
    q, lg = _dense_ops(tap, g)
    return {"embedding": kernels.weighted_outer_sum(q, lg, c).T}  # [D, V] -> [V, D]
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


def _layer_clipped_sum(calls, c, layer_params):
  """sum_i c_i * (example i's gradient) for each parameter of one module, over all its calls."""
  total = {}
  for tap, g in calls:
    for name, v in _call_clipped_sum(tap, g, c, layer_params).items():
      total[name] = v if name not in total else total[name] + v
  return total


def _unsupported_paths(taps, b):
  """{module path: why} for modules with a call no rule handles (their parameters must fall
  back to vmap)."""
  bad = {}
  for t in taps:
    if t.kind == "unsupported":
      bad.setdefault(t.path, t.extra)
    elif t.out_shape[:1] != (b,) or getattr(t.x, "shape", ())[:1] != (b,):
      bad.setdefault(t.path, "a call whose input or output does not lead with the batch axis")
    elif t.kind == "dense_general" and 0 in _normalize_axes(t.module.axis, len(t.x.shape)):
      bad.setdefault(t.path, "a DenseGeneral contracting the batch axis")
  return bad


def _key_name(k):
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return str(k)


def _read_elsewhere(jaxpr, params, scopes):
  """{module path: why} for modules one of whose parameters is read (after casts) by an op
  outside the named scopes of that module's recorded calls, at the top level of the traced
  loss `jaxpr`."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  owner = {}
  for (kp, _), var in zip(flat, jaxpr.invars):
    owner[var] = tuple(_key_name(k) for k in kp)[:-1]
  bad = {}
  for eqn in jaxpr.eqns:
    mods = {owner[v] for v in eqn.invars if isinstance(v, jex_core.Var) and v in owner}
    if not mods:
      continue
    stack = str(eqn.source_info.name_stack)
    for mod in mods:
      if mod in scopes and scopes[mod] in stack:
        continue  # inside one of the module's own recorded calls
      if eqn.primitive.name in _CASTS and len(mods) == 1:
        owner.update({o: mod for o in eqn.outvars})
        continue
      bad.setdefault(mod, f"a parameter read outside the layer's own calls (by a "
                          f"{eqn.primitive.name} op: for example by its parent, or inside "
                          "nn.scan, nn.remat or jit)")
  for v in jaxpr.outvars:
    if isinstance(v, jex_core.Var) and v in owner:
      bad.setdefault(owner[v], "a parameter returned by the loss")
  return bad


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


def _discover(loss_fn: LossFn, params: Params, batch: Batch):
  """Traces the loss (no FLOPs): the calls of every rule module that owns a leaf of `params`
  (taps with shapes, no values), {module path: why its parameters must fall back to vmap},
  and the set of module paths to leave unrecorded (those, and frozen modules)."""
  b = batch["mask"].shape[0]
  taps: list = []
  scopes: dict = {}

  def discover(p):
    with nn.intercept_methods(_make_interceptor(taps, None, scopes=scopes)):
      return loss_fn(p, batch)

  traced = jax.make_jaxpr(discover)(params)
  why = _read_elsewhere(traced.jaxpr, params, scopes)
  why.update(_unsupported_paths(taps, b))
  # Frozen modules (`training.split_frozen`: their parameters are constants of the loss, not
  # leaves of `params`) have no gradient to clip: left unrecorded. A module with some of its
  # rule's leaves frozen and some not falls back to vmap for the rest.
  leaves = set(_leaf_paths(params))
  frozen = set()
  for t in taps:
    present = [n for n in _rule_leaves(t) if t.path + (n,) in leaves]
    if not present:
      frozen.add(t.path)
    elif len(present) < len(_rule_leaves(t)):
      why.setdefault(t.path, "some of the layer's parameters are frozen and some are not")
  for t in taps:
    if t.kind != "recurrent" or t.path in frozen:
      continue
    inp = t.path + ("input",)
    if inp in frozen:  # its rule needs the input projection's output gradients
      why.setdefault(t.path, "its input projection is frozen")
    elif inp in why:
      why.setdefault(t.path, "its input projection falls back: " + why[inp])
  frozen -= set(why)
  return [t for t in taps if t.path not in frozen], why, frozenset(why) | frozen


def _rule_leaves(tap) -> tuple:
  """The parameter names a rule covers for a recorded call's module."""
  mod = tap.module
  if tap.kind == "recurrent":
    return ("recurrent",)
  if tap.kind in ("embed", "attend"):
    return ("embedding",)
  if tap.kind == "layernorm":
    return ("scale",) * mod.use_scale + ("bias",) * mod.use_bias
  return ("kernel",) + ("bias",) * mod.use_bias


def fallback_leaves(loss_fn: LossFn, params: Params, batch: Batch) -> dict:
  """{"module/path/param": why} for every parameter leaf that ghost clipping and book-keeping
  leave to vmapped per-example gradients on this model (empty when the rules cover all): the
  layers that make a DP step slower than it could be, and what to change. Traces only."""
  batch = dict(batch)
  batch.setdefault("mask", jnp.ones((jax.tree_util.tree_leaves(batch)[0].shape[0],), bool))
  taps, why, _ = _discover(loss_fn, params, batch)
  covered = {t.path + (name,) for t in taps if t.path not in why for name in _rule_leaves(t)}
  called = {t.path for t in taps}
  out = {}
  for leaf in _leaf_paths(params):
    if leaf not in covered:
      module = leaf[:-1]
      out["/".join(map(str, leaf))] = why[module] if module in called else (
          "not in a layer with a rule (Dense, DenseGeneral, Embed, LayerNorm, models.LSTMLayer) "
          "that the model calls: another layer type, a subclass, a parameter of its own, or one "
          "read only outside such calls")
  return out


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

  # 1) Trace the loss (no FLOPs) to discover the rule modules' calls, their output shapes,
  #    and which ops read each parameter; modules that a rule cannot cover are skipped.
  shape_taps, why, skip = _discover(loss_fn, params, batch)
  low = sorted({str(t.out_dtype) for t in shape_taps if jnp.dtype(t.out_dtype).itemsize < 4})
  if method == "ghost" and low:
    raise ValueError(
        f"method 'ghost' with layers computing in {', '.join(low)}: its second backward pass "
        "sums the clipped gradients in that precision, and the rounding can move the sum by "
        "more than the clip norm between neighbouring batches; use 'bookkeeping' (float32 "
        "sums from the same norms) or 'vmap'")
  shape_taps = [t for t in shape_taps if t.path not in skip]
  zeros = {k: jnp.zeros(t.out_shape, jnp.float32)
           for k, t in zip(_keys(shape_taps), shape_taps) if t.kind != "recurrent"}

  # 2) One forward/backward: losses, recorded inputs, and output gradients at the taps.
  meta: list = []  # the taps' static metadata; their arrays leave the trace through aux

  def tapped(z):
    taps = []
    with nn.intercept_methods(_make_interceptor(taps, z, skip)):
      losses = loss_fn(params, batch).astype(jnp.float32)
    meta[:] = taps
    return jnp.sum(losses * mask), (losses, [(t.x, t.extra) for t in taps])

  out_grads, (losses, arrays) = jax.grad(tapped, has_aux=True)(zeros)
  taps = [_Tap(t.kind, t.path, t.module, x, t.out_shape, extra)
          for t, (x, extra) in zip(meta, arrays)]
  calls_of = collections.defaultdict(list)  # module path -> [(tap, output gradient)]
  for key, tap in sorted(zip(_keys(taps), taps), key=lambda kt: kt[0]):  # out_grads' order
    if tap.kind == "recurrent":  # the n-th call's gradient is its input projection's n-th
      key = _tap_key(tap.path + ("input",), int(key.rsplit("#", 1)[1]))
    calls_of[tap.path].append((tap, out_grads[key]))

  # 3) Per-example squared norms, rule by rule; which params each rule covered.
  num_groups = 1 if group_of is None else max(group_of.values()) + 1
  gid = (lambda path: 0) if group_of is None else (lambda path: group_of[path[0]])
  sq = jnp.zeros((b, num_groups), jnp.float32)
  covered = set()
  for path, calls in calls_of.items():
    with jax.named_scope(f"{NORMS_SCOPE}/{'/'.join(path)}"):
      t = _layer_terms(calls, b)
    for name, v in t.items():
      sq = sq.at[:, gid(path)].add(v)
      covered.add(path + (name,))

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
    for path, calls in calls_of.items():
      with jax.named_scope(f"{SUM_SCOPE}/{'/'.join(path)}"):
        for name, v in _layer_clipped_sum(calls, c_of(path), _get(params, path)).items():
          _set(total, path + (name,), v)
    with jax.named_scope(SUM_SCOPE):
      for path, gr in zip(rest, rest_grads or []):
        _set(total, path, jnp.einsum("b,b...->...", c_of(path), gr.astype(jnp.float32)))
  return total, {"norms": norms, "losses": losses * mask,
                 "vmap_fallback_leaves": jnp.asarray(len(rest), jnp.int32)}
