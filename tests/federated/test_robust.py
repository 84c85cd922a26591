"""Byzantine clients, the robust aggregators and q-FedAvg, against numpy, scipy and float64 loops."""

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from tests.federated import helpers
from trustjax import federated as fl
from trustjax.federated import algorithms, selection

tmap = jax.tree_util.tree_map


def _deltas(k, seed=0):
  rng = np.random.default_rng(seed)
  return {"a": rng.normal(size=(k, 3, 4)).astype(np.float32),
          "b": rng.standard_t(2, size=(k, 5)).astype(np.float32)}


def _flat(tree):
  return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1)
                         for x in jax.tree_util.tree_leaves(tree)], axis=1)


def _krum_loop(vectors, f):
  """Blanchard et al.'s Krum, written out: score(i) = the sum of squared distances to its
  n - f - 2 nearest others (at least one); the vector with the lowest score."""
  n = len(vectors)
  m = max(n - f - 2, 1)
  scores = []
  for i in range(n):
    d = sorted(float(np.sum((vectors[i] - vectors[j]) ** 2)) for j in range(n) if j != i)
    scores.append(sum(d[:m]))
  return vectors[int(np.argmin(scores))]


def _krum_scores_loop(vectors, f):
  n = len(vectors)
  m = max(n - f - 2, 1)
  return [sum(sorted(float(np.sum((vectors[i] - vectors[j]) ** 2))
                     for j in range(n) if j != i)[:m]) for i in range(n)]


def _multi_krum_loop(vectors, f):
  """Blanchard et al.'s Multi-Krum: the mean of the n - f vectors with the lowest Krum scores."""
  order = np.argsort(_krum_scores_loop(vectors, f), kind="stable")
  return vectors[order[:max(len(vectors) - f, 1)]].mean(0)


def _bulyan_loop(vectors, f):
  """El Mhamdi et al.'s Bulyan, written out: Krum picks theta = n - 2f vectors one at a time,
  each from those not yet picked (f fixed); then per coordinate the mean of the
  beta = theta - 2f picked values closest to their median (theta at least 1; where beta < 1,
  the picked values' median)."""
  pool = list(range(len(vectors)))
  theta = max(len(vectors) - 2 * f, 1)
  chosen = []
  for _ in range(theta):
    scores = _krum_scores_loop(vectors[pool], f)
    chosen.append(pool.pop(int(np.argmin(scores))))
  s = vectors[chosen]
  beta = theta - 2 * f
  med = np.median(s, axis=0)
  if beta < 1:
    return med
  out = np.empty(s.shape[1])
  for c in range(s.shape[1]):
    out[c] = s[np.argsort(np.abs(s[:, c] - med[c]), kind="stable")[:beta], c].mean()
  return out


