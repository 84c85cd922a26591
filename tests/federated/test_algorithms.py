import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from jax.sharding import NamedSharding, PartitionSpec as P

from tests.federated import helpers
from trustjax import federated as fl
from trustjax import privacy
from trustjax.federated import selection, simulate
from trustjax.privacy import quantile

tmap = jax.tree_util.tree_map


def _all_clients(store, weights=None):
  ids = np.arange(store.num_clients)
  w = store.counts / store.counts.sum() if weights is None else weights
  return fl.make_cohort(store, fl.Selection(ids, np.asarray(w, np.float32)))


def _close(a, b, **kw):
  chex.assert_trees_all_close(a, b, **({"atol": 2e-6, "rtol": 2e-5} | kw))


def test_fedavg_one_client_one_step_is_one_sgd_step():
  store, data = helpers.store(sizes=(8,))
  params = helpers.init_params()
  alg = fl.fedavg(loss_fn=helpers.LOSS, client_lr=0.3, batch_size=8)
  state, _ = fl.run_round(alg, alg.init(params), _all_clients(store), jax.random.key(0))
  grad = jax.grad(lambda p: helpers.LOSS(p, data).mean())(params)
  _close(state.params, tmap(lambda p, g: p - 0.3 * g, params, grad))


def test_full_participation_iid_one_step_equals_centralized_sgd():
  store, data = helpers.iid_store(num_clients=4, per_client=6)
  params = helpers.init_params()
  alg = fl.fedavg(loss_fn=helpers.LOSS, client_lr=0.5, batch_size=6)
  state, m = fl.run_round(alg, alg.init(params), _all_clients(store), jax.random.key(1))
  opt = optax.sgd(0.5)
  grad = jax.grad(lambda p: helpers.LOSS(p, data).mean())(params)
  upd, _ = opt.update(grad, opt.init(params))
  _close(state.params, optax.apply_updates(params, upd))
  assert float(m["clients_accepted"]) == 4


def test_local_train_full_batch_is_gradient_descent_with_prox():
  store, data = helpers.store(sizes=(7,))
  params = helpers.init_params()
  shift = tmap(lambda p: p + 0.1, params)  # start away from the global model
  co = _all_clients(store)
  ex = {k: v[0] for k, v in co.examples.items()}
  res = jax.jit(lambda p: fl.local_train(
      p, ex, jnp.int32(7), jax.random.key(0), jnp.float32(1.0), loss_fn=helpers.LOSS,
      client_lr=0.2, batch_size=8, local_epochs=3, prox_mu=0.5))(params)
  # Reference: three full-batch steps on loss + mu/2 ||w - w0||^2, w0 = params (the start).
  p = params
  for _ in range(3):
    g = jax.grad(lambda q: helpers.LOSS(q, data).mean())(p)
    p = tmap(lambda pi, gi, wi: pi - 0.2 * (gi + 0.5 * (pi - wi)), p, g, params)
  _close(res.params, p)
  assert int(res.steps) == 3
  del shift


