"""Every Pallas kernel against its jnp reference, run with interpret=True on the CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels

SHAPES = [(4, 16, 32, 64), (3, 7, 20, 9), (2, 64, 256, 384), (5, 1, 1, 3), (1, 33, 130, 129)]


def _inputs(b, t, i, o, seed, padded_rows=True):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(b, t, i)).astype(np.float32)
  g = rng.normal(size=(b, t, o)).astype(np.float32)
  if padded_rows and b > 1:
    a[-1] = 0.0  # a padded example: zero inputs and zero output gradients
    g[-1] = 0.0
  c = rng.uniform(0, 1, size=b).astype(np.float32)
  if padded_rows:
    c[-1] = 0.0
  return jnp.asarray(a), jnp.asarray(g), jnp.asarray(c)


@pytest.mark.parametrize("shape", SHAPES)
def test_seq_dense_norm_kernel_matches_reference(shape):
  a, g, _ = _inputs(*shape, seed=sum(shape))
  got = kernels.seq_dense_sq_norms_pallas(a, g, block_i=32, block_o=64, interpret=True)
  want = kernels.seq_dense_sq_norms_reference(a, g)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-4)
  # The reference against float64 numpy: sum of squares of each example's a^T g.
  a64, g64 = np.asarray(a, np.float64), np.asarray(g, np.float64)
  ref64 = np.array([np.sum((x.T @ y) ** 2) for x, y in zip(a64, g64)])
  np.testing.assert_allclose(want, ref64, rtol=1e-4, atol=1e-3)
  if shape[0] > 1:
    assert float(got[-1]) == 0.0  # the padded example


@pytest.mark.parametrize("shape", SHAPES)
def test_weighted_outer_sum_kernel_matches_reference(shape):
  a, g, c = _inputs(*shape, seed=7 + sum(shape))
  got = kernels.weighted_outer_sum_pallas(a, g, c, block_i=32, block_o=64, block_k=16,
                                          interpret=True)
  want = kernels.weighted_outer_sum_reference(a, g, c)
  assert got.shape == (shape[2], shape[3])
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-4)
  a64, g64, c64 = (np.asarray(x, np.float64) for x in (a, g, c))
  ref64 = sum(ci * x.T @ y for ci, x, y in zip(c64, a64, g64))
  np.testing.assert_allclose(want, ref64, rtol=1e-4, atol=1e-3)


def test_bfloat16_inputs_accumulate_in_float32():
  a, g, c = _inputs(3, 16, 64, 32, seed=3, padded_rows=False)
  ab, gb = a.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
  got = kernels.seq_dense_sq_norms_pallas(ab, gb, interpret=True)
  assert got.dtype == jnp.float32
  want = kernels.seq_dense_sq_norms_reference(ab.astype(jnp.float32), gb.astype(jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-4)
  got_s = kernels.weighted_outer_sum_pallas(ab, gb, c, interpret=True)
  np.testing.assert_allclose(got_s, kernels.weighted_outer_sum_reference(
      ab.astype(jnp.float32), gb.astype(jnp.float32), c), rtol=1e-4, atol=1e-3)


def test_dispatch_uses_the_reference_on_cpu():
  assert jax.default_backend() == "cpu" and not kernels.use_kernels()
  a, g, c = _inputs(2, 4, 8, 8, seed=1)
  np.testing.assert_array_equal(kernels.seq_dense_sq_norms(a, g),
                                kernels.seq_dense_sq_norms_reference(a, g))
  np.testing.assert_array_equal(kernels.weighted_outer_sum(a, g, c),
                                kernels.weighted_outer_sum_reference(a, g, c))


def test_bookkeeping_through_the_kernels_equals_the_vmap_reference(monkeypatch):
  """The library path with the kernels forced on (interpreted on the CPU): the transformer's
  per-example norms and clipped sum equal the vmap reference."""
  from trustjax import privacy  # pylint: disable=import-outside-toplevel
  from tests.privacy.helpers import tiny_problem  # pylint: disable=import-outside-toplevel
  import functools  # pylint: disable=import-outside-toplevel
  calls = []

  def norms(a, g):
    calls.append("norm")
    return kernels.seq_dense_sq_norms_pallas(a, g, interpret=True)

  def wsum(a, g, c):
    calls.append("sum")
    return kernels.weighted_outer_sum_pallas(a, g, c, interpret=True)

  monkeypatch.setattr(kernels, "seq_dense_sq_norms", norms)
  monkeypatch.setattr(kernels, "weighted_outer_sum", wsum)
  loss_fn, params, batch = tiny_problem(batch_size=6, seed=2)
  run = jax.jit(functools.partial(privacy.clipped_grad_sum, loss_fn, l2_clip=0.1),
                static_argnames="method")
  got, aux = run(params, batch, method="bookkeeping")
  want, aux_ref = run(params, batch, method="vmap")
  assert {"sum", "norm"} <= set(calls)  # both kernels ran (the MLP block's Dense: direct form)
  np.testing.assert_allclose(aux["norms"], aux_ref["norms"], rtol=1e-4, atol=1e-6)
  for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
