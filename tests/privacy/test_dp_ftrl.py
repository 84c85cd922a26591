"""DP-FTRL (tree aggregation) against written-out references: the noise of each prefix sum, the
FTRL closed form of the parameters, the sensitivity of the released tree and the accounting."""

import math

import chex
import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
import scipy.stats

from trustjax import privacy, training
from trustjax.privacy import accounting
from trustjax.privacy.dp_ftrl import _node_noise
from tests.privacy.helpers import clipped_grad_sum, params_on_1_and_8_devices, tiny_problem

residual_noise = jax.jit(privacy.residual_noise)


def _reference_prefix_noise(key, t, like, std):
  """The tree's noise on prefix sum t, by the dyadic decomposition of [1, t] written out: for
  every set bit l of t, the node covering the 2^l steps that end at (t >> l) << l."""
  out = np.zeros(like.shape, np.float64)
  for level in range(t.bit_length()):
    if t >> level & 1:
      index = (t >> level) - 1  # node [index * 2^l + 1, (index + 1) * 2^l]
      assert (index + 1) << level == (t >> level) << level
      out += np.asarray(_node_noise(key, level, index, [like])[0], np.float64)
  return std * out


def test_residuals_sum_to_the_tree_noise_of_each_prefix():
  key, like, std = jax.random.key(3), jnp.zeros((5, 7)), 1.7
  total = np.zeros((5, 7), np.float64)
  for t in range(1, 40):
    total += np.asarray(residual_noise(key, t, like, std), np.float64)
    np.testing.assert_allclose(total, _reference_prefix_noise(key, t, like, std),
                               rtol=1e-5, atol=1e-4, err_msg=f"t={t}")


def test_the_steps_noise_path_adds_the_same_residuals():
  """add_residual_noise adds to a pytree sum what residual_noise draws alone (the residuals the
  tests above check), then divides, at odd and even positions."""
  key = jax.random.key(9)
  g = {"a": jnp.arange(12.0).reshape(3, 4), "b": {"c": jnp.ones((7,))}}
  add = jax.jit(privacy.add_residual_noise,
                static_argnames=("l2_clip", "noise_multiplier", "divisor"))
  for t in range(1, 10):
    want = jax.tree_util.tree_map(lambda x, z: (x + z) / 5.0, g, residual_noise(key, t, g, 1.2))
    chex.assert_trees_all_close(add(g, key, t, l2_clip=0.8, noise_multiplier=1.5, divisor=5.0),
                                want, atol=1e-5)
  chex.assert_trees_all_close(add(g, key, 4, l2_clip=0.8, noise_multiplier=0.0, divisor=5.0),
                              jax.tree_util.tree_map(lambda x: x / 5.0, g))


def test_node_noise_std_and_prefix_variance():
  """Prefix sum 7 = 3 independent nodes (std sqrt(3) s); residual 8 = 1 new node minus the
  3 of prefix 7 (std 2 s)."""
  key, like, s = jax.random.key(0), jnp.zeros((30000,)), 0.8
  prefix7 = sum(np.asarray(residual_noise(key, t, like, s)) for t in range(1, 8))
  res8 = np.asarray(residual_noise(key, 8, like, s))
  for x, std in ((prefix7, math.sqrt(3) * s), (res8, 2 * s), (prefix7 + res8, s)):
    assert scipy.stats.kstest(x, "norm", args=(0, std)).pvalue > 1e-3
    assert scipy.stats.kstest(x, "norm", args=(0, 1.2 * std)).pvalue < 1e-6
  # other trees (keys) and other nodes are independent
  other = np.asarray(residual_noise(jax.random.fold_in(key, 1), 1, like, s))
  assert abs(np.corrcoef(other, np.asarray(residual_noise(key, 1, like, s)))[0, 1]) < 0.03


@pytest.mark.parametrize("steps_per_tree", list(range(1, 70)) + [255, 256, 1000])
def test_an_example_adds_to_at_most_depth_released_nodes(steps_per_tree):
  """The sensitivity of a tree's release: the nodes that the prefix sums 1..T use (the reference
  decomposition, which the residuals match above) that cover leaf i; at most
  tree_depth(T) = ceil(log2(T + 1)) for every leaf, reached by some leaf, as dp_accounting's
  tree RDP assumes."""
  T = steps_per_tree
  released = {(l, (t >> l) - 1) for t in range(1, T + 1) for l in range(t.bit_length())
              if t >> l & 1}
  counts = [sum(1 for l, j in released if j << l < i <= (j + 1) << l) for i in range(1, T + 1)]
  assert max(counts) == accounting.tree_depth(T) == math.ceil(math.log2(T + 1))


