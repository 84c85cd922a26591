"""Group-wise clipping (per-class clip scales) and bounded adaptive clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from tests.privacy.helpers import clipped_grad_sum, dp_sgd_step, tiny_problem
from trustjax import privacy
from trustjax.privacy import quantile
from trustjax.privacy.dp_mf import AmplifiedMFConfig
from trustjax.privacy.dp_sgd import DPConfig

SCALES = (0.5, 1.0, 3.0)  # the clip of class 0, 1 and 2, times l2_clip


def _config(**kw):
  base = dict(l2_clip=0.05, noise_multiplier=0.0, sampling_rate=0.25, num_examples=40,
              max_batch_size=10, class_clip_scales=SCALES)
  base.update(kw)
  return DPConfig(**base)


def _loop_sum(loss_fn, params, batch, l2_clip):
  """float64 reference: sum_i mask_i min(1, C s_(y_i) / ||g_i||) g_i, one example at a time."""
  grads = jax.device_get(privacy.per_example_grads(loss_fn, params, batch))
  leaves, treedef = jax.tree_util.tree_flatten(grads)
  total = [np.zeros(x.shape[1:]) for x in leaves]
  for i, (label, real) in enumerate(zip(np.asarray(batch["label"]), np.asarray(batch["mask"]))):
    g = [np.asarray(x[i], np.float64) for x in leaves]
    norm = np.sqrt(sum(np.sum(x ** 2) for x in g))
    clip = l2_clip * SCALES[label]
    for t, x in zip(total, g):
      t += real * min(1.0, clip / norm) * x
  return jax.tree_util.tree_unflatten(treedef, total)


@pytest.mark.parametrize("method,microbatch", [("vmap", None), ("ghost", None),
                                               ("bookkeeping", None), ("bookkeeping", 3)])
def test_each_class_is_clipped_to_its_own_norm(method, microbatch):
  """Without noise, the optimizer receives the float64 loop's class-clipped sum over the
  expected batch, whatever the method and microbatching."""
  loss_fn, params, batch = tiny_problem(batch_size=10, seed=11, scale=3.0, model="bag")
  batch = dict(batch, label=jnp.asarray([0, 1, 2, 2, 0, 1, 2, 0, 1, 2]))
  cfg = _config(method=method, microbatch_size=microbatch)
  zeros = lambda t: jax.tree_util.tree_map(jnp.zeros_like, t)
  keep = optax.GradientTransformation(zeros, lambda g, s, p=None: (zeros(g), g))  # keeps grads
  _, seen, metrics = dp_sgd_step(params, keep.init(params), batch, jax.random.key(0),
                                 loss_fn=loss_fn, optimizer=keep, config=cfg)
  want = _loop_sum(loss_fn, params, batch, 0.05)
  got = jax.tree_util.tree_map(lambda g: g * cfg.expected_batch_size, seen)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-7)
  norms = np.asarray(clipped_grad_sum(loss_fn, params, batch, l2_clip=1.0)[1]["norms"])
  real, clips = np.asarray(batch["mask"]), 0.05 * np.asarray(SCALES)[np.asarray(batch["label"])]
  # the scales decide: a row below its class's clip that one flat clip C would have clipped
  assert np.any(real & (norms > 0.05) & (norms <= clips)), (norms, clips)
  assert float(metrics["clipped"]) == np.sum(real & (norms > clips))  # each at its own clip


def test_sensitivity_is_the_largest_class_clip_on_neighbouring_batches():
  """Removing one example moves the clipped sum by at most C max_k s_k, and by exactly that for
  a large gradient of the class with the largest scale."""
  loss_fn, params, batch = tiny_problem(batch_size=10, seed=12, scale=3.0, model="bag")
  batch = dict(batch, label=jnp.asarray([2, 1, 0, 2, 0, 1, 2, 0, 1, 2]),
               mask=jnp.ones(10, bool))
  scale = jnp.asarray(SCALES, jnp.float32)[batch["label"]]
  full, _ = clipped_grad_sum(loss_fn, params, dict(batch, clip_scale=scale), l2_clip=0.05)
  changes = []
  for i in range(10):
    less, _ = clipped_grad_sum(loss_fn, params,
                               dict(batch, clip_scale=scale, mask=batch["mask"].at[i].set(False)),
                               l2_clip=0.05)
    diff = jax.tree_util.tree_map(lambda a, b: a - b, full, less)
    changes.append(float(jnp.sqrt(sum(jnp.sum(d ** 2) for d in jax.tree_util.tree_leaves(diff)))))
  changes = np.asarray(changes)
  assert changes.max() <= _config().sensitivity * (1 + 1e-5)
  assert _config().sensitivity == pytest.approx(0.15)
  np.testing.assert_allclose(changes, 0.05 * np.asarray(SCALES)[np.asarray(batch["label"])],
                             rtol=1e-4)  # every row clipped: each removal moves the sum by C s_k


def test_noise_is_at_the_largest_class_clip():
  """With a loss whose gradient is zero, the update is pure noise of std sigma C max_k s_k / qN,
  whichever classes the batch holds."""
  params = {"w": jnp.zeros((20000,))}
  loss_fn = lambda p, b: 0.0 * jnp.sum(p["w"]) + 0.0 * b["x"]
  batch = {"x": jnp.ones((4,)), "label": jnp.zeros((4,), jnp.int32), "mask": jnp.ones((4,), bool)}
  cfg = _config(l2_clip=2.0, noise_multiplier=1.5, sampling_rate=0.1, num_examples=100,
                max_batch_size=4)
  opt = optax.sgd(1.0)
  new, _, _ = dp_sgd_step(params, opt.init(params), batch, jax.random.key(1), loss_fn=loss_fn,
                          optimizer=opt, config=cfg)
  std = 1.5 * 2.0 * 3.0 / 10.0
  x = -np.asarray(new["w"])
  assert scipy.stats.kstest(x, "norm", args=(0, std)).pvalue > 1e-3
  assert scipy.stats.kstest(x, "norm", args=(0, std / 3.0)).pvalue < 1e-6  # not at C


def test_bounded_adaptive_clip_follows_the_recursion_and_stops_at_its_floor():
  """C <- max(C_min, C exp(-eta (b - gamma))) against a float64 loop with the same draws; every
  norm is below the clip, so the unbounded clip falls past the floor and the bounded one stays."""
  norms, mask = jnp.full((16,), 0.01), jnp.ones((16,), bool)
  out = {}
  for floor in (0.0, 0.2):
    cfg = quantile.QuantileClipping(target_quantile=0.5, learning_rate=0.3,
                                    count_noise_multiplier=1.0, initial_clip=1.0, min_clip=floor)
    clip, ref, clips = jnp.float32(1.0), 1.0, []
    for t in range(30):
      key = jax.random.key(t)
      clip, frac = quantile.update_clip(clip, norms, mask, key, expected_count=16.0, config=cfg)
      noisy = 8.0 + float(jax.random.normal(key, ()))  # 16 rows below the clip, centred: 8
      b = noisy / 16.0 + 0.5
      assert float(frac) == pytest.approx(b, rel=1e-6)
      ref = max(floor, ref * np.exp(-0.3 * (b - 0.5)))
      assert float(clip) == pytest.approx(ref, rel=1e-5)
      clips.append(float(clip))
    out[floor] = clips
  assert min(out[0.0]) < 0.2 and min(out[0.2]) == pytest.approx(0.2)
  assert out[0.2][-1] == pytest.approx(0.2)


def test_bad_scales_and_floors_name_themselves():
  for kw, message in [({"class_clip_scales": (1.0, 0.0)}, "must be positive numbers"),
                      ({"class_clip_scales": ()}, "must be positive numbers"),
                      ({"class_clip_scales": (1.0, float("inf"))}, "must be positive numbers"),
                      ({"per_layer": "equal"}, "not with per_layer or adaptive"),
                      ({"adaptive": quantile.QuantileClipping()},
                       "not with per_layer or adaptive")]:
    with pytest.raises(ValueError, match=message):
      _config(**kw)
  with pytest.raises(ValueError, match="AmplifiedMFConfig takes class_clip_scales=None"):
    AmplifiedMFConfig(l2_clip=1.0, noise_multiplier=1.0, sampling_rate=0.5, num_examples=40,
                      max_batch_size=32, bands=2, class_clip_scales=(1.0, 2.0))
  for floor in (-0.1, 0.2):
    with pytest.raises(ValueError, match=r"min_clip must lie in \[0, initial_clip=0.1\]"):
      quantile.QuantileClipping(initial_clip=0.1, min_clip=floor)
  loss_fn, params, batch = tiny_problem(batch_size=4, seed=1, model="bag")
  with pytest.raises(ValueError, match="for one flat clip"):
    clipped_grad_sum(loss_fn, params, dict(batch, clip_scale=jnp.ones(4)), l2_clip=1.0,
                     method="vmap", per_layer="equal")