MASKS = [np.ones(9, bool),  # all 9 (odd)
         np.array([1, 0, 1, 1, 0, 1, 1, 1, 1], bool),  # 7
         np.array([1, 1, 0, 1, 0, 1, 1, 0, 1], bool),  # 6 (even)
         np.array([0, 0, 0, 1, 1, 0, 0, 0, 0], bool),  # 2
         np.array([0, 0, 0, 0, 0, 1, 0, 0, 0], bool)]  # 1


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: f"n{int(m.sum())}")
def test_robust_rules_equal_numpy_scipy_and_a_loop_and_ignore_rejected_rows(mask):
  deltas = _deltas(9)
  # rejected clients may carry NaN or huge values: they must not reach any aggregate
  poisoned = tmap(lambda d: np.where(mask.reshape((-1,) + (1,) * (d.ndim - 1)), d,
                                     np.where(np.arange(9)[:, None] % 2, np.nan, 1e30)
                                     .reshape((-1,) + (1,) * (d.ndim - 1))).astype(np.float32),
                  deltas)
  acc = jnp.asarray(mask)
  weights = jnp.ones(9)
  agg = jax.jit(algorithms.robust_aggregate, static_argnums=(3, 4))
  kept = _flat(deltas)[mask]
  np.testing.assert_allclose(_flat(tmap(lambda x: x[None], agg(poisoned, weights, acc, "median",
                                                                  0.1)))[0],
                             np.median(kept, axis=0), rtol=1e-6, atol=1e-6)
  for frac in (0.0, 0.1, 0.2, 0.34, 0.45):
    got = _flat(tmap(lambda x: x[None], agg(poisoned, weights, acc, "trimmed_mean", frac)))[0]
    np.testing.assert_allclose(got, scipy.stats.trim_mean(kept, frac, axis=0), rtol=1e-5,
                               atol=1e-6, err_msg=f"{frac=}")
  for frac in (0.0, 0.2, 0.34):
    got = _flat(tmap(lambda x: x[None], agg(poisoned, weights, acc, "krum", frac)))[0]
    np.testing.assert_allclose(got, _krum_loop(kept, int(frac * len(kept))), rtol=1e-6,
                               err_msg=f"{frac=}")
  for frac in (0.0, 0.12, 0.2, 0.34):
    f = int(frac * len(kept))
    got = _flat(tmap(lambda x: x[None], agg(poisoned, weights, acc, "multi_krum", frac)))[0]
    np.testing.assert_allclose(got, _multi_krum_loop(kept, f), rtol=1e-5, atol=1e-6,
                               err_msg=f"{frac=}")
    got = _flat(tmap(lambda x: x[None], agg(poisoned, weights, acc, "bulyan", frac)))[0]
    np.testing.assert_allclose(got, _bulyan_loop(kept, f), rtol=1e-5, atol=1e-6,
                               err_msg=f"{frac=}")
  nobody = jnp.zeros(9, bool)
  for name in ("median", "trimmed_mean", "krum", "multi_krum", "bulyan"):
    chex.assert_trees_all_equal(agg(poisoned, weights, nobody, name, 0.1),
                                tmap(lambda d: np.zeros(d.shape[1:], np.float32), deltas))


def _honest_and_sent(byzantine, cohort, params, key):
  local = algorithms._local_fn(helpers.LOSS, 0.1, 4, 1)
  run = lambda b: jax.jit(lambda: algorithms._run_clients(local, params, cohort, key,
                                                          byzantine=b)[0])()
  return run(None), run(byzantine)


def test_byzantine_clients_send_their_attack_and_only_they_do():
  store, _ = helpers.store(sizes=(8, 9, 16, 6, 12, 7, 5, 10))
  params = helpers.init_params()
  cohort = fl.make_cohort(store, selection.uniform(0, 3, store.counts, 6))
  bad_ids = np.array([1, 4, 6])
  bad = np.isin(cohort.ids, bad_ids)
  assert 0 < bad.sum() < 6
  key = jax.random.key(3)
  honest, sent = _honest_and_sent(fl.make_byzantine(bad_ids, "sign_flip", 3.0), cohort, params,
                                  key)
  h, s = _flat(honest), _flat(sent)
  np.testing.assert_allclose(s[bad], -3.0 * h[bad], rtol=1e-6)
  np.testing.assert_array_equal(s[~bad], h[~bad])
  honest, sent = _honest_and_sent(fl.make_byzantine(bad_ids, "gaussian", 2.5), cohort, params, key)
  h, s = _flat(honest), _flat(sent)
  np.testing.assert_array_equal(s[~bad], h[~bad])
  noise = s[bad].ravel()  # N(0, 2.5^2), whatever the client's data
  assert scipy.stats.kstest(noise / 2.5, "norm").pvalue > 1e-3
  assert not np.allclose(s[bad][0], s[bad][-1])  # each malicious slot draws its own noise
  honest, sent = _honest_and_sent(fl.make_byzantine(bad_ids, "backdoor", 7.0), cohort, params, key)
  h, s = _flat(honest), _flat(sent)  # boosted: 7 x what it trained (on its own, poisoned, data)
  np.testing.assert_allclose(s[bad], 7.0 * h[bad], rtol=1e-6)
  np.testing.assert_array_equal(s[~bad], h[~bad])
  assert fl.make_byzantine([], "gaussian", 1.0) is None


