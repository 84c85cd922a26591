"""DP-MF (banded square root factorization) against written-out references: the coefficients
against the workload they factor, the step's noise against a float64 triangular solve, its
covariance, the sensitivity of the release on neighbouring datasets against a dense matrix, and
the accounting against dp_accounting and the Gaussian mechanism's closed form."""

import math

import chex
import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
import scipy.stats

from trustjax import privacy, training
from trustjax.privacy import accounting
from trustjax.privacy.noise import standard_normal
from tests.privacy.helpers import params_on_1_and_8_devices, tiny_problem
from tests.privacy.test_dp_ftrl import _gdp_epsilon, _linear_problem


def _dense(c, n):
  """The n x n lower-triangular banded Toeplitz matrix with first column c (written out)."""
  out = np.zeros((n, n))
  for i in range(n):
    for j in range(i + 1):
      if i - j < len(c):
        out[i, j] = c[i - j]
  return out


def _brute_sensitivity(c, n, k, row_noise=None):
  """max over t0 of || D^-1 (sum of C's columns t0, t0 + k, ...) || from the dense matrix."""
  m = _dense(c, n) / (1.0 if row_noise is None else np.asarray(row_noise)[:, None])
  return max(np.linalg.norm(m[:, t0::k].sum(axis=1)) for t0 in range(min(k, n)))


def test_coefficients_are_the_square_root_of_the_workload():
  """With b >= n bands, C C is the prefix-sum matrix (all ones below the diagonal), and with
  momentum beta the matrix of SGD with momentum, sum_{u=j}^{i} beta^(i-u); the coefficients are
  binom(2j, j) / 4^j without momentum (Kalinin and Lampert 2024)."""
  n = 12
  c = privacy.bsr_coefficients(n)
  np.testing.assert_allclose(c, [math.comb(2 * j, j) / 4 ** j for j in range(n)], rtol=1e-14)
  np.testing.assert_allclose(_dense(c, n) @ _dense(c, n), np.tril(np.ones((n, n))), atol=1e-12)
  beta = 0.9
  workload = np.array([[sum(beta ** (i - u) for u in range(j, i + 1)) if j <= i else 0.0
                        for j in range(n)] for i in range(n)])
  cm = privacy.bsr_coefficients(n, beta)
  np.testing.assert_allclose(_dense(cm, n) @ _dense(cm, n), workload, atol=1e-12)
  assert np.all(cm > 0) and cm[0] == 1.0
  # banding keeps the first b coefficients
  np.testing.assert_array_equal(privacy.bsr_coefficients(4, beta), cm[:4])


@pytest.mark.parametrize("bands", [1, 3, 8])
def test_the_steps_noise_is_c_inverse_of_independent_row_noise(bands):
  """Ten steps of `correlated_noise` from a zero history, each with its step's key: the noises
  are C^-1 (std Z) by a float64 triangular solve, with Z the standard normal draws of the same
  keys; so C w / std is independent N(0, 1) noise (a KS test), and a wrong std is rejected."""
  n, std, shape = 10, 1.7, (3000,)
  c = privacy.bsr_coefficients(bands)
  like = {"a": jnp.zeros(shape), "b": {"c": jnp.zeros((4,))}}
  history = privacy.dp_mf.empty_history(like, bands)
  assert (history is None) == (bands == 1)
  step = jax.jit(privacy.correlated_noise, static_argnames=("std", "coefficients"))
  key = jax.random.key(4)
  got, z = [], []
  for t in range(n):
    k = jax.random.fold_in(key, t)
    w, history = step(history, t, k, std=std, coefficients=tuple(c), like=like)
    got.append(np.asarray(w["a"], np.float64))
    z.append(np.asarray(standard_normal(jax.random.split(k, 2)[0], shape), np.float64))
    assert w["b"]["c"].shape == (4,)
  got, z = np.array(got), np.array(z)
  want = scipy.linalg.solve_triangular(_dense(c, n), std * z, lower=True)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  white = (_dense(c, n) @ got / std).ravel()
  assert scipy.stats.kstest(white, "norm").pvalue > 1e-3
  assert scipy.stats.kstest(white, "norm", args=(0, 1.1)).pvalue < 1e-6
  if bands > 1:  # the noise is correlated: consecutive steps' noises are anti-correlated
    assert np.corrcoef(got[1:].ravel(), got[:-1].ravel())[0, 1] < -0.1


