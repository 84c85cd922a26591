import jax
import jax.numpy as jnp
import numpy as np
import pytest
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