def test_robust_round_applies_the_rule_to_the_clients_updates_and_counts_byzantine_ones():
  store, _ = helpers.store(sizes=(8, 9, 16, 6, 12, 7, 5, 10))
  params = helpers.init_params()
  cohort = fl.make_cohort(store, selection.uniform(0, 1, store.counts, 7))
  key = jax.random.key(4)
  byz = fl.make_byzantine([0, 2], "sign_flip", 10.0)
  _, sent = _honest_and_sent(byz, cohort, params, key)
  flat0, unravel = jax.flatten_util.ravel_pytree(params)
  for name, reference in (("median", np.median(_flat(sent), axis=0)),
                          ("trimmed_mean", scipy.stats.trim_mean(_flat(sent), 0.3, axis=0)),
                          ("multi_krum", _multi_krum_loop(_flat(sent), 2)),  # f = int(0.3 * 7)
                          ("bulyan", _bulyan_loop(_flat(sent), 2))):
    alg = fl.fedavg(loss_fn=helpers.LOSS, client_lr=0.1, batch_size=4, aggregator=name,
                    robust_fraction=0.3, byzantine=byz)
    state, m = fl.run_round(alg, alg.init(params), cohort, key)
    chex.assert_trees_all_close(state.params, unravel(flat0 + jnp.asarray(reference, jnp.float32)),
                                atol=1e-6)
    assert float(m["clients_byzantine"]) == np.isin(cohort.ids, [0, 2]).sum() > 0


@pytest.mark.parametrize("attack", ["sign_flip", "gaussian"])
def test_robust_rules_resist_byzantine_clients_where_the_mean_does_not(attack):
  # 20 iid clients, 6 of them malicious (30%): the mean is dragged off the honest direction,
  # the robust rules stay close to it.
  store, _ = helpers.iid_store(num_clients=20, per_client=8)
  params = helpers.init_params()
  cohort = fl.make_cohort(store, selection.uniform(0, 0, store.counts, 20))
  key = jax.random.key(0)
  honest, sent = _honest_and_sent(fl.make_byzantine(np.arange(0, 20, 3)[:6], attack, 4.0),
                                  cohort, params, key)
  target = _flat(honest).mean(0)

  def cosine(agg):
    v = _flat(tmap(lambda x: x[None], agg))[0]
    return float(v @ target / np.linalg.norm(v) / np.linalg.norm(target))

  acc = jnp.ones(20, bool)
  rule = lambda name: cosine(algorithms.robust_aggregate(sent, cohort.weights, acc, name, 0.3))
  mean = rule("mean")
  assert mean < 0.5, mean
  for name in ("median", "trimmed_mean", "krum", "multi_krum", "bulyan"):
    assert rule(name) > 0.75 and rule(name) > mean + 0.4, (name, rule(name), mean)


def test_robust_round_sharded_over_8_devices_equals_one_device():
  assert jax.device_count() >= 8
  store, _ = helpers.store(sizes=(5, 9, 16, 3, 12, 7, 4, 6, 10, 2))
  params = helpers.init_params()
  cohort = fl.make_cohort(store, selection.uniform(0, 0, store.counts, 10), multiple_of=8)
  byz = fl.make_byzantine([3, 7], "gaussian", 1.0)
  # The median sorts over the sharded client axis, RLR counts votes over it (krum's products: the
  # rules test).
  for name in ("median", "rlr"):
    alg = fl.fedavg(loss_fn=helpers.LOSS, client_lr=0.1, batch_size=4, client_chunk=1,
                    aggregator=name, robust_fraction=0.2, rlr_threshold=3, byzantine=byz)
    one, _ = fl.run_round(alg, alg.init(params), cohort, jax.random.key(2), mesh=fl.client_mesh(1))
    eight, _ = fl.run_round(alg, alg.init(params), cohort, jax.random.key(2),
                            mesh=fl.client_mesh(8))
    chex.assert_trees_all_close(one.params, eight.params, atol=1e-6)