def test_noise_covariance_and_the_prefix_sums_it_gives():
  """Over 40,000 keys, the noises of 6 steps with b = 6 bands have covariance
  std^2 C^-1 C^-T, and the prefix sums std^2 C C^T (A C^-1 = C when C squares to A): prefix t's
  variance is std^2 sum_{j < t} c_j^2, below independent noise's std^2 t from t = 2 on."""
  n, std = 6, 0.9
  c = privacy.bsr_coefficients(n)

  def run(key):
    hist, out = jnp.zeros((n - 1,)), []
    for t in range(n):
      w, hist = privacy.correlated_noise(hist, t, jax.random.fold_in(key, t), std=std,
                                         coefficients=tuple(c))
      out.append(w)
    return jnp.stack(out)

  w = np.asarray(jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(2), 40000)), np.float64)
  cinv = np.linalg.inv(_dense(c, n))
  np.testing.assert_allclose(np.cov(w, rowvar=False), std ** 2 * cinv @ cinv.T, atol=0.03)
  var = np.cumsum(w, axis=1).var(axis=0)
  np.testing.assert_allclose(var, std ** 2 * np.cumsum(c ** 2), rtol=0.04)
  assert np.all(var[1:] < std ** 2 * np.arange(2, n + 1))


@pytest.mark.parametrize("bands", [2, 3, 5])
def test_replacing_one_example_with_zero_moves_the_release_by_the_sensitivity(bands):
  """Neighbouring datasets (the example of batch 0 replaced with a zero one, same keys), three
  epochs of k = 3 steps in one fixed order, plain SGD: the release C G + Z, read back from the
  parameters (prefix sums S = -theta B / lr, G + C^-1 Z = their differences), differs by
  C (G - G'), whose norm is exactly the accounted sensitivity times the clip (the example's
  clipped gradient is the same each epoch: the worst case); with b > k the columns overlap and
  the sensitivity grows past sqrt(3) ||c||."""
  loss_fn, params, x = _linear_problem()
  clip, lr, b, epochs = 1.0, 0.5, 4, 3
  cfg = privacy.DPMFConfig(l2_clip=clip, noise_multiplier=2.0, batch_size=b, num_examples=12,
                           bands=bands)
  k = cfg.steps_per_epoch
  opt = optax.sgd(lr)
  step = jax.jit(privacy.dp_mf_step, static_argnames=("loss_fn", "optimizer", "config"))
  victim = int(np.argmax(np.linalg.norm(x[:b], axis=1)))  # in batch 0
  assert np.linalg.norm(x[victim]) > clip
  c_dense = _dense(cfg.coefficients, epochs * k)
  releases = []
  for data_mask in (np.ones(12, bool), np.arange(12) != victim):
    p, s, sums = params, privacy.dp_mf.init_state(params, opt, cfg), []
    for t in range(epochs * k):
      rows = np.arange(t * b, (t + 1) * b) % 12
      batch = {"x": jnp.asarray(x[rows]), "mask": jnp.asarray(data_mask[rows])}
      p, s, _ = step(p, s, batch, jax.random.fold_in(jax.random.key(7), t), loss_fn=loss_fn,
                     optimizer=opt, config=cfg)
      sums.append(-np.asarray(p["w"], np.float64) * b / lr)
    per_step = np.diff(np.array(sums), axis=0, prepend=0.0)
    releases.append(c_dense @ per_step)
  gap = np.linalg.norm(releases[0] - releases[1])
  sens = cfg.sensitivity(epochs * k)
  assert gap == pytest.approx(sens * clip, rel=1e-4)
  assert sens == pytest.approx(_brute_sensitivity(cfg.coefficients, epochs * k, k), rel=1e-12)
  disjoint = math.sqrt(epochs) * np.linalg.norm(cfg.coefficients)
  if bands <= k:
    assert sens == pytest.approx(disjoint, rel=1e-12)
  else:
    assert sens > disjoint * 1.01
  assert np.abs(releases[0]).max() > 3  # noise was added


