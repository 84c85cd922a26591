"""Pallas kernels for the two products that ghost clipping and book-keeping spend their time in,
each beside its jnp reference.

1. `seq_dense_sq_norms(a, g)`: per-example squared Frobenius norm of a sequence Dense layer's
   weight gradient, ||a_b^T g_b||_F^2 for a [B, T, I] (layer inputs) and g [B, T, O] (output
   gradients), without materialising the [B, I, O] per-example gradients in HBM: each program
   computes one (example, I-tile, O-tile) block of a_b^T g_b in on-chip memory and reduces it
   to a partial sum of squares.
2. `weighted_outer_sum(a, g, c)`: the book-keeping clipped sum of the weight gradient,
   sum_b c_b a_b^T g_b = (c * a)^T g over the flattened (B*T) axis, as a tiled matmul whose
   reduction runs over (B*T)-tiles with the clip factors applied to the rows on the fly.

Inputs are zero-padded up to the tile sizes (zeros add nothing to either product), so any shape
works, padded batch rows included. On GPU/TPU the public functions run the kernels; elsewhere
(CPU) they run the jnp references, which are also what the tests compare the kernels against
(with `interpret=True`, which runs a kernel on the CPU).

References: Li et al., "Large Language Models Can Be Strong Differentially Private Learners",
ICLR 2022 (ghost norm of sequence layers); Bu et al., "Differentially Private Optimization on
Large Model at Small Cost", ICML 2023 (book-keeping).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

ACCELERATORS = ("gpu", "tpu")


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  extra = (-x.shape[axis]) % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def _tile(n: int, preferred: int) -> int:
  """`preferred` for large dims; else the dim rounded up to a power of two (at least 8)."""
  return preferred if n >= preferred else max(8, pl.next_power_of_2(n))


# ----------------------------------------------------------------------------- references


def seq_dense_sq_norms_reference(a: jax.Array, g: jax.Array) -> jax.Array:
  """||a_b^T g_b||_F^2 per example, [B] float32 (direct form)."""
  a32, g32 = a.astype(jnp.float32), g.astype(jnp.float32)
  return jnp.sum(jnp.square(jnp.einsum("bti,bto->bio", a32, g32)), axis=(1, 2))


def weighted_outer_sum_reference(a: jax.Array, g: jax.Array, c: jax.Array) -> jax.Array:
  """sum_b c_b a_b^T g_b, [I, O] float32."""
  return jnp.einsum("bti,bto->io", a.astype(jnp.float32) * c[:, None, None].astype(jnp.float32),
                    g.astype(jnp.float32))


# ----------------------------------------------------------------------------- kernels


def _norm_kernel(a_ref, g_ref, o_ref):
  a = a_ref[0].astype(jnp.float32)  # [T, bi]
  g = g_ref[0].astype(jnp.float32)  # [T, bo]
  blk = jax.lax.dot_general(a, g, (((0,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)  # [bi, bo]
  o_ref[...] = jnp.sum(blk * blk).reshape(o_ref.shape)


@functools.partial(jax.jit, static_argnames=("block_i", "block_o", "interpret"))
def seq_dense_sq_norms_pallas(a: jax.Array, g: jax.Array, *, block_i: int = 128,
                              block_o: int = 128, interpret: bool = False) -> jax.Array:
  """Pallas version of `seq_dense_sq_norms_reference`; grid (B, I-tiles, O-tiles)."""
  b, t, i = a.shape
  o = g.shape[-1]
  bi, bo = _tile(i, block_i), _tile(o, block_o)
  tt = max(8, pl.next_power_of_2(t)) if t < 8 else t
  a = _pad_to(_pad_to(a, 2, bi), 1, tt)
  g = _pad_to(_pad_to(g, 2, bo), 1, tt)
  ni, no = a.shape[2] // bi, g.shape[2] // bo
  partial = pl.pallas_call(
      _norm_kernel,
      out_shape=jax.ShapeDtypeStruct((b, ni, no), jnp.float32),
      grid=(b, ni, no),
      in_specs=[pl.BlockSpec((1, a.shape[1], bi), lambda n, x, y: (n, 0, x)),
                pl.BlockSpec((1, g.shape[1], bo), lambda n, x, y: (n, 0, y))],
      out_specs=pl.BlockSpec((1, 1, 1), lambda n, x, y: (n, x, y)),
      interpret=interpret,
  )(a, g)
  return partial.sum(axis=(1, 2))


def _wsum_kernel(a_ref, w_ref, g_ref, o_ref):
  @pl.when(pl.program_id(2) == 0)
  def _():
    o_ref[...] = jnp.zeros_like(o_ref)

  a = a_ref[...].astype(jnp.float32) * w_ref[...].astype(jnp.float32)  # [bk, bi] * [bk, 1]
  g = g_ref[...].astype(jnp.float32)  # [bk, bo]
  o_ref[...] += jax.lax.dot_general(a, g, (((0,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("block_i", "block_o", "block_k", "interpret"))
def weighted_outer_sum_pallas(a: jax.Array, g: jax.Array, c: jax.Array, *, block_i: int = 128,
                              block_o: int = 128, block_k: int = 256,
                              interpret: bool = False) -> jax.Array:
  """Pallas version of `weighted_outer_sum_reference`; grid (I-tiles, O-tiles, (B*T)-tiles)."""
  b, t, i = a.shape
  o = g.shape[-1]
  a2 = a.reshape(b * t, i)
  g2 = g.reshape(b * t, o)
  w = jnp.repeat(c.astype(jnp.float32), t)[:, None]  # [B*T, 1]: each row's clip factor
  bi, bo, bk = _tile(i, block_i), _tile(o, block_o), _tile(b * t, block_k)
  a2 = _pad_to(_pad_to(a2, 1, bi), 0, bk)
  g2 = _pad_to(_pad_to(g2, 1, bo), 0, bk)
  w = _pad_to(w, 0, bk)
  ni, no, nk = a2.shape[1] // bi, g2.shape[1] // bo, a2.shape[0] // bk
  out = pl.pallas_call(
      _wsum_kernel,
      out_shape=jax.ShapeDtypeStruct((ni * bi, no * bo), jnp.float32),
      grid=(ni, no, nk),
      in_specs=[pl.BlockSpec((bk, bi), lambda x, y, k: (k, x)),
                pl.BlockSpec((bk, 1), lambda x, y, k: (k, 0)),
                pl.BlockSpec((bk, bo), lambda x, y, k: (k, y))],
      out_specs=pl.BlockSpec((bi, bo), lambda x, y, k: (x, y)),
      interpret=interpret,
  )(a2, w, g2)
  return out[:i, :o]


# ----------------------------------------------------------------------------- dispatch


def use_kernels() -> bool:
  """True on GPU/TPU backends, where the Pallas kernels compile; False on CPU."""
  return jax.default_backend() in ACCELERATORS


def seq_dense_sq_norms(a: jax.Array, g: jax.Array) -> jax.Array:
  """Per-example ||a_b^T g_b||_F^2: the kernel on GPU/TPU, the jnp reference elsewhere."""
  if use_kernels():
    return seq_dense_sq_norms_pallas(a, g)
  return seq_dense_sq_norms_reference(a, g)


def weighted_outer_sum(a: jax.Array, g: jax.Array, c: jax.Array) -> jax.Array:
  """sum_b c_b a_b^T g_b: the kernel on GPU/TPU, the jnp reference elsewhere."""
  if use_kernels():
    return weighted_outer_sum_pallas(a, g, c)
  return weighted_outer_sum_reference(a, g, c)