@pytest.mark.parametrize("kw,match", [
    ({"aggregator": "mode"}, "aggregator must be one of"),
    ({"aggregator": "trimmed_mean", "robust_fraction": 0.5}, "robust_fraction=0.5"),
    ({"aggregator": "krum", "robust_fraction": -0.1}, "robust_fraction=-0.1"),
])
def test_bad_robust_settings_are_named(kw, match):
  with pytest.raises(ValueError, match=match):
    fl.fedavg(loss_fn=helpers.LOSS, client_lr=0.1, batch_size=4, **kw)


def _norm_bound_loop(vectors, weights, accepted, bound):
  """Sun et al.'s norm bounding in float64: each accepted vector scaled to norm <= bound, the
  weighted mean rescaled by (all weights) / (accepted weights)."""
  total = np.zeros(vectors.shape[1])
  for v, w, a in zip(vectors, weights, accepted):
    if a:
      total += w * v * min(1.0, bound / np.linalg.norm(v))
  return total * weights.sum() / weights[accepted].sum()


def test_norm_bound_clips_each_update_before_the_weighted_mean():
  deltas = _deltas(9, seed=5)
  deltas["a"][2] *= 50.0  # one boosted update
  deltas["b"][6] = np.nan  # a rejected one
  weights = jnp.asarray(np.random.default_rng(6).uniform(0.5, 2.0, 9), jnp.float32)
  acc = np.ones(9, bool)
  acc[6] = False
  flat = _flat(deltas)
  norms = np.linalg.norm(np.nan_to_num(flat), axis=1)
  bound = float(np.median(norms))  # about half the updates are clipped
  assert (norms[acc] > bound).sum() >= 3
  agg = algorithms.robust_aggregate(deltas, weights, jnp.asarray(acc), "norm_bound",
                                    norm_bound=bound)
  np.testing.assert_allclose(_flat(tmap(lambda x: x[None], agg))[0],
                             _norm_bound_loop(flat, np.asarray(weights, np.float64), acc, bound),
                             rtol=1e-5, atol=1e-6)
  # Whatever one client sends, the aggregate moves by at most 2 bound w_i (rescaled).
  attacked = tmap(lambda d: d.copy(), deltas)
  attacked["a"][4] = -1e6
  moved = algorithms.robust_aggregate(attacked, weights, jnp.asarray(acc), "norm_bound",
                                      norm_bound=bound)
  shift = np.linalg.norm(_flat(tmap(lambda a, b: (a - b)[None], moved, agg))[0])
  w = np.asarray(weights, np.float64)
  assert 0 < shift <= 2 * bound * w[4] * w.sum() / w[acc].sum() * (1 + 1e-5)
  with pytest.raises(ValueError, match="needs a positive norm_bound, got norm_bound=None"):
    fl.fedavg(loss_fn=helpers.LOSS, client_lr=0.1, batch_size=4, aggregator="norm_bound")
  with pytest.raises(ValueError, match="norm_bound=0.0"):
    algorithms.robust_aggregate(deltas, weights, jnp.asarray(acc), "norm_bound", norm_bound=0.0)


