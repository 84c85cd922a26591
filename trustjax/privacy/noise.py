"""The Gaussian mechanism on the clipped gradient sum."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from trustjax.types import Params, PRNGKey

# Threefry-2x32's rotation constants, two groups of four rounds used alternately.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = 0x1BD11BDA


def _threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array):
  """The Threefry-2x32 block cipher, 20 rounds, as straight-line elementwise ops.

  Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011
  (Threefry-2x32-20: key injection every four rounds). JAX's CPU lowering of the same function
  runs the five four-round groups as a `while` loop, which writes both words to memory after
  every group; written out, XLA fuses all the rounds (and the ops that use the result) into one
  pass over the counters.
  """
  ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(_KEY_PARITY))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = (x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r))
      x1 = x0 ^ x1
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
  return x0, x1


def _threefry_key_data(key: PRNGKey, n: int):
  """The uint32[2] key data if `n` draws from `key` can take the written-out path, else None
  (another PRNG implementation, a batch of keys, or 2^32 - 1 draws or more)."""
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  if typed:
    threefry = str(jax.random.key_impl(key)) == "threefry2x32" and key.shape == ()
  else:  # a raw key follows the configured default implementation
    threefry = jax.config.jax_default_prng_impl == "threefry2x32" and jnp.shape(key) == (2,)
  if not threefry or n >= 2 ** 32 - 1:
    return None
  return jax.random.key_data(key) if typed else jnp.asarray(key, jnp.uint32)


# Giles' single-precision erfinv: polynomial coefficients (highest degree first) for
# w = -log(1 - x^2) < 5, in t = w - 2.5, and for w >= 5, in t = sqrt(w) - 3.
_ERFINV_CENTRAL = (2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06,
                   0.00021858087, -0.00125372503, -0.00417768164, 0.246640727, 1.50140941)
_ERFINV_TAIL = (-0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773,
                -0.0076224613, 0.00943887047, 1.00167406, 2.83297682)
# The uniform's lower end, as in jax.random.normal: the largest float32 above -1.
_LOW = np.nextafter(np.float32(-1.0), np.float32(0.0))


def _erfinv(x: jax.Array) -> jax.Array:
  """The inverse error function on float32 x in (-1, 1) (|x| = 1 gives +-inf).

  Giles, "Approximating the erfinv function", GPU Computing Gems Jade Edition, 2011: single
  precision, one polynomial in w = -log(1 - x^2) below w = 5 and one in sqrt(w) above. XLA's
  `erf_inv` uses the same polynomials with w = -log1p(-x^2); on a CPU its `log1p` costs twice a
  `log` (0.97 vs 0.49 ms for 800k values), and for this purpose nothing is lost: 1 - x^2 is exact
  for |x| >= 2^-1/2 (Sterbenz), and below that w's rounding error (at most 2^-24 in absolute
  terms) barely moves the polynomial. Within 2.6e-7 relative of float64 erfinv on a grid of two
  million points over (-1, 1) (XLA's `erf_inv`: 5.7e-6).
  """
  x = jnp.asarray(x, jnp.float32)
  w = -jnp.log(jnp.float32(1.0) - x * x)
  central = w < jnp.float32(5.0)
  t = jnp.where(central, w - jnp.float32(2.5), jnp.sqrt(w) - jnp.float32(3.0))
  p = jnp.where(central, np.float32(_ERFINV_CENTRAL[0]), np.float32(_ERFINV_TAIL[0]))
  for a, b in zip(_ERFINV_CENTRAL[1:], _ERFINV_TAIL[1:]):
    p = jnp.where(central, np.float32(a), np.float32(b)) + p * t
  return jnp.where(jnp.abs(x) == 1, x * jnp.float32(np.inf), p * x)


def _bits_to_uniform(bits: jax.Array) -> jax.Array:
  """jax.random.uniform's map onto [nextafter(-1, 0), 1): 23 random mantissa bits under exponent 0
  give a float in [1, 2), then an affine map (clamped below, as jax.random.uniform does)."""
  floats = jax.lax.bitcast_convert_type((bits >> jnp.uint32(9)) | jnp.uint32(0x3F800000),
                                        jnp.float32) - jnp.float32(1.0)
  return jax.lax.max(_LOW, floats * (np.float32(1.0) - _LOW) + _LOW)


def _to_normal(u: jax.Array) -> jax.Array:
  """Inverse-CDF sampling: N(0, 1) = sqrt(2) * erfinv(u) for u uniform on (-1, 1)."""
  return np.float32(np.sqrt(2.0)) * _erfinv(u)


def _uniform(key: PRNGKey, shape: tuple[int, ...]) -> jax.Array:
  """float32 uniforms on [nextafter(-1, 0), 1), equal bit for bit to `jax.random.uniform(key,
  shape, minval=nextafter(-1, 0), maxval=1)` under `jax.threefry_partitionable(False)` (the
  uniforms `jax.random.normal` transforms), with the cipher's 20 rounds written out.

  Same generator, key, counter layout (counters 0..n-1 split into two halves that form the
  cipher's two words; an odd count padded with a 0) and bits-to-float map. Keys of another PRNG
  implementation (or more than one key), and draws of 2^32 - 1 values or more, go to
  `jax.random.uniform` itself.
  """
  shape = tuple(shape)
  n = math.prod(shape)
  data = _threefry_key_data(key, n)
  if data is None:
    with jax.threefry_partitionable(False):
      return jax.random.uniform(key, shape, jnp.float32, _LOW, 1.0)
  if n == 0:
    return jnp.zeros(shape, jnp.float32)
  # JAX concatenates the first words of all pairs, then the second words. Here each element
  # picks its own word from its own pair: element i < half is word 0 of (i, i + half), element
  # i >= half is word 1 of (i - half, i). Same bits, but elementwise: a `concatenate` of the
  # bits fused with a parameter (the gradient, in a caller's `g + std * z`) made XLA CPU's loop
  # about 6x slower than the same draw alone (6.4 vs 1.0 ms for 784x512 values).
  half = (n + 1) // 2
  i = jax.lax.iota(jnp.uint32, n)
  first = i < jnp.uint32(half)
  c0 = jnp.where(first, i, i - jnp.uint32(half))
  y0, y1 = _threefry2x32(data[0], data[1], c0, _pad_last_pair(c0, c0 + jnp.uint32(half), n, half))
  return _bits_to_uniform(jnp.where(first, y0, y1).reshape(shape))


def _pad_last_pair(c0: jax.Array, c1: jax.Array, n: int, half: int) -> jax.Array:
  """An odd count is padded with a 0: the last pair's second counter is 0, not n."""
  return jnp.where(c0 == half - 1, jnp.uint32(0), c1) if n % 2 else c1


def standard_normal(key: PRNGKey, shape: tuple[int, ...]) -> jax.Array:
  """float32 N(0, 1) draws: `jax.random.normal`'s uniforms (bit for bit, with the cipher's 20
  rounds in one fused pass) through `sqrt(2) * erfinv` with this module's `_erfinv`.

  The values agree with `jax.random.normal(key, shape)` (non-partitionable threefry) to about
  1e-5 relative; the difference is XLA's erfinv against this one. In benchmark_dp.py's MLP
  step on a 2-core CPU, writing the cipher out cut the time the noise adds from 4.1 ms to 1.7 ms
  (1.78x -> 1.36x of the non-DP step); the cheaper erfinv takes off a little more (a few tenths
  of a millisecond, see BENCHMARKS.md).

  Args:
    key: a typed threefry key (`jax.random.key`) or a raw uint32[2] key (`PRNGKey`); other
      keys go through `jax.random.uniform`.
    shape: the output shape.
  """
  return _to_normal(_uniform(key, shape))


def _add_normal(g: jax.Array, key: PRNGKey, std, divisor) -> jax.Array:
  """`(g + std * standard_normal(key, g.shape)) / divisor` (the same draws), with one cipher
  evaluation per pair of draws: the first half of `g` takes the pairs' first words, the second
  half their second words, and the two halves are concatenated only after the noise is added.
  About 0.15 ms faster than the elementwise form on benchmark_dp's MLP (670k draws)."""
  n = g.size
  data = _threefry_key_data(key, n)
  if data is None or n < 2:
    return (g + std * standard_normal(key, g.shape)) / divisor
  half = (n + 1) // 2
  c0 = jax.lax.iota(jnp.uint32, half)
  y0, y1 = _threefry2x32(data[0], data[1], c0, _pad_last_pair(c0, c0 + jnp.uint32(half), n, half))
  flat = g.reshape(-1)
  first = (flat[:half] + std * _to_normal(_bits_to_uniform(y0))) / divisor
  second = (flat[half:] + std * _to_normal(_bits_to_uniform(y1[:n - half]))) / divisor
  return jnp.concatenate([first, second]).reshape(g.shape)


def privatize(grad_sum: Params, key: PRNGKey, *, l2_clip: float, noise_multiplier: float,
              expected_batch_size: float) -> Params:
  """Adds N(0, (noise_multiplier * l2_clip)^2) to every coordinate of the clipped SUM, then
  divides by the expected batch size (a public constant under Poisson sampling; dividing by the
  realised batch size would leak it).

  Args:
    grad_sum: sum of clipped per-example gradients (sensitivity `l2_clip`).
    key: PRNG key, used once.
    l2_clip: clipping norm C (a float, or a scalar array when the clip adapts).
    noise_multiplier: sigma; the noise standard deviation is sigma * C on the sum.
    expected_batch_size: q * N.

  Returns:
    The noisy mean gradient, whose per-coordinate noise std is sigma * C / expected_batch_size.

  Reference: Abadi et al., "Deep Learning with Differential Privacy", CCS 2016, Algorithm 1.
  """
  if isinstance(l2_clip, (int, float)) and not l2_clip > 0:  # arrays: adaptive clipping
    raise ValueError(f"l2_clip must be positive, got {l2_clip=}")
  if not noise_multiplier >= 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier=}")
  if not expected_batch_size > 0:
    raise ValueError(f"expected_batch_size must be positive, got {expected_batch_size=}")
  leaves, treedef = jax.tree_util.tree_flatten(grad_sum)
  if noise_multiplier == 0:  # no noise: nothing to draw (the same result as adding 0 * N(0, 1))
    return jax.tree_util.tree_unflatten(treedef, [g / expected_batch_size for g in leaves])
  keys = jax.random.split(key, len(leaves))
  std = noise_multiplier * l2_clip
  # One key per leaf; each leaf's noise is threefry's non-partitionable stream (two 32-bit draws
  # per cipher evaluation), generated whole on every device: that suits replicated parameters
  # (data parallelism), the only layout trustjax uses.
  def add_noise(operands):
    pairs, std = operands
    return [_add_normal(g, k, std, expected_batch_size) for g, k in pairs]

  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  token = jnp.asarray(data).reshape(-1)[0].astype(jnp.uint32)
  # std goes in as an operand, not a closure: an adaptive clip is an array, batched under vmap.
  noisy = _in_one_pass_on_cpu(add_noise, token,
                              (list(zip(leaves, keys)), jnp.asarray(std, jnp.float32)))
  return jax.tree_util.tree_unflatten(treedef, noisy)


def _in_one_pass_on_cpu(fn, token: jax.Array, operands):
  """`fn(operands)`; on a CPU, inside a `lax.cond` whose predicate (`token != token + 1`, uint32
  arithmetic) is always true but which XLA cannot fold, and whose branches are both `fn`.

  The conditional keeps XLA CPU from fusing `fn`'s elementwise work into the ops that use its
  results: each output is computed in one pass and written once. `privatize` needs that because
  Adam reads the noisy gradient in two fusions: fused into both, XLA CPU either recomputed the
  cipher in each or stored erfinv's intermediates (5.6 MiB on benchmark_dp's MLP, whose non-DP
  step needs 16.1 MiB). `lax.optimization_barrier` does not do this: XLA's CPU pipeline drops it
  before fusion. Under `vmap` the predicate is taken from the first element's token, so the
  conditional stays a conditional (a batched predicate would turn it into a select that evaluates
  both branches). On other platforms this is `fn(operands)` itself: the fusion problem was seen
  on XLA CPU, and on a GPU a conditional would copy its predicate to the host every step.
  """

  @jax.custom_batching.custom_vmap
  def one_pass(token, operands):
    return jax.lax.cond(token != token + jnp.uint32(1), fn, fn, operands)

  @one_pass.def_vmap
  def _batched(axis_size, in_batched, token, operands):
    del axis_size
    token_batched, operands_batched = in_batched
    in_axes = jax.tree_util.tree_map(lambda b: 0 if b else None, operands_batched)
    batched_fn = jax.vmap(fn, in_axes=(in_axes,))
    out = _in_one_pass_on_cpu(batched_fn, token[0] if token_batched else token, operands)
    return out, jax.tree_util.tree_map(lambda _: True, out)

  # custom_vmap has no autodiff rule, so derivatives are those of `fn` itself.
  @jax.custom_jvp
  def call(token, operands):
    return jax.lax.platform_dependent(token, operands, cpu=one_pass,
                                      default=lambda _, ops: fn(ops))

  @call.defjvp
  def _jvp(primals, tangents):
    token, operands = primals
    return call(token, operands), jax.jvp(fn, (operands,), (tangents[1],))[1]

  return call(token, operands)
