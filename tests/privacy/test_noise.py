# pylint: disable=protected-access
"""The Gaussian mechanism and its noise draw (noise.py's private helpers included)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from trustjax import privacy


def _noise(sigma, clip, b, n=40000):
  zeros = {"w": jnp.zeros((n // 4, 2)), "b": jnp.zeros((n // 2,))}
  out = privacy.privatize(zeros, jax.random.key(0), l2_clip=clip, noise_multiplier=sigma,
                          expected_batch_size=b)
  return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(out)])


def test_noise_std_is_sigma_clip_over_batch():
  sigma, clip, b = 1.3, 0.7, 50.0
  x = _noise(sigma, clip, b)
  std = sigma * clip / b
  assert scipy.stats.kstest(x, "norm", args=(0, std)).pvalue > 1e-3
  for wrong in (1.5 * std, std / 1.5):
    assert scipy.stats.kstest(x, "norm", args=(0, wrong)).pvalue < 1e-6
  # Independent across leaves and coordinates.
  assert abs(np.corrcoef(x[:-1], x[1:])[0, 1]) < 0.03


def test_noise_is_added_to_the_sum_before_dividing():
  g = {"w": jnp.full((4,), 10.0)}
  out = privacy.privatize(g, jax.random.key(3), l2_clip=1.0, noise_multiplier=0.0,
                          expected_batch_size=4.0)
  np.testing.assert_allclose(out["w"], 2.5)
  a = privacy.privatize(g, jax.random.key(3), l2_clip=2.0, noise_multiplier=0.5,
                        expected_batch_size=4.0)
  z = privacy.privatize({"w": jnp.zeros(4)}, jax.random.key(3), l2_clip=2.0,
                        noise_multiplier=0.5, expected_batch_size=4.0)
  np.testing.assert_allclose(a["w"], (10.0 + 4.0 * z["w"]) / 4.0, rtol=1e-6)


def test_bad_input():
  g = {"w": jnp.zeros(2)}
  for kw, msg in [(dict(l2_clip=0.0, noise_multiplier=1.0, expected_batch_size=1.0), "l2_clip"),
                  (dict(l2_clip=1.0, noise_multiplier=-1.0, expected_batch_size=1.0), "noise"),
                  (dict(l2_clip=1.0, noise_multiplier=1.0, expected_batch_size=0.0), "expected")]:
    with pytest.raises(ValueError, match=msg):
      privacy.privatize(g, jax.random.key(0), **kw)


def _jax_normal(key, shape):
  with jax.threefry_partitionable(False):
    return jax.random.normal(key, shape, jnp.float32)


_LOW = np.nextafter(np.float32(-1.0), np.float32(0.0))


def _jax_uniform(key, shape):
  """The uniforms jax.random.normal transforms."""
  with jax.threefry_partitionable(False):
    return jax.random.uniform(key, shape, jnp.float32, _LOW, 1.0)


def _f64_normal(u):
  """Independent float64 reference: sqrt(2) * erfinv(u) by scipy."""
  return np.sqrt(2.0) * scipy.special.erfinv(np.asarray(u, np.float64))


@pytest.mark.parametrize("shape", [(), (1,), (2,), (7,), (3, 5, 7), (784, 512), (512, 10),
                                   (100_001,)])
def test_uniforms_equal_jax_random_uniform_bit_for_bit(shape):
  for seed in (0, 1, 2 ** 31 + 5):
    key = jax.random.key(seed)
    mine = jax.jit(privacy.noise._uniform, static_argnums=1)(key, shape)
    ref = _jax_uniform(key, shape)
    assert mine.shape == ref.shape == shape and mine.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(mine), np.asarray(ref))


def test_erfinv_against_float64_scipy_and_xla():
  """Giles' polynomials with w = -log(1 - x^2): within 1e-6 relative of float64 erfinv from the
  centre to the uniform's extreme values (where |z| reaches 5.4), and close to XLA's erf_inv."""
  erfinv = jax.jit(privacy.noise._erfinv)
  x = np.concatenate([np.linspace(-1, 1, 2_000_001, dtype=np.float32)[1:-1],
                      np.float32([_LOW, -_LOW, 1e-30, -1e-7, 0.0, 0.5, -0.999999])])
  got = np.asarray(erfinv(x), np.float64)
  ref = scipy.special.erfinv(x.astype(np.float64))
  rel = np.abs(got - ref) / np.maximum(np.abs(ref), 1e-300)
  assert rel.max() < 1e-6, (rel.max(), x[rel.argmax()])
  assert np.all(np.sign(got) == np.sign(ref))
  np.testing.assert_allclose(got, np.asarray(jax.lax.erf_inv(x)), rtol=2e-5, atol=1e-30)
  assert np.asarray(erfinv(np.float32([1.0, -1.0]))).tolist() == [np.inf, -np.inf]


@pytest.mark.parametrize("shape", [(), (7,), (3, 5, 7), (784, 512)])
def test_standard_normal_is_sqrt2_erfinv_of_jax_uniforms(shape):
  key = jax.random.key(5)
  mine = np.asarray(jax.jit(privacy.noise.standard_normal, static_argnums=1)(key, shape))
  u = _jax_uniform(key, shape)
  np.testing.assert_allclose(mine, _f64_normal(u), rtol=2e-6, atol=1e-7)
  np.testing.assert_allclose(mine, _jax_normal(key, shape), rtol=2e-5, atol=1e-6)


def test_standard_normal_raw_keys_vmap_and_other_generators():
  raw = jax.random.PRNGKey(11)  # legacy uint32[2] key
  np.testing.assert_array_equal(privacy.noise._uniform(raw, (9, 4)), _jax_uniform(raw, (9, 4)))
  np.testing.assert_allclose(privacy.noise.standard_normal(raw, (9, 4)),
                             _f64_normal(_jax_uniform(raw, (9, 4))), rtol=2e-6, atol=1e-7)
  keys = jax.random.split(jax.random.key(4), 5)
  batched = jax.vmap(lambda k: privacy.noise._uniform(k, (33,)))(keys)
  np.testing.assert_array_equal(batched, jnp.stack([_jax_uniform(k, (33,)) for k in keys]))
  # Another implementation's uniforms come from jax.random.uniform itself (its own stream).
  rbg = jax.random.key(3, impl="rbg")
  np.testing.assert_allclose(privacy.noise.standard_normal(rbg, (6,)),
                             _f64_normal(_jax_uniform(rbg, (6,))), rtol=2e-6, atol=1e-7)
  assert privacy.noise.standard_normal(jax.random.key(0), (0, 3)).shape == (0, 3)


def test_privatize_noise_is_the_non_partitionable_threefry_stream():
  """privatize's noise on each leaf is sqrt(2) erfinv of jax.random.normal's uniforms for that
  leaf's split key."""
  g = {"a": jnp.zeros((5, 3)), "b": jnp.zeros((4,))}
  key = jax.random.key(8)
  out = privacy.privatize(g, key, l2_clip=2.0, noise_multiplier=1.5, expected_batch_size=3.0)
  leaves, _ = jax.tree_util.tree_flatten(g)
  keys = jax.random.split(key, len(leaves))
  for got, leaf, k in zip(jax.tree_util.tree_leaves(out), leaves, keys):
    np.testing.assert_allclose(got, 1.5 * 2.0 * _f64_normal(_jax_uniform(k, leaf.shape)) / 3.0,
                               rtol=2e-6, atol=1e-7)