def test_robust_learning_rate_flips_the_mean_where_too_few_clients_agree():
  deltas = _deltas(10, seed=8)
  deltas["a"][:, 0, 0] = 0.0  # a coordinate that only the three "attackers" move
  deltas["a"][[1, 4, 7], 0, 0] = 2.0
  deltas["a"][:, 0, 1] = np.abs(deltas["a"][:, 0, 1])  # one that every client moves alike
  deltas["b"][3] = np.nan  # a rejected client
  weights = jnp.asarray(np.random.default_rng(9).uniform(0.5, 2.0, 10), jnp.float32)
  acc = np.ones(10, bool)
  acc[3] = False
  flat = _flat(deltas)
  w_all = np.asarray(weights, np.float64)
  w = np.where(acc, w_all, 0.0)  # `aggregate`: rescaled by (all weights) / (accepted weights)
  mean = (w[:, None] * np.nan_to_num(flat)).sum(0) * w_all.sum() / w.sum()
  votes = np.sign(np.nan_to_num(flat[acc])).sum(0)  # written out per coordinate below
  for threshold in (1, 3, 4, 7):
    expected = np.array([m if abs(v) >= threshold else -m for m, v in zip(mean, votes)])
    got = algorithms.robust_aggregate(deltas, weights, jnp.asarray(acc), "rlr",
                                      rlr_threshold=threshold)
    np.testing.assert_allclose(_flat(tmap(lambda x: x[None], got))[0], expected, rtol=1e-5,
                               atol=1e-7, err_msg=f"{threshold=}")
    attacked = float(got["a"][0, 0])  # 3 votes: kept at threshold <= 3, flipped above
    assert (attacked > 0) == (threshold <= 3) and abs(attacked) == pytest.approx(mean[0])
    assert float(got["a"][0, 1]) > 0  # 9 accepted clients agree: never flipped
  # With a norm bound: the same votes, applied to the norm-bounded mean.
  bound = float(np.median(np.linalg.norm(np.nan_to_num(flat), axis=1)))
  bounded = _norm_bound_loop(flat, w_all, acc, bound)
  got = algorithms.robust_aggregate(deltas, weights, jnp.asarray(acc), "rlr", rlr_threshold=3,
                                    norm_bound=bound)
  np.testing.assert_allclose(_flat(tmap(lambda x: x[None], got))[0],
                             np.where(np.abs(votes) >= 3, bounded, -bounded), rtol=1e-5,
                             atol=1e-5)  # float32 sums of terms up to ~10
  with pytest.raises(ValueError, match="needs an rlr_threshold >= 1, got rlr_threshold=0"):
    fl.fedavg(loss_fn=helpers.LOSS, client_lr=0.1, batch_size=4, aggregator="rlr",
              rlr_threshold=0)


def test_bad_byzantine_settings_and_scaffold_with_a_robust_rule_are_refused():
  with pytest.raises(ValueError, match="attack must be one of"):
    fl.make_byzantine([1], "flip")
  with pytest.raises(ValueError, match="scale=0"):
    fl.make_byzantine([1], "sign_flip", 0.0)
  with pytest.raises(ValueError, match="scaffold aggregates with the mean"):
    algorithms.build("scaffold", loss_fn=helpers.LOSS, client_lr=0.1, batch_size=4,
                     num_clients=5, aggregator="median")


def test_dp_fedavg_clips_a_byzantine_client_to_the_sensitivity_bound():
  # Whatever a malicious client sends, DP-FedAvg clips it to C like any update: with no noise,
  # the aggregate moves by at most 2C / (qN) between the attacked round and the honest one (its
  # clipped update replaced by another of norm <= C), and the attacker is counted.
  store, _ = helpers.store(sizes=(8, 8, 8, 8))
  params = helpers.init_params()
  cohort = fl.make_cohort(store, fl.Selection(np.arange(4), np.ones(4, np.float32)))
  clip, denominator = 0.05, 3.0
  run = lambda byz: fl.run_round(*(lambda a: (a, a.init(params)))(fl.dp_fedavg(
      loss_fn=helpers.LOSS, client_lr=0.5, batch_size=4, l2_clip=clip, noise_multiplier=0.0,
      expected_clients=denominator, byzantine=byz)), cohort, jax.random.key(1))
  honest, _ = run(None)
  attacked, m = run(fl.make_byzantine([2], "sign_flip", 1e6))
  moved = np.linalg.norm(_flat(tmap(lambda a, b: (a - b)[None], attacked.params, honest.params)))
  assert 0 < moved <= 2 * clip / denominator * (1 + 1e-5)
  assert float(m["clients_byzantine"]) == 1 and float(m["clients_clipped"]) == 4