def _loop_round(alg_name, params, cohort, key, *, client_lr, batch_size, local_epochs, mu=0.0,
                controls=None, num_clients=None):
  """Reference: a Python loop over clients, each trained alone, aggregated in float64 numpy."""
  k = cohort.counts.shape[0]
  keys = jax.random.split(key, k)
  one = jax.jit(lambda p, ex, n, kk, w, corr: fl.local_train(
      p, ex, n, kk, w, corr, loss_fn=helpers.LOSS, client_lr=client_lr, batch_size=batch_size,
      local_epochs=local_epochs, prox_mu=mu))
  flat0, unravel = jax.flatten_util.ravel_pytree(params)
  flat0 = np.asarray(flat0, np.float64)
  agg = np.zeros_like(flat0)
  dcs = []
  for i in range(k):
    ex = {n: v[i] for n, v in cohort.examples.items()}
    corr = None
    if controls is not None:
      c, cis = controls
      corr = unravel(jnp.asarray(c - cis[cohort.ids[i]], jnp.float32))
    res = one(params, ex, cohort.counts[i], keys[i], cohort.work[i], corr)
    d = np.asarray(jax.flatten_util.ravel_pytree(res.params)[0], np.float64) - flat0
    agg += cohort.weights[i] * d
    if controls is not None:
      c, cis = controls
      dcs.append((cohort.ids[i], -c - d / (int(res.steps) * client_lr)))
  agg = agg / cohort.weights.sum()
  new = unravel(jnp.asarray(flat0 + agg, jnp.float32))
  if controls is None:
    return new
  c, cis = controls
  cis = cis.copy()
  mult = {cid: sum(1 for other, _ in dcs if other == cid) for cid, _ in dcs}
  dcs = [(cid, dc / mult[cid]) for cid, dc in dcs]  # a client drawn twice updates once (the mean)
  for cid, dc in dcs:
    cis[cid] += dc
  return new, c + sum(dc for _, dc in dcs) / num_clients, cis


@pytest.mark.parametrize("name,chunk", [("fedavg", None), ("fedprox", None), ("fedavg", 2),
                                        ("fedprox", 3)])
def test_vmapped_round_equals_python_loop_over_clients(name, chunk):
  # chunk: clients sorted by size and trained `chunk` at a time (lax.map over vmapped chunks).
  store, _ = helpers.store()
  params = helpers.init_params()
  kw = dict(client_lr=0.1, batch_size=4, local_epochs=2)
  alg = fl.algorithms.build(name, loss_fn=helpers.LOSS, mu=0.3, client_chunk=chunk, **kw)
  cohort = fl.make_cohort(store, selection.uniform(0, 0, store.counts, 4))
  state, _ = fl.run_round(alg, alg.init(params), cohort, jax.random.key(5))
  ref = _loop_round(name, params, cohort, jax.random.key(5), mu=0.3 if name == "fedprox" else 0.0,
                    **kw)
  _close(state.params, ref, atol=1e-5)


@pytest.mark.parametrize("chunk", [None, 2])
def test_scaffold_matches_a_loop_reference_over_two_rounds(chunk):
  store, _ = helpers.store()
  params = helpers.init_params()
  n = store.num_clients
  kw = dict(client_lr=0.1, batch_size=4, local_epochs=1)
  alg = fl.scaffold(loss_fn=helpers.LOSS, num_clients=n, client_chunk=chunk, **kw)
  state = alg.init(params)
  dim = jax.flatten_util.ravel_pytree(params)[0].shape[0]
  c, cis, p_ref = np.zeros(dim), np.zeros((n, dim)), params
  for r in range(2):
    cohort = fl.make_cohort(store, selection.uniform(1, r, store.counts, 3))
    state, _ = fl.run_round(alg, state, cohort, jax.random.key(r))
    p_ref, c, cis = _loop_round("scaffold", p_ref, cohort, jax.random.key(r), controls=(c, cis),
                                num_clients=n, **kw)
    _close(state.params, p_ref, atol=1e-5)
  got_c = np.asarray(jax.flatten_util.ravel_pytree(state.extra.server_control)[0])
  np.testing.assert_allclose(got_c, c, atol=1e-4, rtol=1e-4)
  assert np.abs(c).sum() > 0  # the controls did move