def test_sharded_over_8_devices_equals_single_device():
  loss_fn, params, _ = tiny_problem(model="bag")
  rng = np.random.default_rng(1)
  arrays = {"tokens": rng.integers(1, 40, (64, 6)).astype(np.int32),
            "label": rng.integers(0, 3, 64).astype(np.int32)}
  cfg = privacy.DPMFConfig(l2_clip=1.0, noise_multiplier=1.0, batch_size=16, num_examples=64,
                           bands=3)
  results = params_on_1_and_8_devices(
      loss_fn, params, cfg, optax.adam(1e-2),
      training.EpochSchedule(arrays, 16, seed=0, reshuffle=False), steps=6)
  chex.assert_trees_all_close(results[0], results[1], atol=2e-5, rtol=1e-4)


def test_one_trace_and_each_step_overwrites_the_oldest_noise():
  chex.clear_trace_counter()
  loss_fn, params, batch = tiny_problem(model="bag")
  cfg = privacy.DPMFConfig(l2_clip=1.0, noise_multiplier=1.0, batch_size=8, num_examples=40,
                           bands=4)
  opt = optax.sgd(0.1)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(p, s, batch, t):
    return privacy.dp_mf_step(p, s, batch, jax.random.fold_in(jax.random.key(0), t),
                              loss_fn=loss_fn, optimizer=opt, config=cfg)

  s = privacy.dp_mf.init_state(params, opt, cfg)
  leaf = lambda s: np.asarray(jax.tree_util.tree_leaves(s.history)[0])
  for t in range(7):
    before = leaf(s)
    params, s, _ = step(params, s, batch, t)
    assert int(s.count) == t + 1
    kept = [j for j in range(3) if j != t % 3]  # slot t mod (b - 1) takes w_t
    np.testing.assert_array_equal(leaf(s)[kept], before[kept])
    assert np.all(leaf(s)[t % 3] != before[t % 3])
  assert leaf(s).shape[0] == 3


@pytest.mark.parametrize("bands", [1, 3])
def test_the_state_checkpoints_and_restores(tmp_path, bands):
  """A DP-MF train state after two steps saves and restores (one band keeps no history: a
  checkpoint refuses zero-size arrays)."""
  loss_fn, params, batch = tiny_problem(model="bag")
  cfg = privacy.DPMFConfig(l2_clip=1.0, noise_multiplier=1.0, batch_size=8, num_examples=40,
                           bands=bands)
  opt = optax.adam(1e-2)
  state = training.create_state(params, opt, jax.random.key(0), dp_config=cfg)
  step = training.make_train_step(loss_fn, opt, cfg, donate=False)
  for _ in range(2):
    state, _ = step(state, batch)
  assert (state.opt_state.history is None) == (bands == 1)
  ckpt = training.Checkpointer(str(tmp_path))
  ckpt.save(2, state, {"step": 2})
  restored, _ = ckpt.restore(training.create_state(params, opt, jax.random.key(1), dp_config=cfg))
  chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
  with pytest.raises(ValueError, match="3 bands need a history of 2 noises"):
    privacy.correlated_noise(None, 0, jax.random.key(0), std=1.0,
                             coefficients=tuple(privacy.bsr_coefficients(3)), like=params)


