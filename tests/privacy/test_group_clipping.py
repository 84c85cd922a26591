"""Group-wise clipping (fixed per-class clip scales, DPSGD-F) and bounded adaptive clipping."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from tests.privacy.helpers import (clipped_grad_sum, dp_sgd_step, params_on_1_and_8_devices,
                                   tiny_problem)
from trustjax import privacy, training
from trustjax.privacy import dpsgd_f, quantile
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
  with pytest.raises(ValueError, match="AmplifiedMFConfig takes neither"):
    AmplifiedMFConfig(l2_clip=1.0, noise_multiplier=1.0, sampling_rate=0.5, num_examples=40,
                      max_batch_size=32, bands=2, class_clip_scales=(1.0, 2.0))
  for floor in (-0.1, 0.2):
    with pytest.raises(ValueError, match=r"min_clip must lie in \[0, initial_clip=0.1\]"):
      quantile.QuantileClipping(initial_clip=0.1, min_clip=floor)
  loss_fn, params, batch = tiny_problem(batch_size=4, seed=1, model="bag")
  with pytest.raises(ValueError, match="for one flat clip"):
    clipped_grad_sum(loss_fn, params, dict(batch, clip_scale=jnp.ones(4)), l2_clip=1.0,
                     method="vmap", per_layer="equal")


def _dpsgd_f_reference(norms, labels, mask, key, c0, sigma1, k):
  """float64 loop of DPSGD-F's bounds from the same noise draws."""
  noise = np.asarray(jax.random.normal(key, (2, k)), np.float64) * sigma1
  over, within = np.zeros(k), np.zeros(k)
  for n, y, real in zip(norms, labels, mask):
    if real:
      if n > c0:
        over[y] += 1
      else:
        within[y] += 1
  over = np.maximum(np.floor(over + noise[0]), 0)
  within = np.maximum(np.floor(within + noise[1]), 0)
  share = np.array([o / (o + w) if o + w > 0 else 1.0 for o, w in zip(over, within)])
  return c0 * (1 + share / (share.mean() + 1e-8))


@pytest.mark.parametrize("method", ["vmap", "bookkeeping", "ghost"])
def test_dpsgd_f_clips_each_class_to_its_bound_from_noisy_counts(method):
  """The optimizer receives the float64 loop's sum clipped to DPSGD-F's bounds (recomputed from
  the same count noise), over the expected batch; the sum's own noise is negligible here."""
  loss_fn, params, batch = tiny_problem(batch_size=12, seed=13, scale=3.0, model="bag")
  batch = dict(batch, label=jnp.asarray([0, 1, 2] * 4))
  adaptive = dpsgd_f.GroupAdaptiveClipping(num_groups=3, count_noise_multiplier=0.8)
  cfg = DPConfig(l2_clip=0.5, noise_multiplier=1e-6, sampling_rate=0.25, num_examples=48,
                 max_batch_size=12, method=method, group_adaptive=adaptive)
  zeros = lambda t: jax.tree_util.tree_map(jnp.zeros_like, t)
  keep = optax.GradientTransformation(zeros, lambda g, s, p=None: (zeros(g), g))
  key = jax.random.key(4)
  _, seen, metrics = dp_sgd_step(params, keep.init(params), batch, key, loss_fn=loss_fn,
                                 optimizer=keep, config=cfg)
  norms = np.asarray(clipped_grad_sum(loss_fn, params, batch, l2_clip=1.0)[1]["norms"])
  labels, real = np.asarray(batch["label"]), np.asarray(batch["mask"])
  bounds = _dpsgd_f_reference(norms, labels, real, jax.random.split(key)[1], 0.5, 0.8, 3)
  assert len(set(np.round(bounds, 6))) > 1  # the classes got different bounds
  grads = jax.device_get(privacy.per_example_grads(loss_fn, params, batch))
  leaves, treedef = jax.tree_util.tree_flatten(grads)
  want = [np.zeros(x.shape[1:]) for x in leaves]
  for i in range(12):
    factor = min(1.0, bounds[labels[i]] / norms[i]) if real[i] else 0.0
    for t, x in zip(want, leaves):
      t += factor * np.asarray(x[i], np.float64)
  got = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda g: g * 12.0, seen))
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-5)
  assert float(metrics["clipped"]) == np.sum(real & (norms > bounds[labels]))


