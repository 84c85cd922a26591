"""Many models trained in parallel on random halves of one pool of examples: LiRA's shadow
models, and the targets of a leave-one-out membership audit.

All models run as one compiled program: a `lax.scan` over steps inside a `vmap` over models
(in chunks of models run one after another by `lax.map`). With a mesh (axis "models"), each
device trains its own contiguous block of the models (`jax.shard_map`; the models are
independent, so nothing moves between devices during training). Model m sees only its own members:
step t samples each of them independently with probability q (Poisson sampling, as the DP
accountant assumes), padded to a static batch size; the sample is drawn on the device from
(seed, m, t). A draw larger than the batch keeps its lowest-indexed members and is counted as
overflow; the ledger's delta includes the probability of any overflow over the run
(`DPConfig.overflow_probability`), as for `scripts/train.py`.

Parameters held fixed (`frozen`: a pretrained encoder under LoRA or a linear probe) are one
copy shared by every model, passed to the compiled programs as an argument (closed over, XLA
would fold them as constants into the program); only the trained part is stacked over models.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from trustjax import reporting, sharding
from trustjax.privacy import accounting
from trustjax.privacy.dp_sgd import DPConfig, dp_sgd_step
from trustjax.training import StopAtStepEnd, merge_frozen, nondp_step, with_frozen
from trustjax.types import LossFn, Params, PRNGKey

MODELS_AXIS = "models"


def model_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh named "models" over the first `num_devices` devices (0 = all)."""
  return sharding.data_mesh(num_devices or None, axis=MODELS_AXIS)


def membership_masks(num_models: int, num_examples: int, *, seed: int = 0) -> np.ndarray:
  """bool [num_models, num_examples]: each example is a member of exactly half of the models,
  chosen at random (the balanced design of Carlini et al. 2022), so every example has as many
  "in" as "out" shadow models."""
  if num_models < 2 or num_models % 2:
    raise ValueError(f"num_models must be even and >= 2, got {num_models=}")
  if num_examples < 1:
    raise ValueError(f"num_examples must be positive, got {num_examples=}")
  u = np.random.default_rng(seed).uniform(size=(num_models, num_examples))
  return u.argsort(0).argsort(0) < num_models // 2


class ParallelModels(NamedTuple):
  params: Params  # stacked: every leaf has a leading [models] axis
  is_in: np.ndarray  # bool [models, examples]
  overflow: np.ndarray  # int [models]: sampled members dropped because the batch was full
  steps: int  # steps each model took


def _sample(key: PRNGKey, is_in: jax.Array, rate: float, batch_size: int):
  """Poisson sample of the members `is_in: bool [n]` at `rate`, as padded indices and a mask."""
  picked = is_in & (jax.random.uniform(key, is_in.shape) < rate)
  count = picked.sum()
  (idx,) = jnp.nonzero(picked, size=batch_size, fill_value=0)
  return idx, jnp.arange(batch_size) < count, jnp.maximum(count - batch_size, 0)


def model_trainer(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                  arrays: Mapping[str, np.ndarray], *, sampling_rate: float, batch_size: int,
                  dp_config: DPConfig | None, steps: int) -> Callable:
  """`train(params, opt_state, key, member, start, frozen=None) -> (params, opt_state,
  overflow)`: one model's steps start, ..., start + steps - 1 (a `lax.scan`), unjitted and
  unbatched.

  Step t samples the members (`member: bool [n]`) with `fold_in(key, t)`, then takes a non-DP
  step on the masked mean loss or, with `dp_config`, a DP-SGD step. With `frozen` (the fixed
  part of the parameters, `training.split_frozen`), `params` is the trained part, `loss_fn`
  sees both merged, and the gradient, clipping and noise cover the trained part only.
  `train_in_parallel` vmaps it over models; `scripts/benchmark_audit.py` also runs it one model
  at a time.
  """
  data = {k: jnp.asarray(v) for k, v in arrays.items()}

  def train(params, opt_state, key, member, start, frozen=None):
    loss = loss_fn if frozen is None else with_frozen(loss_fn, frozen)

    def body(carry, t):
      params, opt_state, overflow = carry
      k_sample, k_noise = jax.random.split(jax.random.fold_in(key, t))
      idx, mask, over = _sample(k_sample, member, sampling_rate, batch_size)
      batch = {k: v[idx] for k, v in data.items()}
      batch["mask"] = mask
      if dp_config is None:
        params, opt_state, _ = nondp_step(params, opt_state, batch, loss_fn=loss,
                                          optimizer=optimizer)
      else:
        params, opt_state, _ = dp_sgd_step(params, opt_state, batch, k_noise, loss_fn=loss,
                                           optimizer=optimizer, config=dp_config)
      return (params, opt_state, overflow + over), None

    (params, opt_state, overflow), _ = jax.lax.scan(
        body, (params, opt_state, jnp.zeros((), jnp.int32)), start + jnp.arange(steps))
    return params, opt_state, overflow

  return train