def test_scaffold_client_drawn_twice_updates_its_control_once():
  store, _ = helpers.store()
  params = helpers.init_params()
  n = store.num_clients
  kw = dict(client_lr=0.1, batch_size=4, local_epochs=1)
  alg = fl.scaffold(loss_fn=helpers.LOSS, num_clients=n, **kw)
  dim = jax.flatten_util.ravel_pytree(params)[0].shape[0]
  # by_activity-style cohort: client 2 in two slots (different keys), importance weights.
  cohort = fl.make_cohort(store, fl.Selection(np.array([2, 0, 2], np.int32),
                                              np.array([0.3, 0.4, 0.3], np.float32)))
  state, _ = fl.run_round(alg, alg.init(params), cohort, jax.random.key(4))
  p_ref, c, cis = _loop_round("scaffold", params, cohort, jax.random.key(4),
                              controls=(np.zeros(dim), np.zeros((n, dim))), num_clients=n, **kw)
  _close(state.params, p_ref, atol=1e-5)
  got = np.asarray(jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(
      state.extra.client_controls))
  np.testing.assert_allclose(got, cis, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(jax.flatten_util.ravel_pytree(
      state.extra.server_control)[0]), c, atol=1e-4, rtol=1e-4)
  # The mean of two different slot updates: not either slot's update alone, nor their sum.
  assert np.abs(got[2]).sum() > 0 and np.abs(got[1]).sum() == 0


def test_stragglers_do_less_work_and_dropped_clients_change_nothing():
  store, _ = helpers.store(sizes=(16, 16, 16))
  params = helpers.init_params()
  alg = fl.fedavg(loss_fn=helpers.LOSS, client_lr=0.1, batch_size=4, local_epochs=2)
  sel = fl.Selection(np.arange(3, dtype=np.int32), np.full(3, 1 / 3, np.float32))
  full = fl.make_cohort(store, sel, np.array([1.0, 0.5, 0.0], np.float32))
  # local_train's step count: 8 full, ceil(0.5 * 8) = 4 for the straggler, 0 when dropped.
  res = jax.vmap(lambda ex, n, k, w: fl.local_train(
      params, ex, n, k, w, loss_fn=helpers.LOSS, client_lr=0.1, batch_size=4, local_epochs=2))(
          full.examples, full.counts, jax.random.split(jax.random.key(0), 3), full.work)
  assert res.steps.tolist() == [8, 4, 0]
  # The dropped client's model is the server's, bit for bit, with or without vmap (local_train
  # computes a first step for every client and keeps it only where there is work).
  chex.assert_trees_all_equal(tmap(lambda x: x[2], res.params), params)
  alone = jax.jit(lambda ex, n, k, w: fl.local_train(
      params, ex, n, k, w, loss_fn=helpers.LOSS, client_lr=0.1, batch_size=4, local_epochs=2))(
          tmap(lambda x: x[2], full.examples), full.counts[2], jax.random.key(0), full.work[2])
  chex.assert_trees_all_equal(alone.params, params)
  assert int(alone.steps) == 0 and float(alone.loss_sum) == 0.0
  s1, m = fl.run_round(alg, alg.init(params), full, jax.random.key(0))
  assert float(m["clients_dropped"]) == 1 and float(m["clients_accepted"]) == 2
  chunked = fl.fedavg(loss_fn=helpers.LOSS, client_lr=0.1, batch_size=4, local_epochs=2,
                      client_chunk=1)
  _close(fl.run_round(chunked, chunked.init(params), full, jax.random.key(0))[0].params,
         s1.params)
  # Same as the round in which the dropped client was never selected (same per-slot keys) and the
  # other two share its weight (the server keeps the selected total weight).
  without = full._replace(weights=np.array([0.5, 0.5, 0], np.float32))
  s2, _ = fl.run_round(alg, alg.init(params), without, jax.random.key(0))
  _close(s1.params, s2.params)


def test_nonfinite_client_update_is_rejected_and_counted():
  store, data = helpers.store(sizes=(8, 8, 8))
  data["x"][8:16] = np.nan  # client 1 has corrupt features -> NaN update
  bad = fl.ClientStore(data, [np.arange(0, 8), np.arange(8, 16), np.arange(16, 24)],
                       min_capacity=8)
  params = helpers.init_params()
  alg = fl.fedavg(loss_fn=helpers.LOSS, client_lr=0.1, batch_size=4)
  cohort = _all_clients(bad, np.full(3, 1 / 3))
  state, m = fl.run_round(alg, alg.init(params), cohort, jax.random.key(0))
  assert float(m["clients_rejected_nonfinite"]) == 1 and float(m["clients_accepted"]) == 2
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state.params))
  ref, _ = fl.run_round(alg, alg.init(params), cohort._replace(
      weights=np.array([0.5, 0.0, 0.5], np.float32)), jax.random.key(0))
  _close(state.params, ref.params)