def test_the_released_prefix_sums_are_as_private_as_accounted():
  """The prefix sums' noise over a tree of T = 7 steps is Gaussian with covariance
  sigma^2 C^2 M M^T (M: which nodes each prefix sums); an example at step s moves prefix t >= s
  by C, so the release is mu-GDP with mu^2 = d^T Sigma^-1 d (d = C 1[t >= s]). With Sigma
  estimated from 60,000 trees of the library's residuals, mu^2 / (1 / sigma^2) per step s is the
  number of released nodes covering s: 3, 2, 2, 1, 2, 1, 1, at most tree_depth(7) = 3, the
  sensitivity^2 the accountant uses."""
  T, sigma, clip = 7, 1.3, 0.5
  keys = jax.random.split(jax.random.key(11), 60000)
  one = jax.vmap(lambda k, t: privacy.residual_noise(k, t, jnp.zeros(()), sigma * clip),
                 in_axes=(0, None))
  prefix = np.cumsum(np.stack([np.asarray(one(keys, t), np.float64) for t in range(1, T + 1)],
                              axis=1), axis=1)
  inv = np.linalg.inv(np.cov(prefix, rowvar=False))
  mu2 = np.array([clip * (np.arange(1, T + 1) >= s) @ inv @ (clip * (np.arange(1, T + 1) >= s))
                  for s in range(1, T + 1)])
  np.testing.assert_allclose(mu2 * sigma ** 2, [3, 2, 2, 1, 2, 1, 1], rtol=0.04)
  assert max(mu2 * sigma ** 2) <= accounting.tree_depth(T) * 1.04


def _linear_problem(n=12, dim=6, seed=0):
  """Per-example loss -<w, x_i>: the clipped gradient of example i is -clip(x_i), whatever w."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, dim)).astype(np.float32) * rng.uniform(0.2, 3, (n, 1)).astype(np.float32)
  loss_fn = lambda p, b: -(b["x"] @ p["w"])
  return loss_fn, {"w": jnp.zeros((dim,))}, x


def test_replacing_one_example_with_zero_moves_each_release_by_at_most_c():
  """Neighbouring datasets (one example replaced with a zero one, same noise key): every
  released prefix sum S~_t, read back from the SGD parameters theta_t = -lr S~_t / B, differs by
  the clipped example from its step on, so by at most C and exactly C when its norm is above."""
  loss_fn, params, x = _linear_problem()
  clip, lr, b = 1.0, 0.5, 4
  cfg = privacy.DPFTRLConfig(l2_clip=clip, noise_multiplier=2.0, batch_size=b, num_examples=12)
  opt = optax.sgd(lr)
  step = jax.jit(privacy.dp_ftrl_step, static_argnames=("loss_fn", "optimizer", "config"))
  victim = int(np.argmax(np.linalg.norm(x, axis=1)))  # norm > C: its clipped gradient is C
  released = []
  for data_mask in (np.ones(12, bool), np.arange(12) != victim):
    p, s, sums = params, opt.init(params), []
    for t in range(6):  # two trees of T = 3
      rows = np.arange(t * b, (t + 1) * b) % 12
      batch = {"x": jnp.asarray(x[rows]), "mask": jnp.asarray(data_mask[rows])}
      p, s, _ = step(p, s, batch, jax.random.key(7), t, loss_fn=loss_fn, optimizer=opt,
                     config=cfg)
      sums.append(-np.asarray(p["w"]) * b / lr)  # the noisy sums of every step so far
    sums = np.array(sums)
    sums[3:] -= sums[2]  # the second tree's prefix sums (the tree restarts with the epoch)
    released.append(sums)
  gap = np.linalg.norm(released[0] - released[1], axis=1)
  at = victim // b  # the victim's step in each tree
  expected = np.array([clip if t % 3 >= at else 0.0 for t in range(6)])
  np.testing.assert_allclose(gap, expected, atol=2e-5)
  assert np.isfinite(released[0]).all() and np.abs(released[0]).max() > 3  # noise was added


def test_sgd_parameters_are_ftrl_on_the_noisy_prefix_sums_across_tree_restarts():
  """Two epochs through make_train_step (book-keeping clipped sums, SGD): at every step,
  theta = theta_at_epoch_start - lr / B * (clipped sums of the epoch so far + the tree's prefix
  noise), with clipped sums from the vmap reference at each step's parameters."""
  loss_fn, params, _ = tiny_problem(model="bag", scale=3.0)
  rng = np.random.default_rng(2)
  arrays = {"tokens": rng.integers(1, 40, (20, 6)).astype(np.int32),
            "label": rng.integers(0, 3, 20).astype(np.int32)}
  b, lr, clip, sigma = 6, 0.3, 0.5, 1.3
  cfg = privacy.DPFTRLConfig(l2_clip=clip, noise_multiplier=sigma, batch_size=b, num_examples=20)
  assert cfg.steps_per_tree == 4 and cfg.depth == 3
  opt = optax.sgd(lr)
  schedule = training.EpochSchedule(arrays, b, seed=1)
  step = training.make_train_step(loss_fn, opt, cfg, donate=False)
  rng_key = jax.random.key(5)
  state = training.create_state(params, opt, rng_key)
  base = jax.random.wrap_key_data(state.rng)
  start = jax.device_get(params)
  sums = None
  for t in range(8):
    tree, pos = divmod(t, 4)
    if pos == 0:
      start, sums = jax.device_get(state.params), None
    batch, _ = schedule(t)
    g, _ = clipped_grad_sum(loss_fn, state.params, batch, l2_clip=clip, method="vmap")
    g = jax.device_get(g)
    sums = g if sums is None else jax.tree_util.tree_map(np.add, sums, g)
    state, _ = step(state, batch)
    leaves, treedef = jax.tree_util.tree_flatten(sums)
    tree_key = jax.random.fold_in(base, tree)
    node_leaves = jax.tree_util.tree_leaves(jax.device_get(start))
    noise = [np.zeros(x.shape, np.float64) for x in node_leaves]
    for level in range((pos + 1).bit_length()):
      if (pos + 1) >> level & 1:
        z = _node_noise(tree_key, level, ((pos + 1) >> level) - 1, node_leaves)
        noise = [n + sigma * clip * np.asarray(zz, np.float64) for n, zz in zip(noise, z)]
    want = jax.tree_util.tree_map(
        lambda p0, s, z: p0 - lr / b * (s + z), start, sums,
        jax.tree_util.tree_unflatten(treedef, noise))
    chex.assert_trees_all_close(jax.device_get(state.params), want, atol=2e-4, rtol=1e-4)