def test_standard_normal_compiles_to_straight_line_code():
  """The reason standard_normal exists: no loop over the cipher's rounds (JAX's CPU lowering of
  jax.random.normal has one), so XLA can fuse the whole draw."""
  key = jax.random.key(0)
  ours = jax.jit(privacy.noise.standard_normal, static_argnums=1).lower(key, (64, 32))
  assert " while(" not in ours.compile().as_text()


def _privatize(key, grads):
  return privacy.privatize(grads, key, l2_clip=1.0, noise_multiplier=2.0, expected_batch_size=4.0)


def test_privatize_under_vmap_equals_a_loop_and_draws_once():
  """privatize runs its draw inside a conditional on a CPU; under vmap (one or two levels) the
  values equal a loop over the keys bit for bit, and the compiled program keeps one conditional
  instead of a select that would evaluate the draw twice."""
  g = {"a": jnp.ones((5, 3)), "b": jnp.arange(7.0)}
  keys = jax.random.split(jax.random.key(0), 4)
  batched = jax.jit(jax.vmap(_privatize, in_axes=(0, None)))
  out = batched(keys, g)
  for i, k in enumerate(keys):
    ref = _privatize(k, g)
    for name in g:
      np.testing.assert_array_equal(out[name][i], ref[name])
  assert batched.lower(keys, g).compile().as_text().count(" conditional(") == 1
  g2 = jax.tree_util.tree_map(lambda x: jnp.stack([x, -2 * x]), g)
  keys2 = jax.random.split(jax.random.key(1), (3, 2))
  nested = jax.jit(jax.vmap(jax.vmap(_privatize), in_axes=(0, None)))
  out2 = nested(keys2, g2)
  for i in range(3):
    for j in range(2):
      ref = _privatize(keys2[i, j], jax.tree_util.tree_map(lambda x, j=j: x[j], g2))
      for name in g:
        np.testing.assert_array_equal(out2[name][i, j], ref[name])
  assert nested.lower(keys2, g2).compile().as_text().count(" conditional(") == 1
  # An adaptive clip is an array, batched here along with the keys.
  clips = jnp.asarray([0.5, 1.0, 2.0, 4.0])
  with_clip = lambda k, c: privacy.privatize(g, k, l2_clip=c, noise_multiplier=2.0,
                                             expected_batch_size=4.0)
  out3 = jax.jit(jax.vmap(with_clip))(keys, clips)
  for i in range(4):
    ref = with_clip(keys[i], clips[i])
    for name in g:
      np.testing.assert_array_equal(out3[name][i], ref[name])