def test_one_compilation_per_round_shape_whatever_the_client_sizes():
  store, _ = helpers.store(sizes=(3, 4, 5, 6, 7, 8, 2, 1), min_capacity=8)
  alg = fl.fedprox(loss_fn=helpers.LOSS, client_lr=0.1, batch_size=4, mu=0.1)
  traced = chex.assert_max_traces(alg.apply, n=1)
  alg = fl.FederatedAlgorithm(alg.init, traced)
  state = alg.init(helpers.init_params())
  for r in range(6):
    cohort = fl.make_cohort(store, selection.uniform(0, r, store.counts, 3))
    assert cohort.examples["x"].shape[:2] == (3, 8)
    state, _ = fl.run_round(alg, state, cohort, jax.random.key(r))


@pytest.mark.parametrize("chunk,m,slots", [(None, 6, 8), (1, 10, 16)])
def test_sharded_over_8_devices_equals_one_device(chunk, m, slots):
  # chunk=1: each device sorts and chunks its own 2 slots (no client moves between devices).
  assert jax.device_count() >= 8
  store, _ = helpers.store(sizes=(5, 9, 16, 3, 12, 7, 4, 6, 10, 2))
  params = helpers.init_params()
  alg = fl.fedavg(loss_fn=helpers.LOSS, client_lr=0.1, batch_size=4, client_chunk=chunk)
  cohort = fl.make_cohort(store, selection.uniform(0, 0, store.counts, m), multiple_of=8)
  assert cohort.counts.shape[0] == slots
  one, m1 = fl.run_round(alg, alg.init(params), cohort, jax.random.key(2),
                         mesh=fl.client_mesh(1))
  eight, m8 = fl.run_round(alg, alg.init(params), cohort, jax.random.key(2),
                           mesh=fl.client_mesh(8))
  _close(one.params, eight.params, atol=1e-6)
  assert float(m1["clients_accepted"]) == float(m8["clients_accepted"]) == m
  if chunk is not None:  # the same round without chunks
    plain = fl.fedavg(loss_fn=helpers.LOSS, client_lr=0.1, batch_size=4)
    _close(fl.run_round(plain, plain.init(params), cohort, jax.random.key(2))[0].params,
           eight.params, atol=1e-6)
    mesh8 = fl.client_mesh(8)
    round_fn = simulate._jitted(alg.apply, mesh8)
    hlo = jax.jit(lambda st, co: round_fn(st, co, jax.random.key(2))).lower(
        jax.device_put(alg.init(params), NamedSharding(mesh8, P())),
        simulate.shard_cohort(cohort, mesh8)).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo  # chunks stay on their device
  with pytest.raises(ValueError, match="divisible"):
    fl.run_round(alg, alg.init(params), fl.make_cohort(
        store, selection.uniform(0, 0, store.counts, 6)), jax.random.key(2),
                 mesh=fl.client_mesh(8))


# ----------------------------------------------------------------------------- DP-FedAvg


def _dp(noise_multiplier=0.0, clip=0.05, **kw):
  return fl.dp_fedavg(loss_fn=helpers.LOSS, client_lr=0.5, batch_size=4, l2_clip=clip,
                      noise_multiplier=noise_multiplier, expected_clients=3.0, **kw)