def train_in_parallel(init_fn: Callable[[PRNGKey], Params], loss_fn: LossFn,
                      optimizer: optax.GradientTransformation, arrays: Mapping[str, np.ndarray],
                      is_in: np.ndarray, *, num_steps: int, sampling_rate: float,
                      batch_size: int, seed: int = 0, dp_config: DPConfig | None = None,
                      chunk_steps: int = 100, model_chunk: int = 0,
                      mesh: Mesh | None = None, show_progress: bool = True,
                      desc: str = "models", frozen: Params | None = None,
                      checkpoint: str | None = None) -> ParallelModels:
  """Trains one model per row of `is_in`, all at once.

  Args:
    init_fn: `init_fn(key) -> params`; each model gets its own key. With `frozen`, the trained
      part only.
    loss_fn: per-example loss `loss_fn(params, batch) -> [B]` of the whole parameters (with
      `frozen`: the trained part merged with it, `training.merge_frozen`).
    optimizer: optax transformation (non-DP: it gets the masked mean gradient; DP: the
      privatized one).
    arrays: the pool, dict of arrays with a leading [n] axis (e.g. "tokens", "label").
    is_in: bool [models, n] membership (`membership_masks`).
    num_steps: steps per model.
    sampling_rate: q, each member's probability of joining a step's batch.
    batch_size: the static padded batch size (members sampled beyond it are dropped and
      counted in `overflow`; choose it with `privacy.default_max_batch_size`).
    seed: the run's seed (initialisation, sampling and noise derive from it).
    dp_config: None for non-DP training; otherwise DP-SGD with this mechanism on every step.
      Its `sampling_rate` and `max_batch_size` must equal the arguments, and its
      `num_examples` must be at least the largest model's member count (it enters only the
      noise denominator and the overflow probability).
    chunk_steps: steps per compiled call (the progress bar moves between calls).
    model_chunk: models per vmap; chunks run one after another (`lax.map`) inside the same
      program. 0 = all models in one vmap on an accelerator, 2 on a CPU, where that was about
      30% faster than one vmap over 16 models (BENCHMARKS.md). With a mesh, per device.
    mesh: optional mesh with axis "models" (`model_mesh`): device i of n trains models
      [i * M / n, (i + 1) * M / n), M being the models padded with copies of the last one to a
      multiple of n (the copies are dropped). The models come out as without a mesh (each
      model's keys, samples and noise are its own), sharded along their leading axis.
    show_progress: draw a progress bar.
    desc: the progress bar's label.
    frozen: parameters held fixed, one copy shared by every model (`training.split_frozen`);
      the returned params are the trained part.
    checkpoint: a file for Ctrl-C. The first SIGINT lets the current chunk of steps finish,
      saves every model's state there (`StopAtStepEnd`) and raises KeyboardInterrupt; a later
      call with the same file and arguments resumes from it, giving the models an uninterrupted
      run gives (each step's samples and noise come from the seed, the model and the step).
      The file is not removed at the end: the caller deletes it once the result is safe.
  """
  is_in = np.asarray(is_in, bool)
  num_models, n = is_in.shape
  lengths = {k: len(v) for k, v in arrays.items()}
  if set(lengths.values()) != {n}:
    raise ValueError(f"every array needs {n} rows (is_in's width), got {lengths}")
  if not 0.0 < sampling_rate <= 1.0:
    raise ValueError(f"sampling_rate must lie in (0, 1], got {sampling_rate=}")
  if num_steps < 1 or batch_size < 1 or chunk_steps < 1:
    raise ValueError(f"num_steps, batch_size and chunk_steps must be positive, got "
                     f"{num_steps=}, {batch_size=}, {chunk_steps=}")
  if dp_config is not None:
    if (dp_config.sampling_rate != sampling_rate or dp_config.max_batch_size != batch_size
        or dp_config.num_examples < int(is_in.sum(1).max())):
      raise ValueError("dp_config must have this sampling_rate and batch_size as max_batch_size, "
                       "and num_examples >= the largest model's member count "
                       f"({int(is_in.sum(1).max())}); got {dp_config}")
    if dp_config.adaptive is not None:
      raise ValueError("adaptive clipping is not supported for models trained in parallel")
  shards = 1
  if mesh is not None:
    if MODELS_AXIS not in mesh.axis_names:
      raise ValueError(f"mesh needs an axis {MODELS_AXIS!r}, got {mesh.axis_names}")
    shards = mesh.shape[MODELS_AXIS]
  root = jax.random.key(seed)
  model_keys = jax.random.split(jax.random.fold_in(root, 0), num_models)
  params = jax.vmap(init_fn)(jax.random.split(jax.random.fold_in(root, 1), num_models))
  opt_state = jax.vmap(optimizer.init)(params)
  snapshot = lambda params, opt_state, overflow, done: {
      "params": params, "opt_state": opt_state, "overflow": overflow, "done": np.int64(done),
      "is_in": is_in}  # what the checkpoint file holds
  saved = snapshot(params, opt_state, np.zeros(num_models, np.int64), 0)  # also its template
  if checkpoint is not None and os.path.exists(checkpoint):
    with open(checkpoint, "rb") as f:
      saved = serialization.from_bytes(saved, f.read())
    if not np.array_equal(saved["is_in"], is_in) or not 0 < int(saved["done"]) <= num_steps:
      raise ValueError(f"{checkpoint} holds other models (membership or {int(saved['done'])} "
                       f"steps done of {num_steps}): delete it or pass another file")
    params, opt_state = saved["params"], saved["opt_state"]
  members = jnp.asarray(is_in)
  padded = -(-num_models // shards) * shards
  if padded > num_models:  # copies of the last model fill the last device's block
    copy = jnp.minimum(jnp.arange(padded), num_models - 1)
    params, opt_state, model_keys, members = jax.tree.map(
        lambda x: x[copy], (params, opt_state, model_keys, members))
  c = resolve_model_chunk(model_chunk, padded // shards)
  if mesh is not None:
    params, opt_state, model_keys, members = jax.device_put(
        (params, opt_state, model_keys, members), NamedSharding(mesh, P(MODELS_AXIS)))
    if frozen is not None:  # a copy on every device
      frozen = jax.device_put(frozen, NamedSharding(mesh, P()))
  chunks = {}

  def run(count, *args):
    if count not in chunks:
      chunks[count] = jax.jit(models_program(
          model_trainer(loss_fn, optimizer, arrays, sampling_rate=sampling_rate,
                        batch_size=batch_size, dp_config=dp_config, steps=count), c, mesh))
    return chunks[count](*args)

  overflow = np.zeros(padded, np.int64)
  overflow[:num_models] = saved["overflow"]
  done = int(saved["done"])
  bar = reporting.progress(num_steps, desc=desc) if show_progress else None
  if bar is not None:
    bar.update(done)

  def save():  # the models without the padding copies
    state = jax.tree.map(lambda x: np.asarray(x)[:num_models] if np.ndim(x) else x,
                         snapshot(params, opt_state, overflow, done))
    with open(checkpoint + ".tmp", "wb") as f:
      f.write(serialization.to_bytes(state))
    os.replace(checkpoint + ".tmp", checkpoint)

  with StopAtStepEnd() as stop:
    while done < num_steps:
      count = min(chunk_steps, num_steps - done)
      params, opt_state, over = run(count, params, opt_state, model_keys, members,
                                    jnp.int32(done), frozen)
      overflow += np.asarray(over)
      done += count
      if bar is not None:
        bar.update(count)
      if stop.requested and done < num_steps:
        if checkpoint is not None:
          save()
        stop.stop_if_requested(f"step {done} of {num_steps} ({desc})",
                               saved=checkpoint is not None, bar=bar)
  if bar is not None:
    bar.close()
  if padded > num_models:
    params = jax.tree.map(lambda x: x[:num_models], params)
    overflow = overflow[:num_models]
  return ParallelModels(params=params, is_in=is_in, overflow=overflow, steps=num_steps)


def models_program(train: Callable, model_chunk: int, mesh: Mesh | None = None) -> Callable:
  """`(params, opt_state, keys, members, start, frozen=None) -> (params, opt_state, overflow)`
  for stacked models (leading [models] axis; `start` and `frozen` shared): one model's `train`
  (`model_trainer`'s) under `vmap`, `model_chunk` models at a time (`in_chunks`); with `mesh`,
  each device of its "models" axis runs its own contiguous block that way (`jax.shard_map`;
  the models must be a multiple of the devices; `frozen` replicated). Unjitted."""
  vmapped = jax.vmap(train, in_axes=(0, 0, 0, 0, None, None))
  block = lambda p, s, k, member, start, frozen=None: in_chunks(
      vmapped, model_chunk, p, s, k, member, shared=(start, frozen))
  if mesh is None:
    return block
  spec = P(MODELS_AXIS)
  sharded = jax.shard_map(block, mesh=mesh, in_specs=(spec, spec, spec, spec, P(), P()),
                          out_specs=spec, check_vma=False)
  return lambda p, s, k, member, start, frozen=None: sharded(p, s, k, member, start, frozen)


def resolve_model_chunk(model_chunk: int, num_models: int) -> int:
  """Models per vmap: `model_chunk`, or for 0 all of them (2 on a CPU); at most `num_models`."""
  if model_chunk < 0:
    raise ValueError(f"model_chunk must be >= 0, got {model_chunk=}")
  if model_chunk == 0:
    model_chunk = 2 if jax.default_backend() == "cpu" else num_models
  return min(model_chunk, num_models)


def in_chunks(fn: Callable, chunk: int, *stacked, shared: tuple = ()):
  """`fn(*stacked, *shared)` for stacked arguments (leading [models] axis), `chunk` models at a
  time through `lax.map`; the last chunk is padded with copies of the last model and the copies
  dropped."""
  m = jax.tree.leaves(stacked)[0].shape[0]
  n_chunks = -(-m // chunk)
  idx = jnp.minimum(jnp.arange(n_chunks * chunk), m - 1)
  split = lambda x: x[idx].reshape((n_chunks, chunk) + x.shape[1:])
  out = jax.lax.map(lambda a: fn(*a, *shared), jax.tree.map(split, stacked))
  return jax.tree.map(lambda x: x.reshape((n_chunks * chunk,) + x.shape[2:])[:m], out)


def ledger_for(dp_config: DPConfig, steps: int) -> accounting.PrivacyLedger:
  """The privacy ledger of one of the models: `steps` steps of `dp_config`."""
  ledger = accounting.PrivacyLedger()
  dp_config.record(ledger, steps)
  return ledger


def logits_of_all(apply_fn: Callable[[Params, jax.Array], jax.Array], params: Params,
                  inputs: np.ndarray, *, batch_size: int = 512,
                  frozen: Params | None = None) -> np.ndarray:
  """float32 [models, n, classes]: every model's logits on every row of `inputs: [n, ...]`
  (`apply_fn` of the whole parameters; with `frozen`, `params` is the trained part)."""
  full = lambda p, x, fz: apply_fn(p if fz is None else merge_frozen(p, fz), x)
  f = jax.jit(jax.vmap(full, in_axes=(0, None, None)))
  n = len(inputs)
  batch_size = min(batch_size, n)  # no padding beyond the inputs
  out = []
  for s in range(0, n, batch_size):
    chunk = np.asarray(inputs[s:s + batch_size])
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, 0)])
    out.append(np.asarray(f(params, jnp.asarray(chunk), frozen))[:, :batch_size - pad])
  return np.concatenate(out, axis=1)
