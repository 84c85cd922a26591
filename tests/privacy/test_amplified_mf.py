"""Amplified banded MF: cyclic Poisson sampling, its accounting (DP-SGD's at sigma / ||c|| over
the steps an example can take part in) and the premise of that accounting, checked on the
release itself."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
import scipy.stats

from trustjax import privacy, training
from trustjax.privacy import accounting, dp_mf, sampling
from tests.privacy.helpers import dp_sgd_step, tiny_problem
from tests.privacy.test_dp_ftrl import _linear_problem
from tests.privacy.test_dp_mf import _dense


def _config(**kw):
  base = dict(l2_clip=1.0, noise_multiplier=2.0, sampling_rate=0.5, num_examples=12,
              max_batch_size=12, bands=3)
  return privacy.AmplifiedMFConfig(**{**base, **kw})


def _dp_accounting_epsilon(parts, delta, accountant="pld"):
  """Epsilon of (multiplier, q, count) Poisson-subsampled Gaussian runs, composed by
  dp_accounting's own accountant."""
  acc = (dp_accounting.pld.PLDAccountant() if accountant == "pld"
         else dp_accounting.rdp.RdpAccountant())
  for sigma, q, count in parts:
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                count)
  return acc.get_epsilon(delta)


def test_cyclic_sampling_takes_each_example_only_in_its_groups_steps_at_rate_q():
  n, b, q, steps = 600, 4, 0.3, 800
  groups = sampling.cyclic_groups(5, n, b)
  assert scipy.stats.chisquare(np.bincount(groups, minlength=b)).pvalue > 1e-3
  counts = np.zeros(n)
  for t in range(steps):
    pb = sampling.cyclic_poisson_batch(5, t, n, q, b, max_batch_size=n)
    taken = pb.indices[pb.mask]
    assert pb.overflow == 0 and len(set(taken)) == pb.size
    assert np.all(groups[taken] == t % b), t
    counts[taken] += 1
  # each example: Binomial(steps / b, q) inclusions (a fixed-size sample would have a smaller
  # variance; a sample ignoring the groups a mean of steps * q)
  m = steps // b
  assert counts.mean() == pytest.approx(m * q, abs=4 * math.sqrt(m * q * (1 - q) / n))
  assert counts.var() == pytest.approx(m * q * (1 - q), rel=0.15)
  again = sampling.cyclic_poisson_batch(5, 17, n, q, b, n)
  assert np.array_equal(again.indices, sampling.cyclic_poisson_batch(5, 17, n, q, b, n).indices)
  assert not np.array_equal(sampling.cyclic_groups(6, n, b), groups)


def test_one_group_samples_as_poisson_sampling_does():
  for t in range(5):
    a = sampling.cyclic_poisson_batch(3, t, 500, 0.1, 1, 80)
    p = sampling.poisson_batch(3, t, 500, 0.1, 80)
    assert np.array_equal(a.indices, p.indices) and np.array_equal(a.mask, p.mask)


def test_overflow_is_counted_and_bounded_over_the_groups_and_the_sampling():
  cfg = _config(num_examples=400, sampling_rate=0.8, max_batch_size=72, bands=4)
  seen = [cfg.batch(1, t) for t in range(200)]
  assert all(pb.size == min(pb.size + pb.overflow, 72) == pb.mask.sum() for pb in seen)
  assert sum(pb.overflow for pb in seen) > 0  # about 80 sampled of a group of about 100
  assert cfg.overflow_probability == pytest.approx(
      scipy.stats.binom.sf(72, 401, 0.8 / 4), rel=1e-12)
  assert cfg.expected_batch_size == pytest.approx(80.0)


def test_one_band_is_dp_sgd():
  """With one band the step, the sampling and the epsilon are DP-SGD's."""
  loss_fn, params, batch = tiny_problem(batch_size=8, model="bag")
  amf = _config(num_examples=64, sampling_rate=0.125, max_batch_size=8, bands=1)
  sgd = privacy.DPConfig(l2_clip=1.0, noise_multiplier=2.0, sampling_rate=0.125,
                         num_examples=64, max_batch_size=8)
  opt = optax.sgd(0.1)
  key = jax.random.key(3)
  step = jax.jit(privacy.dp_mf_step, static_argnames=("loss_fn", "optimizer", "config"))
  p1, _, _ = step(params, dp_mf.init_state(params, opt, amf), batch, key, loss_fn=loss_fn,
                  optimizer=opt, config=amf)
  p2, _, _ = dp_sgd_step(params, opt.init(params), batch, key, loss_fn=loss_fn, optimizer=opt,
                         config=sgd)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         p1, p2)
  assert accounting.amplified_mf_epsilon(
      noise_multiplier=2.0, sampling_rate=0.125, coefficients=[1.0], steps=40,
      delta=1e-5) == pytest.approx(accounting.epsilon(
          noise_multiplier=2.0, sampling_rate=0.125, steps=40, delta=1e-5), rel=1e-12)