def test_fixed_order_schedule_repeats_its_batches_every_epoch():
  arrays = {"x": np.arange(10)}
  fixed = training.EpochSchedule(arrays, 4, seed=3, reshuffle=False)
  shuffled = training.EpochSchedule(arrays, 4, seed=3)
  for t in range(3):
    for e in (1, 2):
      np.testing.assert_array_equal(fixed(t)[0]["x"], fixed(t + 3 * e)[0]["x"])
    np.testing.assert_array_equal(fixed(t)[0]["x"], shuffled(t)[0]["x"])  # epoch 0's order
  assert any(not np.array_equal(shuffled(t)[0]["x"], shuffled(t + 3)[0]["x"]) for t in range(3))


# ----------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("bands,steps,k", [(3, 20, 5), (5, 20, 5), (8, 20, 5), (5, 17, 5),
                                           (1, 10, 3), (10, 30, 1), (4, 3, 7)])
def test_sensitivity_equals_the_dense_matrix(bands, steps, k):
  c = privacy.bsr_coefficients(bands, 0.5)
  assert accounting.mf_sensitivity(c, steps, k) == pytest.approx(
      _brute_sensitivity(c, steps, k), rel=1e-12)
  row_noise = np.random.default_rng(bands).uniform(0.5, 2.0, steps)
  assert accounting.mf_sensitivity(c, steps, k, row_noise) == pytest.approx(
      _brute_sensitivity(c, steps, k, row_noise), rel=1e-12)


def test_the_sensitivity_is_the_worst_case_over_contributions():
  """For non-negative C the worst per-step contributions (norm <= 1 each) all point one way:
  random directions never exceed the accounted sensitivity, and aligned ones reach it."""
  c, n, k = privacy.bsr_coefficients(6), 14, 4
  m = _dense(c, n)
  sens = accounting.mf_sensitivity(c, n, k)
  rng = np.random.default_rng(0)
  for _ in range(300):
    t0 = rng.integers(0, k)
    steps = np.arange(t0, n, k)
    g = rng.normal(size=(len(steps), 5))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    assert np.linalg.norm(m[:, steps] @ g) <= sens + 1e-12
  assert max(np.linalg.norm(m[:, np.arange(t0, n, k)].sum(axis=1)) for t0 in range(k)) == \
      pytest.approx(sens, rel=1e-12)


def test_one_band_is_dp_sgd_without_sampling():
  """b = 1 (C = I): 25 steps, each example in 3 of them (epochs of 10, the last partial one
  counted for the examples it holds), so 3-fold composition of the Gaussian mechanism, as
  dp_accounting's PLD accountant composes it."""
  eps = accounting.mf_epsilon(noise_multiplier=2.0, coefficients=[1.0], steps=25, separation=10,
                              delta=1e-5)
  acc = dp_accounting.pld.PLDAccountant()
  acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2.0), 3))
  assert eps == pytest.approx(acc.get_epsilon(1e-5), abs=1e-6)


@pytest.mark.parametrize("sigma,bands,steps,k", [(3.0, 27, 162, 27), (10.0, 64, 500, 50),
                                                 (1.0, 4, 8, 8)])
def test_epsilon_is_the_gaussian_mechanism_of_the_sensitivity(sigma, bands, steps, k):
  c = privacy.bsr_coefficients(bands)
  mu = accounting.mf_sensitivity(c, steps, k) / sigma
  exact = _gdp_epsilon(mu, 1e-5)
  kw = dict(noise_multiplier=sigma, coefficients=c, steps=steps, separation=k, delta=1e-5)
  pld = accounting.mf_epsilon(**kw)
  assert exact <= pld <= exact + 1e-3
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.GaussianDpEvent(1.0 / mu))
  rdp = accounting.mf_epsilon(**kw, accountant="rdp")
  assert rdp == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9) and rdp > pld


def test_calibration_is_tight_and_sound():
  kw = dict(coefficients=privacy.bsr_coefficients(27), steps=162, separation=27, delta=1e-5)
  for acc in ("pld", "rdp"):
    sigma = accounting.calibrate_mf_noise_multiplier(target_epsilon=1.0, accountant=acc, **kw)
    assert accounting.mf_epsilon(noise_multiplier=sigma, accountant=acc, **kw) <= 1.0
    assert accounting.mf_epsilon(noise_multiplier=sigma * 0.999, accountant=acc, **kw) > 1.0
  # at the same epsilon, BSR needs less noise than DP-FTRL's tree (sqrt(depth) = sqrt(5) > ||c||)
  tree = accounting.calibrate_dp_ftrl_noise_multiplier(target_epsilon=1.0, steps_per_tree=27,
                                                      trees=6, delta=1e-5)
  assert accounting.calibrate_mf_noise_multiplier(target_epsilon=1.0, **kw) < 0.75 * tree


