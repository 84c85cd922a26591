"""Models trained in parallel equal the same models trained one by one, step by step."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trustjax import sharding, training
from trustjax.attacks import shadow
from trustjax.models import BagOfEmbeddings, classification_loss
from trustjax.privacy import accounting
from trustjax.privacy.dp_sgd import DPConfig, dp_sgd_step
from trustjax.training import nondp_step


def test_membership_masks_are_balanced_and_seeded():
  m = shadow.membership_masks(8, 300, seed=4)
  assert m.shape == (8, 300) and (m.sum(0) == 4).all()
  np.testing.assert_array_equal(m, shadow.membership_masks(8, 300, seed=4))
  assert not np.array_equal(m, shadow.membership_masks(8, 300, seed=5))
  with pytest.raises(ValueError, match="even"):
    shadow.membership_masks(3, 10)


def test_poisson_sample_takes_only_members_at_the_rate():
  member = jnp.asarray(np.arange(200) % 3 == 0)  # 67 members
  sample = jax.jit(jax.vmap(lambda k: shadow._sample(k, member, 0.2, 40)))
  idx, mask, over = sample(jax.random.split(jax.random.key(0), 4000))
  idx, mask = np.asarray(idx), np.asarray(mask)
  assert (over == 0).all()
  picked = np.zeros((4000, 200), bool)
  for r in range(4000):
    picked[r, idx[r][mask[r]]] = True
  assert not picked[:, ~np.asarray(member)].any()
  freq = picked[:, np.asarray(member)].mean(0)
  # each member's frequency ~ Binomial(4000, 0.2) / 4000: sd 0.0063
  assert np.abs(freq - 0.2).max() < 0.03 and abs(freq.mean() - 0.2) < 0.004


def _setup():
  rng = np.random.default_rng(0)
  n = 60
  arrays = {"tokens": rng.integers(1, 50, size=(n, 6)).astype(np.int32),
            "label": rng.integers(0, 3, n).astype(np.int32)}
  model = BagOfEmbeddings(vocab_size=50, num_classes=3, embed_dim=8, hidden_dim=16)
  init = lambda k: model.init(k, jnp.zeros((1, 6), jnp.int32))["params"]
  return arrays, model, init, classification_loss(model)


def _one_by_one(init, loss_fn, opt, arrays, is_in, *, q, b, steps, cfg, seed):
  """The reference: each model alone, one jitted step at a time, keys derived as
  `train_in_parallel` derives them. Returns each model's params."""
  root = jax.random.key(seed)
  num_models = len(is_in)
  mkeys = jax.random.split(jax.random.fold_in(root, 0), num_models)
  ikeys = jax.random.split(jax.random.fold_in(root, 1), num_models)
  data = {k: jnp.asarray(v) for k, v in arrays.items()}

  @jax.jit
  def step(params, state, member, key):
    ks, kn = jax.random.split(key)
    idx, mask, _ = shadow._sample(ks, member, q, b)
    batch = {k: v[idx] for k, v in data.items()} | {"mask": mask}
    if cfg is not None:
      params, state, _ = dp_sgd_step(params, state, batch, kn, loss_fn=loss_fn, optimizer=opt,
                                     config=cfg)
    else:
      params, state, _ = nondp_step(params, state, batch, loss_fn=loss_fn, optimizer=opt)
    return params, state

  out = []
  for m in range(num_models):
    params = init(ikeys[m])
    state = opt.init(params)
    for t in range(steps):
      params, state = step(params, state, jnp.asarray(is_in[m]), jax.random.fold_in(mkeys[m], t))
    out.append(params)
  return out


