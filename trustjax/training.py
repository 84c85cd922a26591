"""Train state, train steps (non-DP and DP), batch schedules, evaluation, checkpoints, the loop.

Every step is a pure function of (state, batch); the batch of step t is a pure function of
(seed, t), and the noise key of step t is fold_in(rng, t). A run restored from the checkpoint of
step t therefore continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
from typing import Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from trustjax import reporting, sharding
from trustjax.data.batching import gather_batch, pad_indices
from trustjax.privacy import accounting
from trustjax.privacy.clipping import OPTIMIZER_SCOPE
from trustjax.privacy import dp_mf
from trustjax.privacy.dp_ftrl import DPFTRLConfig, dp_ftrl_step
from trustjax.privacy.dp_mf import MF_CONFIGS, DPMFConfig, dp_mf_step
from trustjax.privacy.dp_sgd import DPConfig, dp_sgd_step, dp_sgd_step_adaptive
from trustjax.types import Batch, LossFn, Params, PRNGKey


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 [], number of steps taken
  params: Params  # model parameters
  opt_state: optax.OptState  # optimizer state
  rng: jax.Array  # uint32 [2], raw key data; step t uses fold_in(rng, t)
  clip: jax.Array  # float32 []: the current clip norm (adaptive clipping; else unused)


def _path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def split_frozen(params: Params, frozen: Sequence[str]) -> tuple[Params, Params]:
  """(trainable, frozen) parts of nested-dict `params`: a leaf is frozen when its path
  ("encoder/word_embeddings/embedding") is one of the `frozen` prefixes or lies under one
  ("encoder" freezes the whole encoder: a linear probe of a pretrained model). Both parts keep
  the nesting; `merge_frozen` puts them back together. Raises ValueError for a prefix that
  names no parameter, or when nothing would be left to train."""
  prefixes = [p.strip("/") for p in frozen]
  used = set()

  def is_frozen(path):
    name = _path_str(path)
    hits = [p for p in prefixes if name == p or name.startswith(p + "/")]
    used.update(hits)
    return bool(hits)

  def split(tree, prefix=()):
    train, fixed = {}, {}
    for k, v in tree.items():
      path = prefix + (k,)
      if isinstance(v, Mapping):
        t, f = split(v, path)
        if t:
          train[k] = t
        if f:
          fixed[k] = f
      elif is_frozen(path):
        fixed[k] = v
      else:
        train[k] = v
    return train, fixed

  train, fixed = split(params)
  unknown = sorted(set(prefixes) - used)
  if unknown:
    names = sorted({_path_str(p).rsplit("/", 1)[0] for p, _ in
                    jax.tree_util.tree_flatten_with_path(params)[0]})
    raise ValueError(f"frozen names {unknown} match no parameter; the model's layers: {names}")
  if not jax.tree_util.tree_leaves(train):
    raise ValueError(f"frozen={list(frozen)} freezes every parameter: nothing left to train")
  return train, fixed


def merge_frozen(trainable: Params, frozen: Params) -> Params:
  """The full parameters from the two parts of `split_frozen`."""
  out = dict(trainable)
  for k, v in frozen.items():
    out[k] = merge_frozen(out[k], v) if k in out and isinstance(v, Mapping) else v
  return out


def with_frozen(loss_fn: LossFn, frozen: Params) -> LossFn:
  """`loss_fn` as a function of the trainable part only (`frozen` held fixed): the gradient, its
  per-example clipping and DP noise then cover only the trainable parameters."""
  return lambda trainable, batch: loss_fn(merge_frozen(trainable, frozen), batch)


def create_state(params: Params, optimizer: optax.GradientTransformation, rng: PRNGKey,
                 clip: float = 0.0, frozen: Sequence[str] = (),
                 dp_config: DPConfig | DPFTRLConfig | DPMFConfig | None = None) -> TrainState:
  """The state at step 0. With `frozen` (see `split_frozen`) the optimizer's state covers the
  trainable parameters only; `params` keeps all of them. A `DPMFConfig` or an
  `AmplifiedMFConfig` (a `DPConfig`) adds its noise history to the optimizer's state
  (`dp_mf.MFState`); other configs change nothing here."""
  trainable = split_frozen(params, frozen)[0] if frozen else params
  opt_state = (dp_mf.init_state(trainable, optimizer, dp_config)
               if isinstance(dp_config, MF_CONFIGS) else optimizer.init(trainable))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=opt_state, rng=jax.random.key_data(rng),
                    clip=jnp.asarray(clip, jnp.float32))


def nondp_step(params: Params, opt_state: optax.OptState, batch: Batch, *, loss_fn: LossFn,
               optimizer: optax.GradientTransformation):
  """One ordinary step on the masked mean loss. Returns (params, opt_state, metric sums)."""
  mask = batch["mask"].astype(jnp.float32)

  def mean_loss(p):
    losses = loss_fn(p, batch).astype(jnp.float32) * mask
    return losses.sum() / jnp.maximum(mask.sum(), 1.0), losses.sum()

  (_, loss_sum), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
  with jax.named_scope(OPTIMIZER_SCOPE):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return params, opt_state, {"loss_sum": loss_sum, "count": mask.sum()}


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    dp_config: DPConfig | DPFTRLConfig | DPMFConfig | None = None, *,
                    donate: bool = True, frozen: Sequence[str] = ()) -> Callable:
  """A jitted `step(state, batch) -> (state, metrics)`; DP-SGD when `dp_config` is a `DPConfig`
  (Poisson-sampled batches), DP-FTRL when it is a `DPFTRLConfig` (fixed-size batches of shuffled
  epochs, `EpochSchedule` with the config's batch size: step s is in epoch s // T), DP-MF when
  it is a `DPMFConfig` (the same, with `reshuffle=False`; the state from `create_state` with
  that config), amplified DP-MF when it is an `AmplifiedMFConfig` (cyclic Poisson batches,
  `PoissonSchedule`; the state as DP-MF's).

  `frozen` (parameter path prefixes, `split_frozen`) keeps those parameters at their values in
  the state: no gradient is computed for them, and under DP they are neither clipped nor
  noised, since they are not part of what the step releases. The state must come from
  `create_state` with the same `frozen`."""
  frozen = tuple(frozen)

  def step(state: TrainState, batch: Batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    clip = state.clip
    params, fixed, loss = state.params, None, loss_fn
    if frozen:
      params, fixed = split_frozen(state.params, frozen)
      loss = with_frozen(loss_fn, fixed)
    if dp_config is None:
      params, opt_state, metrics = nondp_step(params, state.opt_state, batch,
                                              loss_fn=loss, optimizer=optimizer)
    elif isinstance(dp_config, DPFTRLConfig):  # one noise key for the run, a tree per epoch
      params, opt_state, metrics = dp_ftrl_step(
          params, state.opt_state, batch, jax.random.wrap_key_data(state.rng), state.step,
          loss_fn=loss, optimizer=optimizer, config=dp_config)
    elif isinstance(dp_config, MF_CONFIGS):
      params, opt_state, metrics = dp_mf_step(params, state.opt_state, batch, key, loss_fn=loss,
                                              optimizer=optimizer, config=dp_config)
    elif dp_config.adaptive is not None:
      params, opt_state, clip, metrics = dp_sgd_step_adaptive(
          params, state.opt_state, state.clip, batch, key, loss_fn=loss,
          optimizer=optimizer, config=dp_config)
    else:
      params, opt_state, metrics = dp_sgd_step(params, state.opt_state, batch, key,
                                               loss_fn=loss, optimizer=optimizer,
                                               config=dp_config)
    if frozen:
      params = merge_frozen(params, fixed)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         clip=clip), metrics

  return jax.jit(step, donate_argnums=0 if donate else ())


# ----------------------------------------------------------------------------- batch schedules


class PoissonSchedule:
  """Step t's batch is the config's Poisson sample `config.batch(seed, t)`, padded
  (`sampling.poisson_batch` for a `DPConfig`, `sampling.cyclic_poisson_batch` for an
  `AmplifiedMFConfig`); an epoch is N / expected batch size steps."""

  def __init__(self, arrays: Mapping[str, np.ndarray], config: DPConfig, seed: int):
    self.arrays, self.config, self.seed = arrays, config, seed
    self.steps_per_epoch = max(1, round(config.num_examples / config.expected_batch_size))

  def __call__(self, step: int) -> tuple[dict, int]:
    pb = self.config.batch(self.seed, step)
    return gather_batch(self.arrays, pb.indices, pb.mask), pb.overflow


class EpochSchedule:
  """Shuffled epochs of fixed-size batches (the last one padded); step t -> (epoch, batch).
  With `reshuffle=False` the data are shuffled once (epoch 0's order) and every epoch passes
  them in that order: batch t0 of every epoch holds the same examples (what DP-MF's
  sensitivity assumes)."""

  def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, seed: int,
               reshuffle: bool = True):
    self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
    self.reshuffle = reshuffle
    self.n = len(next(iter(arrays.values())))
    self.steps_per_epoch = -(-self.n // batch_size)
    self._perm = (None, None)

  def __call__(self, step: int) -> tuple[dict, int]:
    epoch, b = divmod(step, self.steps_per_epoch)
    epoch = epoch if self.reshuffle else 0
    if self._perm[0] != epoch:
      self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
    idx = self._perm[1][b * self.batch_size:(b + 1) * self.batch_size]
    return gather_batch(self.arrays, *pad_indices(idx, self.batch_size)), 0


# ----------------------------------------------------------------------------- evaluation


def make_eval_step(metrics_fn: Callable[[Params, Batch], dict]) -> Callable:
  return jax.jit(metrics_fn)


def evaluate_sums(eval_step: Callable, params: Params, arrays: Mapping[str, np.ndarray],
                  batch_size: int, mesh=None) -> dict[str, np.ndarray]:
  """Each output of `eval_step(params, batch)` summed over padded batches of `arrays` (float64
  numpy; scalars or arrays, e.g. per-class counts). `mesh` as in `evaluate`."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  n = len(next(iter(arrays.values())))
  if mesh is None:
    mesh = sharding.replicated_mesh(params)
  if mesh is not None:
    per = mesh.shape[mesh.axis_names[0]]
    batch_size = -(-batch_size // per) * per
  totals: dict[str, np.ndarray] = {}
  for start in range(0, n, batch_size):
    batch = gather_batch(arrays, *pad_indices(np.arange(start, min(start + batch_size, n)),
                                              batch_size))
    if mesh is not None:
      batch = sharding.shard_batch(batch, mesh, axis=mesh.axis_names[0])
    for k, v in eval_step(params, batch).items():
      totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64)
  return totals


def evaluate_classes(class_step: Callable, params: Params, arrays: Mapping[str, np.ndarray],
                     batch_size: int, names: Sequence[str], mesh=None) -> tuple[dict, dict]:
  """Each class's accuracy (its recall) and examples in `arrays`, from `class_step` (a jitted
  `models.class_metrics`) summed by `evaluate_sums`: ({name: accuracy} for the classes with
  examples, {name: examples})."""
  sums = evaluate_sums(class_step, params, arrays, batch_size, mesh)
  counts = sums["class_count"]
  acc = sums["class_correct"] / np.maximum(counts, 1)
  return ({n: float(a) for n, a, k in zip(names, acc, counts) if k > 0},
          dict(zip(names, map(int, counts))))


def evaluate(eval_step: Callable, params: Params, arrays: Mapping[str, np.ndarray],
             batch_size: int, mesh=None) -> dict:
  """Sums metrics over padded batches, then divides by the count: {"loss", "accuracy", "count"}.

  With `mesh`, each batch (padded to a multiple of its size) is split over the mesh's first
  axis. Without one, the mesh that `params` are replicated over, if any
  (`sharding.replicated_mesh`), is used: otherwise each of its devices would compute every
  batch."""
  totals = {k: float(v) for k, v in evaluate_sums(eval_step, params, arrays, batch_size,
                                                  mesh).items()}
  count = max(totals.get("count", 0.0), 1.0)
  out = {"count": totals.get("count", 0.0), "loss": totals["loss_sum"] / count}
  if "correct" in totals:
    out["accuracy"] = totals["correct"] / count
  return out


# ----------------------------------------------------------------------------- checkpoints


class Checkpointer:
  """Orbax checkpoints of the TrainState plus JSON metadata (ledger, data position, metrics)."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory), options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep))

  def save(self, step: int, state: TrainState, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(jax.device_get(state)), meta=ocp.args.JsonSave(meta)),
                      force=True)
    self.manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  @staticmethod
  def any_in(directory: str) -> bool:
    """Whether `directory` holds a saved checkpoint (without creating it)."""
    return os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory))

  def read_meta(self, step: int | None = None) -> dict:
    """The JSON metadata of checkpoint `step` (default: the latest) without its state."""
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
    step = self.latest_step() if step is None else step
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, jax.device_get(template))
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta


def read_ledgers(directory: str) -> dict[str, accounting.PrivacyLedger]:
  """The privacy ledger of every run under `directory` (a training run folder, a federated run
  with one folder per strategy, or a folder of runs): {path of the run relative to `directory`
  ("." for `directory` itself): the ledger saved with its latest checkpoint}, in path order.
  A run without DP has an empty ledger."""
  if not os.path.isdir(directory):
    raise ValueError(f"no run folder at {directory!r}")
  out = {}
  for root, _, _ in os.walk(directory):
    if os.path.basename(root) == "checkpoints" and Checkpointer.any_in(root):
      meta = Checkpointer(root).read_meta()
      if "ledger" in meta:
        run = os.path.relpath(os.path.dirname(root), directory)
        out[run] = accounting.PrivacyLedger.from_json(meta["ledger"])
  return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- the loop


class StopAtStepEnd:
  """Context manager for a training loop: the first Ctrl-C (SIGINT) sets `requested` instead of
  interrupting, so the loop can finish the step it is in, save a checkpoint and stop (the
  privacy ledger then holds exactly the steps in the saved state); a second Ctrl-C interrupts at
  once. Outside the main thread, where Python does not own SIGINT, or where SIGINT is ignored
  (a job started in the background), it does nothing."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> "StopAtStepEnd":
    if threading.current_thread() is threading.main_thread():
      previous = signal.getsignal(signal.SIGINT)
      if previous not in (None, signal.SIG_IGN):
        self._previous = previous
        signal.signal(signal.SIGINT, self._handle)
    return self

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    self.requested = True
    signal.signal(signal.SIGINT, self._previous)
    print("\nstopping after this step to save a checkpoint (Ctrl-C again to stop at once)",
          file=sys.stderr, flush=True)

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
      self._previous = None

  def stop_if_requested(self, where: str, *, saved: bool, bar=None) -> None:
    """After a loop's step (its checkpoint saved when `requested`): closes the progress bar and
    raises KeyboardInterrupt saying where the loop stopped, if a stop was asked for."""
    if not self.requested:
      return
    if bar is not None:
      bar.close()
    raise KeyboardInterrupt(f"stopped at {where}; " + (
        "a checkpoint was saved: rerun the same command to resume" if saved
        else "nothing was saved (no run folder)"))


@dataclasses.dataclass
class FitResult:
  state: TrainState
  ledger: accounting.PrivacyLedger
  history: list  # metrics records written this run and before (after resume)
  dp_step_seconds: float  # median wall time of a training step after compilation


def fit(state: TrainState, *, train_step: Callable, schedule, num_steps: int,
        eval_fn: Callable[[Params], dict] | None = None,
        dp_config: DPConfig | DPFTRLConfig | DPMFConfig | None = None,
        delta: float | None = None,
        accountant: str = "pld", workdir: str | None = None,
        checkpoint_every: int | None = None, mesh=None, show_progress: bool = True,
        ledger: accounting.PrivacyLedger | None = None) -> FitResult:
  """Runs `num_steps` steps (total, counting steps already in a restored checkpoint).

  Evaluates at the end of each epoch (`schedule.steps_per_epoch`) and at the end; writes
  `metrics.jsonl` and checkpoints under `workdir` when given, and resumes from the latest
  checkpoint found there. Every DP step is recorded in the ledger right after it runs, and the
  ledger is saved with each checkpoint. Ctrl-C stops after the current step, with a checkpoint
  (`StopAtStepEnd`), and raises KeyboardInterrupt.
  """
  ledger = ledger or accounting.PrivacyLedger()
  writer = ckpt = None
  if workdir is not None:
    writer = reporting.MetricsWriter(os.path.join(workdir, "metrics.jsonl"))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    if ckpt.latest_step() is not None:
      state, meta = ckpt.restore(state)
      ledger = accounting.PrivacyLedger.from_json(meta["ledger"])
      writer.truncate_after(int(meta["step"]))
  start = int(state.step)
  if mesh is not None:
    state = sharding.replicate(state, mesh)
  spe = schedule.steps_per_epoch
  checkpoint_every = checkpoint_every or spe
  history = writer.read() if writer else []
  sums: dict[str, float] = {}
  latest: dict[str, float] = {}
  overflow_total = 0
  last_eval: dict = {}
  times = []
  bar = reporting.progress(num_steps, start) if show_progress else None

  def privacy_report():
    return ledger.report(delta, accountant) if dp_config is not None else {}

  with StopAtStepEnd() as stop:
    for step in range(start, num_steps):
      batch, overflow = schedule(step)
      overflow_total += overflow
      if mesh is not None:
        batch = sharding.shard_batch(batch, mesh)
      t0 = time.perf_counter()
      state, metrics = train_step(state, batch)
      if dp_config is not None:
        dp_config.record(ledger)
      metrics = jax.device_get(metrics)
      times.append(time.perf_counter() - t0)
      for k, v in metrics.items():
        if k in ("clip", "unclipped_fraction"):  # state-like: keep the latest value
          latest[k] = float(v)
        else:
          sums[k] = sums.get(k, 0.0) + float(v)
      done = step + 1
      if done % spe == 0 or done == num_steps:
        count = max(sums.get("count", 0.0), 1.0)
        record = {"step": done, "epoch": done / spe,
                  "train_loss": sums.get("loss_sum", 0.0) / count, "overflow": overflow_total}
        if "clipped" in sums:
          record["clipped_fraction"] = sums["clipped"] / count
          record["mean_grad_norm"] = sums["norm_sum"] / count
        record.update(latest)
        if eval_fn is not None:
          last_eval = {f"eval_{k}": v for k, v in eval_fn(state.params).items()}
          record.update(last_eval)
        rep = privacy_report()
        if rep:
          record.update({"epsilon": rep["epsilon"], "delta": rep["delta_total"]})
        history.append(record)
        if writer:
          writer.write(record)
        sums, overflow_total = {}, 0
        if bar is not None:
          bar.set_postfix({k: f"{v:.3g}" for k, v in (("loss", record["train_loss"]),
                           ("acc", last_eval.get("eval_accuracy")), ("eps", rep.get("epsilon")))
                           if v is not None})
      if ckpt is not None and (done % checkpoint_every == 0 or done == num_steps or
                               stop.requested):
        ckpt.save(done, state, {"step": done, "ledger": ledger.to_json()})
      if bar is not None:
        bar.update(1)
      if done < num_steps:
        stop.stop_if_requested(f"step {done} of {num_steps}", saved=ckpt is not None, bar=bar)
  if bar is not None:
    bar.close()
  steady = times[2:] if len(times) > 4 else times
  return FitResult(state=state, ledger=ledger, history=history,
                   dp_step_seconds=float(np.median(steady)) if steady else float("nan"))


def fit_adam_epochs(model, loss_fn: LossFn, arrays: Mapping[str, np.ndarray],
                    example_input: jax.Array, *, learning_rate: float, batch_size: int,
                    epochs: float, seed: int, show_progress: bool = True) -> Params:
  """Non-DP training of a study's model: parameters from `model.init(key(seed), example_input)`,
  Adam, shuffled epochs of `batch_size` (`EpochSchedule` seeded by `seed`) for
  int(epochs * steps per epoch) steps. Returns the trained parameters."""
  opt = optax.adam(learning_rate)
  key = jax.random.key(seed)
  params = model.init(key, example_input)["params"]
  schedule = EpochSchedule(arrays, batch_size, seed)
  result = fit(create_state(params, opt, key), train_step=make_train_step(loss_fn, opt),
               schedule=schedule, num_steps=int(epochs * schedule.steps_per_epoch),
               show_progress=show_progress)
  return result.state.params


def time_step(step_fn: Callable, state, batch, *, repeats: int = 10, warmup: int = 2) -> float:
  """Median seconds of `step_fn(state, batch)` after `warmup` calls (blocks on results)."""
  return time_interleaved({"step": lambda: step_fn(state, batch)}, repeats=repeats,
                          warmup=warmup)["step"]


def time_interleaved(calls: Mapping[str, Callable[[], object]], *, repeats: int = 10,
                     warmup: int = 2) -> dict:
  """Median seconds of each zero-argument call (blocks on results), after `warmup` calls of each,
  timed one call of each per round so that a noisy machine's drift falls on all of them alike:
  how scripts/benchmark_dp.py and benchmark_fl.py compare variants."""
  for fn in calls.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times = {k: [] for k in calls}
  for _ in range(repeats):
    for k, fn in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[k].append(time.perf_counter() - t0)
  return {k: float(np.median(v)) for k, v in times.items()}
