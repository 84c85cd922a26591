import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from trustjax import privacy, training
from trustjax.data import gather_batch
from tests.privacy.helpers import (clipped_grad_sum, dp_sgd_step, params_on_1_and_8_devices,
                                   tiny_problem, virtual_batch_accumulate, virtual_batch_apply)


def _config(**kw):
  base = dict(l2_clip=0.5, noise_multiplier=0.0, sampling_rate=0.25, num_examples=32,
              max_batch_size=16)
  base.update(kw)
  return privacy.DPConfig(**base)


def test_dp_step_without_noise_is_sgd_on_clipped_sum_over_expected_batch():
  loss_fn, params, batch = tiny_problem(batch_size=8, scale=3.0, model="bag")
  cfg = _config(num_examples=40, sampling_rate=0.2, max_batch_size=8)  # expected batch 8
  opt = optax.sgd(1.0)
  new, _, metrics = dp_sgd_step(params, opt.init(params), batch, jax.random.key(0),
                                        loss_fn=loss_fn, optimizer=opt, config=cfg)
  total, _ = clipped_grad_sum(loss_fn, params, batch, l2_clip=0.5)
  chex.assert_trees_all_close(new, jax.tree_util.tree_map(lambda p, g: p - g / 8.0, params,
                                                          total), atol=1e-6)
  assert float(metrics["count"]) == float(batch["mask"].sum())


def test_noise_std_through_the_step():
  """With a loss whose gradient is zero, the update is pure noise of std sigma*C/(qN)."""
  params = {"w": jnp.zeros((20000,))}
  loss_fn = lambda p, b: 0.0 * jnp.sum(p["w"]) + 0.0 * b["x"]
  batch = {"x": jnp.ones((4,)), "mask": jnp.ones((4,), bool)}
  cfg = _config(l2_clip=2.0, noise_multiplier=1.5, sampling_rate=0.1, num_examples=100,
                max_batch_size=4)
  opt = optax.sgd(1.0)
  new, _, _ = dp_sgd_step(params, opt.init(params), batch, jax.random.key(1),
                                  loss_fn=loss_fn, optimizer=opt, config=cfg)
  std = 1.5 * 2.0 / 10.0
  x = -np.asarray(new["w"])
  assert scipy.stats.kstest(x, "norm", args=(0, std)).pvalue > 1e-3
  assert scipy.stats.kstest(x, "norm", args=(0, 1.5 * std)).pvalue < 1e-6
  assert scipy.stats.kstest(x, "norm", args=(0, std / 1.5)).pvalue < 1e-6


@pytest.mark.parametrize("method", ["vmap", "bookkeeping"])
def test_one_trace_for_all_poisson_batches(method):
  chex.clear_trace_counter()
  loss_fn, params, _ = tiny_problem(model="bag")
  rng = np.random.default_rng(0)
  arrays = {"tokens": rng.integers(1, 40, (64, 6)).astype(np.int32),
            "label": rng.integers(0, 3, 64).astype(np.int32)}
  cfg = _config(noise_multiplier=1.0, sampling_rate=0.2, num_examples=64, max_batch_size=24,
                method=method)
  opt = optax.adam(1e-3)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, opt_state, batch, key):
    return privacy.dp_sgd_step(params, opt_state, batch, key, loss_fn=loss_fn, optimizer=opt,
                               config=cfg)

  opt_state = opt.init(params)
  sizes = set()
  for t, pb in enumerate(privacy.poisson_batches(0, 64, 0.2, 24, num_steps=8)):
    sizes.add(pb.size)
    params, opt_state, _ = step(params, opt_state, gather_batch(arrays, pb.indices, pb.mask),
                                jax.random.key(t))
  assert len(sizes) > 2  # the realised batch sizes varied; the program did not


def test_virtual_batches_add_noise_once():
  loss_fn, params, batch = tiny_problem(batch_size=9, scale=2.0, model="bag")
  cfg = _config(noise_multiplier=0.8, sampling_rate=0.3, num_examples=30, max_batch_size=9)
  opt = optax.sgd(0.5)
  key = jax.random.key(5)
  direct, _, m1 = dp_sgd_step(params, opt.init(params), batch, key, loss_fn=loss_fn,
                                      optimizer=opt, config=cfg)
  acc = privacy.virtual_batch_init(params)
  for s in (slice(0, 3), slice(3, 6), slice(6, 9)):
    acc = virtual_batch_accumulate(acc, params, {k: v[s] for k, v in batch.items()},
                                           loss_fn=loss_fn, config=cfg)
  virtual, _, m2 = virtual_batch_apply(acc, params, opt.init(params), key,
                                               optimizer=opt, config=cfg)
  chex.assert_trees_all_close(virtual, direct, atol=1e-5)
  chex.assert_trees_all_close(m1, m2, rtol=1e-5)