def test_sharded_over_8_devices_equals_single_device():
  """Five steps: the first tree (T = 4) and the first step of the second."""
  loss_fn, params, _ = tiny_problem(model="bag")
  rng = np.random.default_rng(1)
  arrays = {"tokens": rng.integers(1, 40, (64, 6)).astype(np.int32),
            "label": rng.integers(0, 3, 64).astype(np.int32)}
  cfg = privacy.DPFTRLConfig(l2_clip=1.0, noise_multiplier=1.0, batch_size=16, num_examples=64)
  results = params_on_1_and_8_devices(loss_fn, params, cfg, optax.adam(1e-2),
                                      training.EpochSchedule(arrays, 16, seed=0), steps=5)
  chex.assert_trees_all_close(results[0], results[1], atol=2e-5, rtol=1e-4)


def test_one_trace_for_every_step_of_every_tree():
  chex.clear_trace_counter()
  loss_fn, params, _ = tiny_problem(model="bag")
  cfg = privacy.DPFTRLConfig(l2_clip=1.0, noise_multiplier=1.0, batch_size=8, num_examples=40)
  opt = optax.sgd(0.1)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(p, s, batch, t):
    return privacy.dp_ftrl_step(p, s, batch, jax.random.key(0), t, loss_fn=loss_fn,
                                optimizer=opt, config=cfg)

  _, _, batch = tiny_problem(model="bag")
  s = opt.init(params)
  for t in range(12):
    params, s, _ = step(params, s, batch, t)
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


# ----------------------------------------------------------------------------- accounting