def test_an_examples_participations_move_disjoint_blocks_of_the_release_by_c():
  """The premise of the accounting. Neighbouring datasets (one example's contribution removed,
  the sampling and noise keys held fixed), plain SGD: the release C G + Z, read back from the
  parameters (prefix sums = -theta E[B] / lr), differs in the rows [t, t + b) after each step t
  the example was sampled in, by a block of norm exactly ||c|| times the clip (its norm is above
  the clip), the blocks disjoint, and nowhere else."""
  loss_fn, params, x = _linear_problem()
  clip, lr, b, steps = 1.0, 0.5, 3, 18
  cfg = _config(l2_clip=clip, sampling_rate=0.75, bands=b, momentum=0.5)
  opt = optax.sgd(lr)
  step = jax.jit(privacy.dp_mf_step, static_argnames=("loss_fn", "optimizer", "config"))
  batches = [cfg.batch(4, t) for t in range(steps)]
  victim = max(range(12), key=lambda i: sum(i in pb.indices[pb.mask] for pb in batches))
  assert np.linalg.norm(x[victim]) > clip
  releases = []
  for keep in (np.ones(12, bool), np.arange(12) != victim):
    p, s, sums = params, dp_mf.init_state(params, opt, cfg), []
    for t, pb in enumerate(batches):
      batch = {"x": jnp.asarray(x[pb.indices]), "mask": jnp.asarray(pb.mask & keep[pb.indices])}
      p, s, _ = step(p, s, batch, jax.random.fold_in(jax.random.key(7), t), loss_fn=loss_fn,
                     optimizer=opt, config=cfg)
      sums.append(-np.asarray(p["w"], np.float64) * cfg.expected_batch_size / lr)
    releases.append(_dense(cfg.coefficients, steps) @ np.diff(np.array(sums), axis=0,
                                                               prepend=0.0))
  gap = np.linalg.norm(releases[0] - releases[1], axis=1)  # per row of the release
  taken = [t for t, pb in enumerate(batches) if victim in pb.indices[pb.mask]]
  assert len(taken) >= 3 and np.all(np.diff(taken) >= b)
  assert all(t % b == taken[0] % b for t in taken)
  rows = np.zeros(steps, bool)
  for t in taken:
    block = np.linalg.norm(gap[t:t + b])
    full = np.linalg.norm(cfg.coefficients[:steps - t])
    assert block == pytest.approx(full * clip, rel=1e-4), t
    rows[t:t + b] = True
  assert np.all(gap[~rows] < 1e-4)
  assert np.abs(releases[0]).max() > 3  # noise was added