def _parallel_and_reference(init, loss_fn, arrays, *, dp, devices, steps, model_chunk=0,
                            frozen=None):
  """4 models trained by `train_in_parallel` and by `_one_by_one` (with `frozen`: on the loss
  closed over it). Returns (the parallel result, the reference params, the DP config)."""
  is_in = shadow.membership_masks(4, 60, seed=1)
  opt = optax.adam(0.05)
  q, b = 0.25, 24
  cfg = (DPConfig(l2_clip=1.0, noise_multiplier=0.8, sampling_rate=q, num_examples=60,
                  max_batch_size=b, method="bookkeeping") if dp else None)
  got = shadow.train_in_parallel(init, loss_fn, opt, arrays, is_in, num_steps=steps,
                                 sampling_rate=q, batch_size=b, seed=3, dp_config=cfg,
                                 chunk_steps=3, model_chunk=model_chunk, show_progress=False,
                                 mesh=shadow.model_mesh(devices) if devices > 1 else None,
                                 frozen=frozen)
  ref_loss = loss_fn if frozen is None else training.with_frozen(loss_fn, frozen)
  ref = _one_by_one(init, ref_loss, opt, arrays, is_in, q=q, b=b, steps=steps, cfg=cfg, seed=3)
  for m in range(4):
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[m], got.params), ref[m],
                                atol=2e-5, rtol=2e-5)
  return got, ref, cfg


@pytest.mark.parametrize("dp,model_chunk,devices", [
    (False, 0, 1), (True, 0, 1), (False, 3, 1), (False, 4, 1), (False, 0, 3), (True, 1, 2)])
def test_parallel_training_equals_a_loop_over_models(dp, model_chunk, devices):
  """All chunkings: 2 models per vmap (the CPU default), 3 (the last chunk padded), 4 (one);
  sharded over 3 devices (4 models padded to 6, 2 per device) and over 2 (1 per vmap)."""
  arrays, _, init, loss_fn = _setup()
  got, _, cfg = _parallel_and_reference(init, loss_fn, arrays, dp=dp, devices=devices, steps=7,
                                        model_chunk=model_chunk)
  assert got.steps == 7 and got.overflow.shape == (4,)
  if dp:
    ledger = shadow.ledger_for(cfg, 7)
    eps = ledger.report(1e-5, "rdp")["epsilon"]
    assert eps == pytest.approx(accounting.epsilon(noise_multiplier=0.8, sampling_rate=0.25,
                                                   steps=7, delta=1e-5, accountant="rdp"),
                                rel=1e-6)


@pytest.mark.parametrize("dp,devices", [(False, 1), (True, 2)])
def test_frozen_parameters_are_shared_and_only_the_rest_is_trained(dp, devices):
  """With `frozen`, each model trains only its own copy of the rest: as each model alone
  training the loss closed over the frozen part (`training.with_frozen`); with a mesh, the
  frozen part is replicated."""
  arrays, model, init, loss_fn = _setup()
  fixed = {"embed": init(jax.random.key(9))["embed"]}  # e.g. a pretrained table
  trainable = lambda k: training.split_frozen(init(k), ("embed",))[0]
  got, ref, _ = _parallel_and_reference(trainable, loss_fn, arrays, dp=dp, devices=devices,
                                        steps=5, frozen=fixed)
  assert sorted(got.params) == ["hidden", "out"]  # the trained part, stacked
  # the models moved apart from their common start, and their logits use the shared table
  assert not np.allclose(ref[0]["out"]["kernel"], ref[1]["out"]["kernel"])
  logits = shadow.logits_of_all(lambda p, t: model.apply({"params": p}, t), got.params,
                                arrays["tokens"], batch_size=16, frozen=fixed)
  whole = training.merge_frozen(ref[2], fixed)
  np.testing.assert_allclose(logits[2], model.apply({"params": whole}, arrays["tokens"]),
                             rtol=1e-5, atol=1e-5)