def test_ledger_accounts_every_step_and_refuses_another_factorization():
  c = [float(x) for x in privacy.bsr_coefficients(3)]
  ledger = accounting.PrivacyLedger()
  for _ in range(7):
    ledger.record_mf(noise_multiplier=2.0, coefficients=c, steps_per_epoch=4)
  ledger.record_mf(noise_multiplier=1.0, coefficients=c, steps_per_epoch=4, steps=5)
  assert [(e.steps, e.first_step) for e in ledger.entries] == [(7, 0), (5, 7)]
  assert ledger.kind == "dp_mf" and not ledger.is_tree
  rows = np.array([2.0] * 7 + [1.0] * 5)
  mu = _brute_sensitivity(c, 12, 4, rows)
  assert ledger.epsilon(1e-6) == pytest.approx(_gdp_epsilon(mu, 1e-6), abs=1e-3)
  restored = accounting.PrivacyLedger.from_json(ledger.to_json())
  assert restored == ledger and restored.epsilon(1e-6) == ledger.epsilon(1e-6)
  assert "zero" in ledger.report(1e-6)["neighbouring"]
  with pytest.raises(ValueError, match="same factorization"):
    ledger.record_mf(noise_multiplier=1.0, coefficients=c[:2], steps_per_epoch=4)
  with pytest.raises(ValueError, match="same factorization"):
    ledger.record_mf(noise_multiplier=1.0, coefficients=c, steps_per_epoch=5)
  with pytest.raises(ValueError, match="cannot take dp_sgd"):
    ledger.record(noise_multiplier=1.0, sampling_rate=0.1)
  with pytest.raises(ValueError, match="cannot take dp_ftrl"):
    ledger.record_tree(noise_multiplier=1.0, steps_per_tree=4)
  tree = accounting.PrivacyLedger()
  tree.record_tree(noise_multiplier=1.0, steps_per_tree=4)
  with pytest.raises(ValueError, match="holds dp_ftrl steps and cannot take dp_mf"):
    tree.record_mf(noise_multiplier=1.0, coefficients=c, steps_per_epoch=4)


@pytest.mark.parametrize("field,value", [("l2_clip", 0.0), ("noise_multiplier", -1.0),
                                         ("batch_size", 0), ("batch_size", 41),
                                         ("num_examples", 0), ("bands", 0), ("bands", 2.5),
                                         ("momentum", 1.0), ("momentum", -0.1),
                                         ("method", "ghosts")])
def test_config_rejects_bad_values(field, value):
  base = dict(l2_clip=1.0, noise_multiplier=1.0, batch_size=8, num_examples=40, bands=3)
  base[field] = value
  with pytest.raises(ValueError, match=field):
    privacy.DPMFConfig(**base)


def test_accounting_rejects_bad_values():
  for bad in ([], [0.0, 1.0], [1.0, -0.5], [[1.0]], [1.0, float("nan")]):
    with pytest.raises(ValueError, match="coefficients"):
      accounting.mf_sensitivity(bad, 10, 2)
  with pytest.raises(ValueError, match="separation"):
    accounting.mf_sensitivity([1.0], 10, 0)
  with pytest.raises(ValueError, match="row_noise"):
    accounting.mf_sensitivity([1.0], 3, 1, [1.0, 0.0, 1.0])
  with pytest.raises(ValueError, match="steps"):
    accounting.calibrate_mf_noise_multiplier(target_epsilon=1.0, coefficients=[1.0], steps=0,
                                             separation=1, delta=1e-5)