def test_microbatching_gives_the_same_step():
  loss_fn, params, batch = tiny_problem(batch_size=8, scale=2.0, model="bag")
  opt = optax.sgd(0.5)
  outs = [dp_sgd_step(params, opt.init(params), batch, jax.random.key(2), loss_fn=loss_fn,
                              optimizer=opt, config=_config(noise_multiplier=1.0,
                                                            microbatch_size=m))[0]
          for m in (None, 3)]
  chex.assert_trees_all_close(outs[0], outs[1], atol=1e-5)


@pytest.mark.parametrize("amplified", [False, True])
def test_sharded_over_8_devices_equals_single_device(amplified):
  """DP-SGD, and amplified DP-MF (cyclic Poisson samples of 3 groups, its noise history)."""
  assert jax.device_count() >= 8, "tests/conftest.py forces 8 host devices"
  loss_fn, params, _ = tiny_problem(model="bag")
  rng = np.random.default_rng(1)
  arrays = {"tokens": rng.integers(1, 40, (64, 6)).astype(np.int32),
            "label": rng.integers(0, 3, 64).astype(np.int32)}
  cfg = (privacy.AmplifiedMFConfig(l2_clip=1.0, noise_multiplier=1.0, sampling_rate=0.6,
                                   num_examples=64, max_batch_size=24, bands=3) if amplified else
         _config(noise_multiplier=1.0, sampling_rate=0.2, num_examples=64, max_batch_size=24))
  results = params_on_1_and_8_devices(loss_fn, params, cfg, optax.adam(1e-2),
                                      training.PoissonSchedule(arrays, cfg, seed=0), steps=3)
  chex.assert_trees_all_close(results[0], results[1], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("field,value", [("l2_clip", 0.0), ("l2_clip", -1.0),
                                         ("noise_multiplier", -0.1), ("sampling_rate", 0.0),
                                         ("sampling_rate", 1.01), ("num_examples", 0),
                                         ("max_batch_size", 0), ("method", "ghosts"),
                                         ("microbatch_size", 0), ("normalization", "tanh"),
                                         ("auto_s_gamma", 0.0)])
def test_dpconfig_rejects_bad_values(field, value):
  with pytest.raises(ValueError, match=field):
    _config(**{field: value})


def test_frozen_parameters_stay_fixed_and_get_no_noise():
  """make_train_step(frozen=...): the frozen leaves come out bit for bit unchanged, the trainable
  ones get noise of std sigma*C/(qN), and the optimizer's state covers the trainable ones only."""
  params = {"a": {"w": jnp.zeros((20000,))}, "b": {"w": jnp.arange(500.0)}}
  loss_fn = lambda p, b: 0.0 * (jnp.sum(p["a"]["w"]) + jnp.sum(p["b"]["w"])) + 0.0 * b["x"]
  cfg = _config(l2_clip=2.0, noise_multiplier=1.5, sampling_rate=0.1, num_examples=100,
                max_batch_size=4)
  opt = optax.sgd(1.0, momentum=0.9)
  state = training.create_state(params, opt, jax.random.key(1), frozen=("b",))
  assert [x.shape for x in jax.tree_util.tree_leaves(state.opt_state)] == [(20000,)]
  step = training.make_train_step(loss_fn, opt, cfg, frozen=("b",), donate=False)
  new, _ = step(state, {"x": jnp.ones((4,)), "mask": jnp.ones((4,), bool)})
  np.testing.assert_array_equal(new.params["b"]["w"], params["b"]["w"])
  x = -np.asarray(new.params["a"]["w"])
  std = 1.5 * 2.0 / 10.0
  assert scipy.stats.kstest(x, "norm", args=(0, std)).pvalue > 1e-3
  assert scipy.stats.kstest(x, "norm", args=(0, 1.5 * std)).pvalue < 1e-6


@pytest.mark.parametrize("method", ["vmap", "bookkeeping"])
def test_frozen_clipped_sum_sensitivity_on_neighbouring_batches(method):
  """Removing one example moves the clipped sum over the trainable parameters by at most C."""
  loss_fn, params, batch = tiny_problem(batch_size=8)
  train, fixed = training.split_frozen(params, ("token_embed", "block_0/attn"))
  loss = training.with_frozen(loss_fn, fixed)
  _, aux = clipped_grad_sum(loss, train, batch, l2_clip=1e9, method="vmap")
  clip = 0.5 * float(jnp.min(jnp.where(batch["mask"], aux["norms"], jnp.inf)))  # all clipped
  full, _ = clipped_grad_sum(loss, train, batch, l2_clip=clip, method=method)
  for i in np.flatnonzero(np.asarray(batch["mask"])):
    nb = dict(batch, mask=batch["mask"].at[i].set(False))
    less, _ = clipped_grad_sum(loss, train, nb, l2_clip=clip, method=method)
    diff = np.sqrt(sum(np.sum(np.square(a - b)) for a, b in
                       zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(less))))
    assert diff == pytest.approx(clip, rel=1e-3)