def test_dp_fedavg_sensitivity_one_client_moves_the_model_by_at_most_clip_over_denominator():
  store, _ = helpers.store(sizes=(8, 8, 8, 8))
  params = helpers.init_params()
  alg = _dp()
  flat = lambda s: np.asarray(jax.flatten_util.ravel_pytree(s.params)[0], np.float64)
  full = _all_clients(store, np.ones(4))
  base, m = fl.run_round(alg, alg.init(params), full, jax.random.key(0))
  assert float(m["clients_clipped"]) == 4  # the bound is tight only when clipping is active
  for j in range(4):
    w = np.ones(4, np.float32)
    w[j] = 0
    nb, _ = fl.run_round(alg, alg.init(params), full._replace(weights=w), jax.random.key(0))
    diff = np.linalg.norm(flat(base) - flat(nb))
    assert diff <= 0.05 / 3.0 * (1 + 1e-5)
    assert diff > 0.05 / 3.0 * 0.99  # a clipped client contributes exactly C / denominator


def test_dp_fedavg_noise_std_on_the_sum_is_sigma_clip_over_denominator():
  store, _ = helpers.store(sizes=(8,))
  params = helpers.init_params()
  alg = _dp(noise_multiplier=2.0, clip=0.5)
  nobody = _all_clients(store, np.zeros(1))  # padding slot only: the update is pure noise
  state, _ = fl.run_round(alg, alg.init(params), nobody, jax.random.key(3))
  noise = np.concatenate([np.ravel(a - b) for a, b in zip(
      jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(params))])
  std = 2.0 * 0.5 / 3.0
  assert scipy.stats.kstest(noise / std, "norm").pvalue > 1e-3
  assert len(noise) > 80


def test_dp_fedavg_adaptive_clip_tracks_the_target_quantile():
  store, _ = helpers.store(sizes=(8,) * 10)
  params = helpers.init_params()
  cfg = quantile.QuantileClipping(target_quantile=0.5, learning_rate=0.3,
                                  count_noise_multiplier=0.5, initial_clip=0.1)
  alg = fl.dp_fedavg(loss_fn=helpers.LOSS, client_lr=0.5, batch_size=4, l2_clip=1.0,
                     noise_multiplier=0.2, expected_clients=10.0, adaptive=cfg,
                     server_optimizer=optax.sgd(0.0))  # frozen model: fixed update norms
  state = alg.init(params)
  cohort = _all_clients(store, np.ones(10))
  for r in range(60):
    state, m = fl.run_round(alg, state, cohort, jax.random.key(r))
  deltas = jax.vmap(lambda ex, n, k: fl.local_train(
      params, ex, n, k, jnp.float32(1), loss_fn=helpers.LOSS, client_lr=0.5, batch_size=4,
      local_epochs=1).params)(cohort.examples, cohort.counts, jax.random.split(
          jax.random.split(jax.random.key(59), 3)[0], 10))
  norms = np.sqrt(sum(np.sum((np.asarray(a) - np.asarray(b)[None]) ** 2, axis=tuple(
      range(1, a.ndim))) for a, b in zip(jax.tree_util.tree_leaves(deltas),
                                         jax.tree_util.tree_leaves(params))))
  clip = float(state.extra)
  assert np.quantile(norms, 0.2) <= clip <= np.quantile(norms, 0.8), (clip, np.sort(norms))
  # The sum's noise is raised so that sum + count together cost sigma = 0.2.
  s = quantile.sum_noise_multiplier(0.2, 0.5)
  assert s > 0.2 and quantile.effective_noise_multiplier(s, 0.5) == pytest.approx(0.2)
  with pytest.raises(ValueError, match="too small"):
    quantile.sum_noise_multiplier(2.0, 0.5)


# ----------------------------------------------------------------------------- DP-FTRL


def _ftrl(noise_multiplier=0.0, clip=0.05, per_tree=4, loss_fn=helpers.LOSS, **kw):
  return fl.dp_ftrl_fedavg(loss_fn=loss_fn, client_lr=0.5, batch_size=4, l2_clip=clip,
                           noise_multiplier=noise_multiplier, clients_per_round=3,
                           rounds_per_tree=per_tree, noise_seed=5, **kw)