def test_dpsgd_f_noise_is_at_the_largest_bound_and_the_ledger_pays_for_the_counts():
  """Zero gradients: every real row counts as within the clip, the bounds follow from the count
  noise alone, and the update is noise of std sigma_2 max_k C_k / qN, with sigma_eff (the
  ledger's) = (sigma_1^-2 + sigma_2^-2)^(-1/2)."""
  params = {"w": jnp.zeros((20000,))}
  loss_fn = lambda p, b: 0.0 * jnp.sum(p["w"]) + 0.0 * b["x"]
  batch = {"x": jnp.ones((6,)), "label": jnp.asarray([0, 0, 1, 1, 2, 2]),
           "mask": jnp.ones((6,), bool)}
  adaptive = dpsgd_f.GroupAdaptiveClipping(num_groups=3, count_noise_multiplier=2.0)
  cfg = DPConfig(l2_clip=2.0, noise_multiplier=1.5, sampling_rate=0.1, num_examples=100,
                 max_batch_size=6, method="vmap", group_adaptive=adaptive)
  sigma2 = cfg.sum_noise_multiplier
  assert (2.0 ** -2 + sigma2 ** -2) ** -0.5 == pytest.approx(1.5) and sigma2 > 1.5
  opt = optax.sgd(1.0)
  key = jax.random.key(9)
  new, _, metrics = dp_sgd_step(params, opt.init(params), batch, key, loss_fn=loss_fn,
                                optimizer=opt, config=cfg)
  bounds = _dpsgd_f_reference(np.zeros(6), [0, 0, 1, 1, 2, 2], [True] * 6,
                              jax.random.split(key)[1], 2.0, 2.0, 3)
  assert float(metrics["clip"]) == pytest.approx(bounds.max(), rel=1e-6)  # logged per step
  std = sigma2 * bounds.max() / 10.0
  x = -np.asarray(new["w"])
  assert scipy.stats.kstest(x, "norm", args=(0, std)).pvalue > 1e-3
  assert scipy.stats.kstest(x, "norm", args=(0, sigma2 * 2.0 / 10.0)).pvalue < 1e-6  # not at C0
  ledger = privacy.accounting.PrivacyLedger()
  cfg.record(ledger, steps=3)
  assert ledger.entries[0].noise_multiplier == 1.5
  assert bounds.max() <= 2.0 * (1 + 3)  # C_k <= C0 (1 + K): the sum's sensitivity stays bounded


def test_dpsgd_f_refuses_what_it_cannot_clip():
  adaptive = dpsgd_f.GroupAdaptiveClipping(num_groups=3)
  for kw, message in [({"microbatch_size": 4}, "not with adaptive, class_clip_scales"),
                      ({"per_layer": "equal"}, "not with adaptive, class_clip_scales"),
                      ({"normalization": "auto_s"}, "not with adaptive, class_clip_scales"),
                      ({"noise_multiplier": 10.0}, "count_noise_multiplier=10.0 is too small")]:
    with pytest.raises(ValueError, match=message):
      _config(**{"class_clip_scales": None, "group_adaptive": adaptive, "noise_multiplier": 1.0,
                 **kw})
  loss_fn, params, batch = tiny_problem(batch_size=4, seed=2, model="bag")
  with pytest.raises(ValueError, match="virtual batches clip to the fixed clip norm"):
    privacy.virtual_batch_accumulate(privacy.virtual_batch_init(params), params, batch,
                                     loss_fn=loss_fn, config=_config(
                                         class_clip_scales=None, group_adaptive=adaptive,
                                         noise_multiplier=1.0))
  for kw, message in [({"num_groups": 0}, "num_groups must be >= 1"),
                      ({"num_groups": 2, "count_noise_multiplier": 0.0}, "must be positive")]:
    with pytest.raises(ValueError, match=message):
      dpsgd_f.GroupAdaptiveClipping(**kw)


@pytest.mark.parametrize("variant", ["scales", "dpsgd_f"])
def test_group_clipping_sharded_over_8_devices_equals_one_device(variant):
  """Class scales and DPSGD-F's counts see the whole (global) batch when the batch is split over
  an 8-device mesh: three steps give the one-device parameters."""
  loss_fn, params, _ = tiny_problem(model="bag")
  rng = np.random.default_rng(2)
  arrays = {"tokens": rng.integers(1, 40, (64, 6)).astype(np.int32),
            "label": rng.integers(0, 3, 64).astype(np.int32)}
  extra = ({"class_clip_scales": (1.0, 2.0, 0.5)} if variant == "scales" else
           {"class_clip_scales": None,
            "group_adaptive": dpsgd_f.GroupAdaptiveClipping(num_groups=3,
                                                            count_noise_multiplier=2.0)})
  cfg = _config(l2_clip=0.05, noise_multiplier=1.0, sampling_rate=0.2, num_examples=64,
                max_batch_size=24, **extra)
  results = params_on_1_and_8_devices(loss_fn, params, cfg, optax.adam(1e-2),
                                      training.PoissonSchedule(arrays, cfg, seed=0), steps=3)
  chex.assert_trees_all_close(results[0], results[1], atol=2e-5, rtol=1e-4)