def test_noisy_adam_step_needs_no_more_memory_than_the_plain_step():
  """XLA's memory estimate of an Adam step on a noisy gradient: the noise is drawn in one pass
  per leaf and written once, so the step's temporaries stay within one small leaf of the step
  on the plain gradient (before: erfinv's intermediates and the cipher's bits, three buffers the
  size of the largest leaf)."""
  import optax  # pylint: disable=import-outside-toplevel
  params = {"w": jnp.zeros((384, 256)), "v": jnp.zeros((256, 64)), "b": jnp.zeros((64,))}
  opt = optax.adam(1e-3)
  state = opt.init(params)

  def step(grads, state, key, noisy):
    if noisy:
      grads = privacy.privatize(grads, key, l2_clip=1.0, noise_multiplier=1.0,
                                expected_batch_size=32.0)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def temp_bytes(noisy):
    fn = jax.jit(lambda g, s, k: step(g, s, k, noisy))
    return fn.lower(params, state, jax.random.key(0)).compile().memory_analysis().temp_size_in_bytes

  leaf = 384 * 256 * 4
  assert temp_bytes(True) <= temp_bytes(False) + 64 * 4 * 4
  assert temp_bytes(False) < leaf


@pytest.mark.parametrize("shape", [(1,), (2,), (7,), (4, 5), (3, 3, 3), (100001,)])
def test_pairwise_noisy_leaf_draws_standard_normal(shape):
  """privatize's per-leaf path (one cipher evaluation per pair of draws, the halves added to
  the gradient before they are joined) draws standard_normal's values, odd sizes included, and
  adds them as (g + std * z) / divisor."""
  key = jax.random.key(11)
  add = jax.jit(privacy.noise._add_normal, static_argnums=(2, 3))
  z = np.asarray(jax.jit(privacy.noise.standard_normal, static_argnums=1)(key, shape))
  np.testing.assert_allclose(add(jnp.zeros(shape), key, 1.0, 1.0), z, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(add(jnp.zeros(shape), key, 1.0, 1.0),
                             _f64_normal(_jax_uniform(key, shape)), rtol=2e-6, atol=1e-7)
  g = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  np.testing.assert_allclose(add(g, key, 0.7, 3.0), (g + 0.7 * z) / 3.0, rtol=1e-6, atol=1e-7)


def test_privatize_uses_its_conditional_only_on_cpu():
  """The one-pass conditional is CPU-only: lowered for GPU or TPU (jax.export, no device
  needed), privatize has one conditional fewer than for CPU (each lowering also keeps the
  platform choice itself, which XLA folds), and the values on CPU are the same either way."""
  from jax import export  # pylint: disable=import-outside-toplevel
  g = {"a": jnp.zeros((5, 3)), "b": jnp.zeros((4,))}
  key = jax.random.key(0)
  f = jax.jit(_privatize)
  count = {p: export.export(f, platforms=[p])(key, g).mlir_module().count("stablehlo.case")
           for p in ("cpu", "cuda", "tpu")}
  assert count["cuda"] == count["tpu"] == count["cpu"] - 1, count
  plain = jax.jit(lambda k, g: [privacy.noise._add_normal(x, kk, 2.0, 4.0)
                                for x, kk in zip(jax.tree_util.tree_leaves(g),
                                                 jax.random.split(k, 2))])
  for got, want in zip(jax.tree_util.tree_leaves(f(key, g)), plain(key, g)):
    np.testing.assert_array_equal(got, want)


def test_privatize_is_differentiable():
  """d privatize / d grad_sum = 1 / expected_batch_size and d / d l2_clip = the noise divided
  by it (z * sigma / B), through the one-pass conditional, with and without vmap."""
  g = {"a": jnp.ones((3,)), "b": jnp.ones((2, 2))}
  key = jax.random.key(0)

  def total(g, clip):
    out = privacy.privatize(g, key, l2_clip=clip, noise_multiplier=1.5, expected_batch_size=2.0)
    return sum(x.sum() for x in jax.tree_util.tree_leaves(out))

  for grad in jax.tree_util.tree_leaves(jax.grad(total)(g, 1.0)):
    np.testing.assert_allclose(grad, 0.5)
  zero = jax.tree_util.tree_map(jnp.zeros_like, g)
  noise_sum = total(zero, jnp.float32(1.0))  # = 1.5 * sum(z) / 2 at clip 1
  np.testing.assert_allclose(jax.grad(total, argnums=1)(g, jnp.float32(1.0)), noise_sum,
                             rtol=1e-5)
  per_clip = jax.jit(jax.vmap(jax.grad(total), in_axes=(None, 0)))(g, jnp.asarray([1.0, 2.0]))
  for grad in jax.tree_util.tree_leaves(per_clip):
    np.testing.assert_allclose(grad, 0.5)
