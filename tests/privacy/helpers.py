"""A small model and batch for privacy tests."""

import jax
import jax.numpy as jnp
import numpy as np

from trustjax import models, privacy, sharding, training

# The library's functions compose inside the caller's jit; tests jit them the same way, since
# op-by-op (eager) execution of vmapped transformer gradients is slow.
clipped_grad_sum = jax.jit(privacy.clipped_grad_sum, static_argnums=0,
                           static_argnames=("l2_clip", "method", "microbatch_size",
                                            "normalization", "gamma", "per_layer"))
dp_sgd_step = jax.jit(privacy.dp_sgd_step, static_argnames=("loss_fn", "optimizer", "config"))
virtual_batch_accumulate = jax.jit(privacy.virtual_batch_accumulate,
                                   static_argnames=("loss_fn", "config"))
virtual_batch_apply = jax.jit(privacy.virtual_batch_apply, static_argnames=("optimizer", "config"))


def tiny_problem(batch_size=8, seed=0, scale=1.0, model="transformer"):
  """(loss_fn, params, batch) for a tiny classifier ("transformer", or "bag" which compiles
  faster) on random tokens, some rows padded and some masked out."""
  if model == "transformer":
    model = models.TransformerClassifier(vocab_size=40, num_classes=3, max_length=6, embed_dim=8,
                                         num_layers=1, num_heads=2, mlp_dim=16)
  else:
    model = models.BagOfEmbeddings(vocab_size=40, num_classes=3, embed_dim=8, hidden_dim=16)
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 40, (batch_size, 6)).astype(np.int32)
  tokens[:, 4:] *= rng.integers(0, 2, (batch_size, 1))  # some rows padded
  batch = {"tokens": jnp.asarray(tokens), "label": jnp.asarray(rng.integers(0, 3, batch_size)),
           "mask": jnp.asarray(rng.random(batch_size) < 0.75)}
  params = model.init(jax.random.key(seed), batch["tokens"])["params"]
  params = jax.tree_util.tree_map(lambda p: p * scale, params)
  return models.classification_loss(model), params, batch


def params_on_1_and_8_devices(loss_fn, params, config, optimizer, schedule, steps):
  """The parameters after `steps` steps of `training.make_train_step(config)` from the same
  state, on one device and with each batch sharded over an 8-device data mesh."""
  assert jax.device_count() >= 8, "tests/conftest.py forces 8 host devices"
  results = []
  for mesh in (None, sharding.data_mesh(8)):
    step = training.make_train_step(loss_fn, optimizer, config, donate=False)
    state = training.create_state(params, optimizer, jax.random.key(0), dp_config=config)
    if mesh is not None:
      state = sharding.replicate(state, mesh)
    for t in range(steps):
      batch, _ = schedule(t)
      if mesh is not None:
        batch = sharding.shard_batch(batch, mesh)
        assert len(batch["tokens"].sharding.device_set) == 8
      state, _ = step(state, batch)
    results.append(jax.device_get(state.params))
  return results


def checkpoint_with_ledger(folder, ledger, step=3):
  """A run's checkpoint folder holding `ledger` (a stand-in state), as the drivers save one."""
  state = training.TrainState(step=np.int32(step), params={"w": np.zeros(2, np.float32)},
                              opt_state=(), rng=np.zeros(2, np.uint32), clip=np.float32(1))
  training.Checkpointer(str(folder)).save(step, state, {"step": step,
                                                        "ledger": ledger.to_json()})