# ----------------------------------------------------------------------------- q-FedAvg


def _qffl_loop(params, cohort, key, q, client_lr, big_l):
  """Li et al. 2020's q-FedAvg step in float64, each client trained alone."""
  flat0, unravel = jax.flatten_util.ravel_pytree(params)
  w = np.asarray(flat0, np.float64)
  keys = jax.random.split(key, cohort.counts.shape[0])
  num, den = np.zeros_like(w), 0.0
  for i in range(cohort.counts.shape[0]):
    n = int(cohort.counts[i])
    ex = {k: v[i] for k, v in cohort.examples.items()}
    loss = float(np.mean(np.asarray(helpers.LOSS(params, {k: v[:n] for k, v in ex.items()}),
                                    np.float64)))
    res = fl.local_train(params, ex, jnp.int32(n), keys[i], jnp.float32(1.0), loss_fn=helpers.LOSS,
                         client_lr=client_lr, batch_size=4, local_epochs=1)
    dw = big_l * (w - np.asarray(jax.flatten_util.ravel_pytree(res.params)[0], np.float64))
    num += loss ** q * dw
    den += q * loss ** (q - 1) * float(dw @ dw) + big_l * loss ** q
  return unravel(jnp.asarray(w - num / den, jnp.float32))


@pytest.mark.parametrize("q,lipschitz", [(2.0, None), (0.5, 3.0)])
def test_qfedavg_equals_the_papers_update_in_float64(q, lipschitz):
  store, _ = helpers.store()
  params = helpers.init_params()
  cohort = fl.make_cohort(store, selection.uniform(0, 2, store.counts, 4))
  alg = algorithms.qfedavg(loss_fn=helpers.LOSS, client_lr=0.2, batch_size=4, q=q,
                           lipschitz=lipschitz)
  state, m = fl.run_round(alg, alg.init(params), cohort, jax.random.key(7))
  ref = _qffl_loop(params, cohort, jax.random.key(7), q, 0.2, lipschitz or 1 / 0.2)
  chex.assert_trees_all_close(state.params, ref, atol=2e-6, rtol=2e-5)
  assert float(m["clients_accepted"]) == 4 and float(m["client_loss_max"]) > 0


def test_qfedavg_with_q_0_is_the_unweighted_mean_of_the_clients_models():
  store, _ = helpers.store()
  params = helpers.init_params()
  cohort = fl.make_cohort(store, selection.uniform(0, 1, store.counts, 5))
  equal = cohort._replace(weights=jnp.full_like(cohort.weights, 1 / 5))  # FedAvg weights sum to 1
  q0 = algorithms.build("qfedavg", loss_fn=helpers.LOSS, client_lr=0.1, batch_size=4, q=0.0)
  avg = fl.fedavg(loss_fn=helpers.LOSS, client_lr=0.1, batch_size=4)
  chex.assert_trees_all_close(fl.run_round(q0, q0.init(params), cohort, jax.random.key(3))[0].params,
                              fl.run_round(avg, avg.init(params), equal, jax.random.key(3))[0].params,
                              atol=1e-6)
  with pytest.raises(ValueError, match="q >= 0"):
    algorithms.qfedavg(loss_fn=helpers.LOSS, client_lr=0.1, batch_size=4, q=-1.0)
  with pytest.raises(ValueError, match="weighs the clients' updates by their losses"):
    algorithms.build("qfedavg", loss_fn=helpers.LOSS, client_lr=0.1, batch_size=4,
                     aggregator="median")