def test_dp_ftrl_fedavg_without_noise_is_dp_fedavg_over_the_fixed_cohort_size():
  store, _ = helpers.store(sizes=(8, 8, 8, 8))
  params = helpers.init_params()
  cohort = _all_clients(store, np.array([1, 1, 0, 1], np.float32))
  out = []
  common = dict(loss_fn=helpers.LOSS, client_lr=0.5, batch_size=8, l2_clip=0.05,
                noise_multiplier=0.0)  # one full batch per client: no shuffling to match
  for alg in (fl.dp_ftrl_fedavg(clients_per_round=3, rounds_per_tree=2, **common),
              fl.dp_mf_fedavg(clients_per_round=3, bands=3, **common),
              fl.dp_fedavg(expected_clients=3.0, **common)):  # all divide by 3
    state = alg.init(params)
    for r in range(3):
      state, m = fl.run_round(alg, state, cohort, jax.random.key(r))
    out.append(state.params)
    assert float(m["clients_clipped"]) == 3
  _close(out[0], out[2])
  _close(out[1], out[2])


def test_dp_ftrl_fedavg_noise_is_the_tree_prefix_noise_across_a_restart():
  """Clients whose updates are 0: after 7 rounds of 4 per tree, the model moved by minus the
  noise of tree 0's prefix 4 (one node) and tree 1's prefix 3 (two nodes), over m = 3: std
  sqrt(3) sigma C / 3 per coordinate; the per-round noises themselves are larger."""
  store, _ = helpers.store(sizes=(8, 8, 8))
  params = {"w": jnp.zeros((6000,))}
  zero = lambda p, b: 0.0 * jnp.sum(p["w"]) + 0.0 * b["x"][:, 0]
  alg = _ftrl(noise_multiplier=1.5, clip=0.6, loss_fn=zero)
  state = alg.init(params)
  cohort = _all_clients(store, np.ones(3))
  first = None
  for r in range(7):
    state, _ = fl.run_round(alg, state, cohort, jax.random.key(r))
    first = np.asarray(state.params["w"]) if first is None else first
  moved = -np.asarray(state.params["w"])
  std = 1.5 * 0.6 / 3
  assert scipy.stats.kstest(moved, "norm", args=(0, np.sqrt(3) * std)).pvalue > 1e-3
  assert scipy.stats.kstest(moved, "norm", args=(0, np.sqrt(4) * std)).pvalue < 1e-6
  assert scipy.stats.kstest(moved, "norm", args=(0, np.sqrt(2) * std)).pvalue < 1e-6
  assert scipy.stats.kstest(-first, "norm", args=(0, std)).pvalue > 1e-3  # round 1: one node


# ----------------------------------------------------------------------------- DP-MF


def _mf(noise_multiplier=0.0, clip=0.05, bands=4, loss_fn=helpers.LOSS, **kw):
  return fl.dp_mf_fedavg(loss_fn=loss_fn, client_lr=0.5, batch_size=4, l2_clip=clip,
                         noise_multiplier=noise_multiplier, clients_per_round=3, bands=bands,
                         noise_seed=5, **kw)


@pytest.mark.parametrize("mechanism", ["dp_ftrl", "dp_mf"])
def test_one_client_moves_a_fixed_cohort_round_by_at_most_clip_over_cohort_size(mechanism):
  """From the same state (DP-FTRL: deep in a tree, round 6 = tree 1, position 3; DP-MF: after 5
  noisy rounds, a full noise history) and the same key, so the same noise: a client replaced
  with a zero update moves the model by C / m, no more."""
  store, _ = helpers.store(sizes=(8, 8, 8))
  full = _all_clients(store, np.ones(3))
  if mechanism == "dp_ftrl":
    alg = _ftrl(noise_multiplier=2.0)
    state = alg.init(helpers.init_params())._replace(round=jnp.int32(6))
  else:
    alg = _mf(noise_multiplier=2.0)
    state = alg.init(helpers.init_params())
    for r in range(5):
      state, _ = fl.run_round(alg, state, full, jax.random.key(10 + r))
    assert all(np.abs(np.asarray(h)).min() > 0 for h in jax.tree_util.tree_leaves(state.extra))
  flat = lambda s: np.asarray(jax.flatten_util.ravel_pytree(s.params)[0], np.float64)
  base, _ = fl.run_round(alg, state, full, jax.random.key(0))
  for j in range(3):
    w = np.ones(3, np.float32)
    w[j] = 0
    nb, _ = fl.run_round(alg, state, full._replace(weights=w), jax.random.key(0))
    diff = np.linalg.norm(flat(base) - flat(nb))
    assert 0.05 / 3 * 0.99 < diff <= 0.05 / 3 * (1 + 1e-5)
  # the noise is there (at least one row's, std 2 * 0.05 / 3), beside updates of C / 3
  assert np.abs(flat(base) - flat(state)).max() > 3 * 0.05 / 3