def test_ctrl_c_saves_the_models_and_a_rerun_resumes_them(tmp_path, monkeypatch,
                                                          interactive_sigint):
  """A SIGINT during the first chunk of DP training: the chunk finishes, every model is saved
  and KeyboardInterrupt raised; a rerun with the file gives the uninterrupted run's models
  (over 3 devices: 4 models padded to 6, the copies not saved)."""
  import signal  # pylint: disable=import-outside-toplevel
  arrays, _, init, loss_fn = _setup()
  is_in = shadow.membership_masks(4, 60, seed=1)
  q, b = 0.25, 24
  cfg = DPConfig(l2_clip=1.0, noise_multiplier=0.8, sampling_rate=q, num_examples=60,
                 max_batch_size=b, method="bookkeeping")
  mesh = shadow.model_mesh(3)
  train = lambda **kw: shadow.train_in_parallel(
      init, loss_fn, optax.adam(0.05), arrays, is_in, num_steps=9, sampling_rate=q,
      batch_size=b, seed=3, dp_config=cfg, chunk_steps=3, mesh=mesh, **kw)
  whole = train(show_progress=False)

  bars = []

  class Bar:  # Ctrl-C while the first chunk runs (the bar moves after it)
    def __init__(self, *a, **k):
      self.steps = []
      bars.append(self)

    def update(self, n):
      self.steps.append(n)
      if self.steps == [0, 3]:  # a fresh run: nothing done, then the first chunk
        signal.raise_signal(signal.SIGINT)

    def close(self):
      pass

  monkeypatch.setattr(shadow.reporting, "progress", Bar)
  path = str(tmp_path / "models.training")
  with pytest.raises(KeyboardInterrupt, match="step 3 of 9"):
    train(checkpoint=path)
  # the rerun starts from step 3 (its bar too) and ends where the uninterrupted run did
  again = train(checkpoint=path)
  assert bars[-1].steps == [3, 3, 3]
  chex.assert_trees_all_equal(again.params, whole.params)
  np.testing.assert_array_equal(again.overflow, whole.overflow)
  # a file of other models is refused
  with pytest.raises(ValueError, match="holds other models"):
    shadow.train_in_parallel(init, loss_fn, optax.adam(0.05), arrays, ~is_in, num_steps=9,
                             sampling_rate=q, batch_size=b, seed=3, dp_config=cfg,
                             chunk_steps=3, show_progress=False, checkpoint=path)


def test_training_fits_members_better_than_non_members():
  arrays, model, init, loss_fn = _setup()
  is_in = shadow.membership_masks(4, 60, seed=2)
  got = shadow.train_in_parallel(init, loss_fn, optax.adam(0.05), arrays, is_in, num_steps=150,
                                 sampling_rate=0.3, batch_size=24, seed=0, show_progress=False)
  logits = shadow.logits_of_all(lambda p, t: model.apply({"params": p}, t), got.params,
                                arrays["tokens"], batch_size=16)
  assert logits.shape == (4, 60, 3)
  ref = model.apply({"params": jax.tree.map(lambda x: x[1], got.params)}, arrays["tokens"])
  np.testing.assert_allclose(logits[1], ref, rtol=1e-5, atol=1e-5)
  loss = np.asarray(optax.softmax_cross_entropy_with_integer_labels(
      jnp.asarray(logits), jnp.asarray(arrays["label"])[None]))
  assert loss[is_in].mean() < 0.2 < 1.0 < loss[~is_in].mean()  # random labels: memorised


def test_bad_arguments_are_named():
  arrays, _, init, loss_fn = _setup()
  is_in = shadow.membership_masks(2, 60)
  kw = dict(num_steps=2, sampling_rate=0.5, batch_size=40, show_progress=False)
  with pytest.raises(ValueError, match="rows"):
    shadow.train_in_parallel(init, loss_fn, optax.sgd(0.1), arrays, is_in[:, :50], **kw)
  bad = DPConfig(l2_clip=1.0, noise_multiplier=1.0, sampling_rate=0.5, num_examples=10,
                 max_batch_size=40)
  with pytest.raises(ValueError, match="model_chunk"):
    shadow.train_in_parallel(init, loss_fn, optax.sgd(0.1), arrays, is_in, model_chunk=-1, **kw)
  with pytest.raises(ValueError, match="num_examples"):
    shadow.train_in_parallel(init, loss_fn, optax.sgd(0.1), arrays, is_in, dp_config=bad, **kw)
  with pytest.raises(ValueError, match="axis 'models'"):
    shadow.train_in_parallel(init, loss_fn, optax.sgd(0.1), arrays, is_in,
                             mesh=sharding.data_mesh(2), **kw)