@pytest.mark.parametrize("bands,steps", [(3, 30), (4, 31), (16, 40), (8, 5)])
def test_epsilon_is_dp_sgd_at_sigma_over_the_column_norm(bands, steps):
  c = privacy.bsr_coefficients(bands, 0.9)
  sigma, q, delta = 3.0, 0.4, 1e-5
  parts = [(sigma / np.linalg.norm(c), q, -(-steps // bands))]
  for accountant in ("pld", "rdp"):
    assert accounting.amplified_mf_epsilon(
        noise_multiplier=sigma, sampling_rate=q, coefficients=c, steps=steps, delta=delta,
        accountant=accountant) == pytest.approx(
            _dp_accounting_epsilon(parts, delta, accountant), rel=1e-9)


def test_the_ledger_takes_the_worst_group_over_resumes_and_changes_of_sigma():
  c = privacy.bsr_coefficients(4)
  ledger = accounting.PrivacyLedger()
  plan = [(2.0, 0.5, 7), (3.0, 0.5, 6), (3.0, 0.25, 3)]
  for sigma, q, steps in plan:
    for _ in range(steps):  # one step at a time, as a run records them
      ledger.record_amplified_mf(noise_multiplier=sigma, sampling_rate=q, coefficients=c)
  assert [(e.noise_multiplier, e.sampling_rate, e.steps) for e in ledger.entries] == plan
  # brute force: the steps of each entry that sample group g
  owner = np.repeat(np.arange(3), [p[2] for p in plan])
  counts = {tuple(int(np.sum((np.arange(16) % 4 == g) & (owner == i))) for i in range(3))
            for g in range(4)}
  want = max(_dp_accounting_epsilon(
      [(s / np.linalg.norm(c), q, k) for (s, q, _), k in zip(plan, v) if k], 1e-5)
             for v in counts)
  assert ledger.epsilon(1e-5) == pytest.approx(want, rel=1e-9)
  assert ledger.report(1e-5)["participations"] == 4 and ledger.kind == "amplified_mf"
  assert "neighbouring" not in ledger.report(1e-5)  # add/remove, as DP-SGD
  assert accounting.PrivacyLedger.from_json(ledger.to_json()) == ledger
  with pytest.raises(ValueError, match="same factorization"):
    ledger.record_amplified_mf(noise_multiplier=2.0, sampling_rate=0.5,
                               coefficients=privacy.bsr_coefficients(5))
  with pytest.raises(ValueError, match="holds amplified_mf steps and cannot take dp_sgd"):
    ledger.record(noise_multiplier=2.0, sampling_rate=0.5)


def test_calibration_is_tight_and_sound():
  c = privacy.bsr_coefficients(8, 0.9)
  kw = dict(sampling_rate=0.3, coefficients=c, steps=100, delta=1e-5)
  sigma = accounting.calibrate_amplified_mf_noise_multiplier(target_epsilon=2.0, **kw)
  assert accounting.amplified_mf_epsilon(noise_multiplier=sigma, **kw) <= 2.0
  assert accounting.amplified_mf_epsilon(noise_multiplier=sigma * 0.995, **kw) > 2.0


def test_choose_bands_takes_the_least_prefix_error():
  """prefix_error against the dense inverse; the choice against every candidate's error; fewer
  bands (more amplification) at the smaller epsilon."""
  n, kw = 60, dict(batch_size=50, num_examples=1000, steps=60, delta=1e-5, momentum=0.9)
  c = privacy.bsr_coefficients(5, 0.9)
  a = np.tril(scipy.linalg.toeplitz(np.cumsum(0.9 ** np.arange(n))))
  assert dp_mf.prefix_error(c, n, 0.9) == pytest.approx(
      np.linalg.norm(a @ np.linalg.inv(_dense(c, n))) / math.sqrt(n), rel=1e-10)
  chosen = {}
  for eps in (8.0, 0.5):
    errors = {}
    for bands in (1, 2, 4, 8, 16, 20):
      cb = privacy.bsr_coefficients(bands, 0.9)
      errors[bands] = accounting.calibrate_amplified_mf_noise_multiplier(
          target_epsilon=eps, sampling_rate=bands * 50 / 1000, coefficients=cb, steps=60,
          delta=1e-5, accountant="rdp") * dp_mf.prefix_error(cb, n, 0.9)
    chosen[eps] = dp_mf.choose_amplified_bands(target_epsilon=eps, **kw)
    assert chosen[eps] == min(errors, key=errors.get), errors
  assert chosen[0.5] < chosen[8.0]


@pytest.mark.parametrize("field,value,match", [
    ("bands", 0, "bands must be a positive integer"), ("momentum", 1.0, "momentum must lie"),
    ("sampling_rate", 1.5, "sampling_rate must lie"),
    ("adaptive", privacy.dp_sgd.quantile.QuantileClipping(), "adaptive clipping is for DP-SGD")])
def test_config_rejects_bad_values(field, value, match):
  with pytest.raises(ValueError, match=match):
    _config(**{field: value})


def test_schedule_samples_the_configs_groups():
  rng = np.random.default_rng(0)
  arrays = {"x": rng.normal(size=(200, 3)).astype(np.float32), "i": np.arange(200)}
  cfg = _config(num_examples=200, sampling_rate=0.5, max_batch_size=64, bands=4)
  schedule = training.PoissonSchedule(arrays, cfg, seed=2)
  assert schedule.steps_per_epoch == 8  # N / expected batch (25)
  groups = sampling.cyclic_groups(2, 200, 4)
  for t in range(8):
    batch, _ = schedule(t)
    assert np.all(groups[batch["i"][batch["mask"]]] == t % 4)