def test_dp_mf_fedavg_noise_cancels_in_the_model_as_the_factorization_says():
  """Clients whose updates are 0, server SGD at learning rate 1, b = 8 bands: after t <= 8 rounds
  the model moved by minus the prefix sum of the noises over m = 3, whose std per coordinate is
  sigma C / 3 * sqrt(sum_{j < t} c_j^2) (C squares to the prefix sums), below independent
  noise's sigma C / 3 * sqrt(t); round 1's noise is one row's."""
  store, _ = helpers.store(sizes=(8, 8, 8))
  params = {"w": jnp.zeros((6000,))}
  zero = lambda p, b: 0.0 * jnp.sum(p["w"]) + 0.0 * b["x"][:, 0]
  alg = _mf(noise_multiplier=1.5, clip=0.6, bands=8, loss_fn=zero)
  state = alg.init(params)
  cohort = _all_clients(store, np.ones(3))
  std, c = 1.5 * 0.6 / 3, privacy.bsr_coefficients(8)
  for t in range(1, 7):
    state, _ = fl.run_round(alg, state, cohort, jax.random.key(t))
    moved = -np.asarray(state.params["w"])
    want = std * np.sqrt(np.sum(c[:t] ** 2))
    assert scipy.stats.kstest(moved, "norm", args=(0, want)).pvalue > 1e-3, t
    if t >= 3:
      assert scipy.stats.kstest(moved, "norm", args=(0, std * np.sqrt(t))).pvalue < 1e-6


def test_cyclic_selection_repeats_its_cohorts_every_epoch():
  n, m = 23, 5
  per_epoch = selection.rounds_per_epoch(n, m)
  for r in range(per_epoch):
    first = selection.shuffled(7, r, n, m, reshuffle=False)
    np.testing.assert_array_equal(first.ids, selection.shuffled(7, r, n, m).ids)  # epoch 0
    for epoch in (1, 2):
      again = selection.shuffled(7, r + epoch * per_epoch, n, m, reshuffle=False)
      np.testing.assert_array_equal(first.ids, again.ids)
      np.testing.assert_array_equal(first.weights, again.weights)


def test_shuffled_selection_visits_every_client_once_per_epoch():
  n, m = 23, 5
  per_epoch = selection.rounds_per_epoch(n, m)
  assert per_epoch == 5
  for epoch in range(3):
    seen = []
    for r in range(epoch * per_epoch, (epoch + 1) * per_epoch):
      sel = selection.shuffled(7, r, n, m)
      assert len(sel.ids) == m and set(np.unique(sel.weights)) <= {0.0, 1.0}
      seen += sel.ids[sel.weights > 0].tolist()
    assert sorted(seen) == list(range(n))
  a, b = selection.shuffled(7, 0, n, m), selection.shuffled(7, per_epoch, n, m)
  assert not np.array_equal(a.ids, b.ids)  # a new permutation each epoch
  np.testing.assert_array_equal(selection.shuffled(7, 3, n, m).ids,
                                selection.shuffled(7, 3, n, m).ids)
  with pytest.raises(ValueError, match="clients per round"):
    selection.shuffled(0, 0, 4, 5)