def _gdp_epsilon(mu: float, delta: float) -> float:
  """Exact epsilon of a Gaussian mechanism with mu = sensitivity / std (Dong, Roth and Su 2022;
  Balle and Wang 2018): delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
  f = lambda e: (scipy.stats.norm.cdf(-e / mu + mu / 2)
                 - math.exp(e) * scipy.stats.norm.cdf(-e / mu - mu / 2) - delta)
  return scipy.optimize.brentq(f, 0.0, 500.0)


@pytest.mark.parametrize("sigma,steps_per_tree,trees", [(3.0, 27, 6), (1.0, 100, 3),
                                                        (10.0, 5, 50), (0.7, 1, 1)])
def test_epsilon_is_the_equivalent_gaussian_mechanism(sigma, steps_per_tree, trees):
  mu = math.sqrt(accounting.tree_depth(steps_per_tree) * trees) / sigma
  exact = _gdp_epsilon(mu, 1e-5)
  pld = accounting.dp_ftrl_epsilon(noise_multiplier=sigma, steps_per_tree=steps_per_tree,
                                   trees=trees, delta=1e-5)
  assert exact <= pld <= exact + 1e-3
  rdp = accounting.dp_ftrl_epsilon(noise_multiplier=sigma, steps_per_tree=steps_per_tree,
                                   trees=trees, delta=1e-5, accountant="rdp")
  # dp_accounting's tree RDP equals its Gaussian RDP at multiplier sigma / sqrt(depth * trees)
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.GaussianDpEvent(1.0 / mu))
  assert rdp == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
  assert rdp > pld


def test_calibration_is_tight_and_sound():
  kw = dict(steps_per_tree=27, trees=6, delta=1e-5)
  for acc in ("pld", "rdp"):
    sigma = accounting.calibrate_dp_ftrl_noise_multiplier(target_epsilon=3.0, accountant=acc,
                                                          **kw)
    assert accounting.dp_ftrl_epsilon(noise_multiplier=sigma, accountant=acc, **kw) <= 3.0
    assert accounting.dp_ftrl_epsilon(noise_multiplier=sigma * 0.999, accountant=acc, **kw) > 3.0


def test_ledger_counts_the_trees_its_steps_touch():
  ledger = accounting.PrivacyLedger()
  for _ in range(10):
    ledger.record_tree(noise_multiplier=2.0, steps_per_tree=4)
  assert len(ledger.entries) == 1 and ledger.entries[0].trees == 3  # steps 0-9: trees 0, 1, 2
  ledger.record_tree(noise_multiplier=1.0, steps_per_tree=4, steps=4)  # steps 10-13: 2 trees
  assert [e.trees for e in ledger.entries] == [3, 2]
  assert [e.first_step for e in ledger.entries] == [0, 10]
  # both entries' trees as Gaussian mechanisms: 3 * 3 / 2^2 + 2 * 3 / 1^2
  mu = math.sqrt(3 * 3 / 4 + 2 * 3 / 1)
  assert ledger.epsilon(1e-6) == pytest.approx(_gdp_epsilon(mu, 1e-6), abs=1e-3)
  restored = accounting.PrivacyLedger.from_json(ledger.to_json())
  assert restored == ledger and restored.epsilon(1e-6) == ledger.epsilon(1e-6)
  report = ledger.report(1e-6)
  assert report["steps"] == 14 and "zero" in report["neighbouring"]
  with pytest.raises(ValueError, match="holds dp_ftrl steps and cannot take dp_sgd"):
    ledger.record(noise_multiplier=1.0, sampling_rate=0.1)
  sgd = accounting.PrivacyLedger()
  sgd.record(noise_multiplier=1.0, sampling_rate=0.1)
  with pytest.raises(ValueError, match="holds dp_sgd steps and cannot take dp_ftrl"):
    sgd.record_tree(noise_multiplier=1.0, steps_per_tree=4)
  # a DP-SGD ledger saved before tree entries existed still loads
  old = accounting.PrivacyLedger.from_json(
      '[{"noise_multiplier": 1.0, "sampling_rate": 0.1, "steps": 5, "overflow_probability": 0}]')
  assert old.steps == 5 and not old.is_tree and "neighbouring" not in old.report(1e-5)


@pytest.mark.parametrize("field,value", [("l2_clip", 0.0), ("noise_multiplier", -1.0),
                                         ("batch_size", 0), ("batch_size", 41),
                                         ("num_examples", 0), ("method", "ghosts"),
                                         ("microbatch_size", 0), ("normalization", "tanh")])
def test_config_rejects_bad_values(field, value):
  base = dict(l2_clip=1.0, noise_multiplier=1.0, batch_size=8, num_examples=40)
  base[field] = value
  with pytest.raises(ValueError, match=field):
    privacy.DPFTRLConfig(**base)


def test_accounting_rejects_bad_values():
  with pytest.raises(ValueError, match="steps_per_tree"):
    accounting.tree_depth(0)
  with pytest.raises(ValueError, match="trees"):
    accounting.calibrate_dp_ftrl_noise_multiplier(target_epsilon=1.0, steps_per_tree=4, trees=0,
                                                  delta=1e-5)
  with pytest.raises(ValueError, match="target_epsilon"):
    accounting.calibrate_dp_ftrl_noise_multiplier(target_epsilon=0.0, steps_per_tree=4, trees=1,
                                                  delta=1e-5)