def test_federated_evaluation_equals_pooled_evaluation():
  store, data = helpers.store(sizes=(5, 9, 16, 3, 12, 7))
  params = helpers.init_params(1)
  fed = fl.federated_evaluate(helpers.metrics_fn, params, store, clients_per_call=4)
  pooled = helpers.metrics_fn(params, dict(data, mask=np.ones(len(data["label"]), bool)))
  count = float(pooled["count"])
  assert fed["count"] == count == 52
  assert fed["loss"] == pytest.approx(float(pooled["loss_sum"]) / count, rel=1e-5)
  assert fed["accuracy"] == pytest.approx(float(pooled["correct"]) / count, rel=1e-6)
  per_client = [float(np.mean(np.argmax(helpers.MODEL.apply({"params": params}, x), -1) == y))
                for x, y in ((data["x"][p], data["label"][p]) for p in np.split(
                    np.arange(52), np.cumsum([5, 9, 16, 3, 12])))]
  assert fed["client_accuracy_mean"] == pytest.approx(np.mean(per_client), rel=1e-5)
  assert fed["client_accuracy_sd"] == pytest.approx(np.std(per_client), rel=1e-5, abs=1e-7)
  assert fed["client_accuracy_p10"] == pytest.approx(np.percentile(per_client, 10), rel=1e-5)
  # Bounded memory: 4 clients x 3 example slots per call (buckets of 16 in slices of 3, the
  # last one padded), and more clients per call than the store holds, give the same sums.
  # Over the clients mesh (3 devices: 4 clients a call rounded up to 6), parameters replicated.
  for kw in ({"clients_per_call": 4, "max_rows": 12}, {"clients_per_call": 64},
             {"clients_per_call": 4, "mesh": fl.client_mesh(3)}):
    other = fl.federated_evaluate(helpers.metrics_fn, params, store, **kw)
    assert other["count"] == 52
    for key in ("loss", "accuracy", "client_accuracy_mean", "client_accuracy_p10"):
      assert other[key] == pytest.approx(fed[key], rel=1e-5), (kw, key)
  with pytest.raises(ValueError, match="max_rows"):
    fl.federated_evaluate(helpers.metrics_fn, params, store, max_rows=0)


def test_federated_evaluation_splits_clients_over_the_mesh_its_parameters_are_replicated_on(
    monkeypatch):
  """No mesh passed: parameters replicated over 3 devices make each call's clients split over
  them (as with mesh=), with the same result as on one device."""
  store, _ = helpers.store(sizes=(5, 9, 16, 3, 12, 7))
  params = helpers.init_params(1)
  fed = fl.federated_evaluate(helpers.metrics_fn, params, store, clients_per_call=4)
  placed = []
  shard = simulate.sharding.shard_batch
  monkeypatch.setattr(simulate.sharding, "shard_batch",
                      lambda tree, mesh, axis: placed.append((mesh, axis)) or shard(tree, mesh, axis))
  mesh = fl.client_mesh(3)
  other = fl.federated_evaluate(helpers.metrics_fn, simulate.sharding.replicate(params, mesh),
                                store, clients_per_call=4)
  assert placed and all(m is mesh and a == "clients" for m, a in placed)
  for key in ("count", "loss", "accuracy", "client_accuracy_mean", "client_accuracy_p10"):
    assert other[key] == pytest.approx(fed[key], rel=1e-5), key
  placed.clear()
  fl.federated_evaluate(helpers.metrics_fn, params, store, clients_per_call=4)
  assert not placed  # host parameters: nothing is sharded


@pytest.mark.parametrize("kw,match", [({"client_lr": 0.0}, "client_lr"),
                                      ({"batch_size": 0}, "batch_size"),
                                      ({"client_chunk": 0}, "client_chunk")])
def test_bad_client_settings_are_named(kw, match):
  args = dict(loss_fn=helpers.LOSS, client_lr=0.1, batch_size=4) | kw
  with pytest.raises(ValueError, match=match):
    fl.fedavg(**args)
