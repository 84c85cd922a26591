"""Config -> a privacy audit of a text classifier -> a results folder (`scripts/audit.py`).

The audit trains `num_models` classifiers on random halves of one pool of examples (real SNIPS
queries plus planted canaries), all in parallel (`shadow.train_in_parallel`), once without DP
and once per target epsilon. Every model is in turn the target and the others its shadow
models; on the target it measures:

- membership inference: LiRA (leave-one-out, Carlini et al. 2022), RMIA (leave-one-out, the
  target's non-members as its population, Zarifzadeh et al. 2024) and the loss threshold
  (Yeom et al. 2018): ROC AUC and TPR at low FPR, pooled over targets, each AUC with a BCa
  bootstrap interval over the pool's examples (`stats.bootstrap_interval`);
- an empirical epsilon lower bound (Jagielski et al. 2020) from LiRA's scores and one from
  RMIA's, each threshold chosen on the first half of the targets and the bound taken on the
  second half (estimates: pooled scores are not independent trials); and a valid one from one
  model (Steinke et al. 2023): every pool example is in a given target independently with
  probability 1/2, and the loss threshold reads that target alone, so its top-k guesses among
  the mislabeled canaries (`canaries.mislabeled`; or among all pool examples) bound epsilon
  for each target (the confidence split over the targets);
- canary exposure (Carlini et al. 2019) over the whole secret space, for canaries the target
  trained on and (as the baseline) for those it did not, and how often the secret has the
  lowest loss of all (extraction by enumerating the space);
- canary extraction by model inversion (ModIvA, Parikh et al. 2022): the secret token
  recovered from the weights, the template and the label.

The classifiers are trained from scratch on a hash vocabulary (`model.name` transformer or
bag_of_embeddings), or fine-tuned from a pretrained encoder with its own WordPiece vocabulary
(`model.name="bert"`, `data.tokenizer="pretrained"`; `model.frozen` and `model.lora_rank` pick
what is trained, as in `scripts/train.py`). Frozen parameters are the same for every model (the
checkpoint's values), so only the trained part is stacked over models and DP clips and noises
only that part. Model inversion needs the secret to be one token of the model's vocabulary,
which a hash vocabulary guarantees and WordPiece does not (it splits most numbers), so with
`data.tokenizer="pretrained"` the audit measures membership inference and exposure only.

Each privacy level's statistics are saved in `levels/<name>.npz` when it finishes; a rerun of
the same config skips the levels already there. Ctrl-C while a level trains saves its models
after the current chunk of steps (`levels/<name>.training`), and a rerun continues from there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from trustjax import data as tjdata
from trustjax import models, reporting, stats, training
from trustjax.attacks import canaries, inversion, membership, metrics, shadow
from trustjax.experiments import (checkpoint_leaves, classifier_from_config, config_changes,
                                  default_delta, frozen_names, load_datasets, lora_targets,
                                  pretrained_classifier, probe_batch)
from trustjax.privacy import accounting, sampling
from trustjax.privacy.clipping import check_rules
from trustjax.privacy.dp_sgd import DPConfig


class AuditSetup:
  """Data, canaries, model and mechanisms, validated; no files written."""

  def __init__(self, cfg: ml_collections.ConfigDict):
    self.cfg = cfg
    d, c, t = cfg.data, cfg.canaries, cfg.train
    if t.num_models < 2 or t.num_models % 2:
      raise ValueError(f"train.num_models must be even and >= 2, got {t.num_models}")
    if t.epochs <= 0 or t.batch_size <= 0:
      raise ValueError(f"train.epochs and train.batch_size must be positive, got "
                       f"{t.epochs=}, {t.batch_size=}")
    if not (t.learning_rate > 0 and t.dp_learning_rate > 0):
      raise ValueError(f"train.learning_rate and train.dp_learning_rate must be positive, got "
                       f"{t.learning_rate}, {t.dp_learning_rate}")
    if t.chunk_steps < 1 or t.model_chunk < 0:
      raise ValueError(f"train.chunk_steps must be >= 1 and train.model_chunk >= 0 (0 = "
                       f"automatic), got {t.chunk_steps}, {t.model_chunk}")
    if cfg.audit.bootstrap_resamples < 0 or cfg.audit.bootstrap_resamples == 1:
      raise ValueError(f"audit.bootstrap_resamples must be 0 (no intervals) or >= 2, got "
                       f"{cfg.audit.bootstrap_resamples}")
    check_audit_settings(cfg.audit)
    m = cfg.model
    # A vocabulary fixed without the data, so that the DP levels cover everything learned.
    if d.tokenizer == "hash":
      if m.name == "bert":
        raise ValueError("model.name='bert' reads the checkpoint's own vocabulary: set "
                         "data.tokenizer='pretrained'")
      self.tokenizer = tjdata.build_hash_tokenizer(d.vocab_size - 2)
    elif d.tokenizer == "pretrained":
      if m.name != "bert":
        raise ValueError(f"data.tokenizer='pretrained' is the vocabulary of a pretrained "
                         f"encoder: set model.name='bert' (got {m.name!r})")
      self.tokenizer = models.PretrainedTokenizer(m.pretrained_path or models.minilm_path())
    else:
      raise ValueError(f"data.tokenizer={d.tokenizer!r}: the audit uses 'hash' (models from "
                       "scratch) or 'pretrained' (model.name='bert'), vocabularies fixed "
                       "without the data, so the DP levels cover everything learned")
    self.invertible = d.tokenizer == "hash"  # every secret is one token (ModIvA's setting)
    rng = np.random.default_rng(cfg.seed)
    if d.name not in ("snips", "synthetic_nlu"):
      raise ValueError(f"unknown data.name={d.name!r}; expected snips or synthetic_nlu")
    train, self.eval_data = load_datasets(cfg)  # the training driver's loaders
    if d.pool_size:
      if d.pool_size > len(train):
        raise ValueError(f"data.pool_size={d.pool_size} exceeds the {len(train)} training "
                         "examples")
      train = train.subset(np.sort(rng.choice(len(train), d.pool_size, replace=False)))
    # canaries: one random secret each, inserted once, with a random label
    self.secrets = canaries.make_secrets(c.num, digits=c.digits, seed=cfg.seed)
    texts = canaries.fill(c.template, self.secrets)
    self.canary_labels = rng.integers(0, train.num_classes, c.num).astype(np.int32)
    self.pool, rows = canaries.insert_canaries(train, texts, self.canary_labels)
    self.canary_rows = rows[:, 0]
    words = tjdata.word_split(c.template.format(self.secrets[0]))
    if self.secrets[0] not in words:
      raise ValueError(f"canaries.template={c.template!r} must keep the secret a word of its own")
    self.secret_position = words.index(self.secrets[0])
    if self.secret_position >= d.max_length:
      raise ValueError(f"the secret is word {self.secret_position}, beyond data.max_length")
    enc = lambda texts: self.tokenizer.encode(texts, d.max_length)
    self.arrays = {"tokens": enc(self.pool.texts), "label": self.pool.labels.astype(np.int32)}
    # Mislabeled canaries for the one-run bound: pool queries given another intent at random
    # (Steinke et al. 2023's input-space canaries). The bound guesses among them only.
    if c.mislabeled < 0 or c.mislabeled > len(self.pool) - c.num:
      raise ValueError(f"canaries.mislabeled must lie in [0, {len(self.pool) - c.num}] (the "
                       f"pool's other queries), got {c.mislabeled}")
    others = np.setdiff1d(np.arange(len(self.pool)), self.canary_rows)
    self.mislabeled_rows = np.sort(rng.choice(others, c.mislabeled, replace=False))
    shift = rng.integers(1, train.num_classes, c.mislabeled)
    labels = self.arrays["label"]
    labels[self.mislabeled_rows] = (labels[self.mislabeled_rows] + shift) % train.num_classes
    # the one-run bound's canaries: the mislabeled queries, or every pool example
    self.one_run_rows = (self.mislabeled_rows if c.mislabeled
                         else np.arange(len(self.pool)))
    self.eval_arrays = {"tokens": enc(self.eval_data.texts),
                        "label": self.eval_data.labels.astype(np.int32)}
    self.canary_tokens = self.arrays["tokens"][self.canary_rows]
    # Exposure's candidates: the template filled with every secret of the space, as encoded.
    space = canaries.all_secrets(c.digits)
    space_texts = canaries.fill(c.template, space)
    longer = self.tokenizer.encode(space_texts, d.max_length + 8)
    if (longer[:, d.max_length:] != self.tokenizer.pad_id).any():
      raise ValueError(f"canaries.template={c.template!r} filled with a secret takes more than "
                       f"data.max_length={d.max_length} tokens")
    self.space_tokens = enc(space_texts)  # [secrets, length]
    where = {s: i for i, s in enumerate(space)}
    self.secret_index = np.array([where[s] for s in self.secrets])  # row in space_tokens
    assert (self.space_tokens[self.secret_index] == self.canary_tokens).all()
    if self.invertible:  # the secret as one token id (hash collisions share one)
      self.space_ids = np.array([self.tokenizer.token_id(s) for s in space], np.int32)
      self.secret_ids = self.space_ids[self.secret_index]
      self.candidate_ids = np.unique(self.space_ids)

    n = len(self.pool)
    self.is_in = shadow.membership_masks(t.num_models, n, seed=cfg.seed)
    self.members = int(self.is_in.sum(1).max())
    self.sampling_rate = t.batch_size / (n / 2)
    if not 0 < self.sampling_rate <= 1:
      raise ValueError(f"train.batch_size={t.batch_size} exceeds half the pool ({n / 2:.0f})")
    self.num_steps = max(1, round(t.epochs / self.sampling_rate))
    self.delta = cfg.dp.delta if cfg.dp.delta is not None else default_delta(n // 2)
    self.batch_size = sampling.default_max_batch_size(self.members, self.sampling_rate,
                                                      self.num_steps, multiple_of=8)
    self.num_classes = train.num_classes
    pretrained = None
    if m.name == "bert":
      self.model, pretrained = pretrained_classifier(cfg, self.tokenizer, train.num_classes)
    else:
      self.model = classifier_from_config(m, vocab_size=self.tokenizer.vocab_size,
                                          num_classes=train.num_classes, max_length=d.max_length)
    self.frozen = frozen_names(m.frozen)
    if m.lora_rank:  # LoRA: the checkpoint's weights fixed; adapters and head trained
      if m.name != "bert":
        raise ValueError(f"model.lora_rank adapts a pretrained encoder (model.name='bert'), "
                         f"got model.name={m.name!r}")
      self.frozen += checkpoint_leaves(pretrained)

    # jitted: one compilation instead of an eager dispatch per op (about 20 s for MiniLM)
    model_init = jax.jit(
        lambda key: self.model.init(key, jnp.zeros((1, d.max_length), jnp.int32))["params"])

    def full_init(key):
      params = model_init(key)
      if pretrained is not None:  # leaf by leaf: LoRA adapters keep their initial values
        params = training.merge_frozen(params, {"encoder": pretrained})
      return params

    # loss_fn and apply_fn take the whole parameters; init_fn gives the trained part.
    self.loss_fn = models.classification_loss(self.model)
    self.apply_fn = lambda p, tokens: self.model.apply({"params": p}, tokens)
    self.fixed = None  # the frozen part: one copy for every model (`shadow`'s `frozen`)
    if self.frozen:  # the checkpoint's values, or the seed's init for parts not in it
      self.fixed = training.split_frozen(full_init(jax.random.key(cfg.seed)), self.frozen)[1]
      self.init_fn = lambda key: training.split_frozen(full_init(key), self.frozen)[0]
    else:
      self.init_fn = full_init
    shapes = jax.eval_shape(self.init_fn, jax.random.key(0))
    self.trainable_parameters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    self.levels = (["nondp"] if cfg.dp.nondp else []) + [f"eps{e:g}" for e in cfg.dp.epsilons]
    if not self.levels:
      raise ValueError("nothing to audit: dp.nondp is False and dp.epsilons is empty")
    self.mechanisms = {}
    for e in cfg.dp.epsilons:
      accounting.validate(delta=self.delta, accountant=cfg.dp.accountant, target_epsilon=e)
      sigma = accounting.calibrate_noise_multiplier(
          target_epsilon=e, sampling_rate=self.sampling_rate, steps=self.num_steps,
          delta=self.delta, accountant=cfg.dp.accountant)
      self.mechanisms[f"eps{e:g}"] = DPConfig(
          l2_clip=cfg.dp.l2_clip, noise_multiplier=sigma, sampling_rate=self.sampling_rate,
          num_examples=self.members, max_batch_size=self.batch_size, method=cfg.dp.method)


def check_audit_settings(a) -> None:
  """The `audit` section's values, checked before any model trains (they are first used after
  every level is trained: a bad one would otherwise cost the whole audit's training)."""
  if not len(a.fprs) or any(not 0.0 <= f <= 1.0 for f in a.fprs):
    raise ValueError(f"audit.fprs must be false-positive rates in [0, 1], got {tuple(a.fprs)}")
  if not 0.0 < a.confidence < 1.0:
    raise ValueError(f"audit.confidence must lie in (0, 1), got {a.confidence}")
  if not a.rmia_gamma > 0:
    raise ValueError(f"audit.rmia_gamma must be positive, got {a.rmia_gamma}")
  if a.inversion_steps < 1 or a.inversion_restarts < 1 or not a.inversion_learning_rate > 0:
    raise ValueError(f"audit.inversion_steps and inversion_restarts must be >= 1 and "
                     f"inversion_learning_rate > 0, got {a.inversion_steps}, "
                     f"{a.inversion_restarts}, {a.inversion_learning_rate}")


def _optimizer(cfg, level: str) -> optax.GradientTransformation:
  lr = cfg.train.learning_rate if level == "nondp" else cfg.train.dp_learning_rate
  return optax.adam(lr)


def model_mesh(num_devices: int, num_models: int):
  """train.num_devices as a mesh over the "models" axis, or None for one device: 0 = every
  device JAX sees (on a CPU, scripts/audit.py makes one per core), at most one per model."""
  if num_devices < 0:
    raise ValueError(f"train.num_devices must be >= 0 (0 = all devices), got {num_devices}")
  n = min(num_devices or jax.device_count(), num_models)
  return shadow.model_mesh(n) if n > 1 else None


def train_level(setup: AuditSetup, level: str, *, show_progress: bool = True,
                checkpoint: str | None = None) -> dict:
  """Trains the level's models and returns its statistics (what `levels/<name>.npz` holds).
  With `checkpoint`, Ctrl-C during training saves the models there and a rerun resumes
  (`shadow.train_in_parallel`)."""
  cfg = setup.cfg
  dp_config = setup.mechanisms.get(level)
  loss_fn = setup.loss_fn
  if setup.fixed is not None:
    loss_fn = training.with_frozen(loss_fn, setup.fixed)
  if dp_config is not None:  # the layer rules hold for this model (random inputs: no privacy cost)
    check_rules(loss_fn, setup.init_fn(jax.random.key(cfg.seed)),
                probe_batch(setup.arrays, vocab_size=setup.tokenizer.vocab_size,
                            num_classes=setup.num_classes), method=dp_config.method)
  mesh = model_mesh(cfg.train.num_devices, setup.is_in.shape[0])
  t0 = time.time()
  trained = shadow.train_in_parallel(
      setup.init_fn, setup.loss_fn, _optimizer(cfg, level), setup.arrays, setup.is_in,
      num_steps=setup.num_steps, sampling_rate=setup.sampling_rate,
      batch_size=setup.batch_size, seed=cfg.seed, dp_config=dp_config,
      chunk_steps=cfg.train.chunk_steps, model_chunk=cfg.train.model_chunk,
      mesh=mesh, show_progress=show_progress, desc=f"train {level}", frozen=setup.fixed,
      checkpoint=checkpoint)
  train_seconds = time.time() - t0
  params = trained.params
  logits = shadow.logits_of_all(setup.apply_fn, params, setup.arrays["tokens"],
                                frozen=setup.fixed)
  labels = setup.arrays["label"]
  phi = np.asarray(membership.logit_confidence(logits, labels[None]))
  loss = np.asarray(optax.softmax_cross_entropy_with_integer_labels(
      jnp.asarray(logits), jnp.asarray(labels)[None]))
  correct = logits.argmax(-1) == labels[None]
  eval_logits = shadow.logits_of_all(setup.apply_fn, params, setup.eval_arrays["tokens"],
                                     frozen=setup.fixed)
  eval_acc = (eval_logits.argmax(-1) == setup.eval_arrays["label"][None]).mean(1)

  # exposure: every secret of the space in the canaries' template, scored with each one's label
  num_models, num_canaries = setup.is_in.shape[0], len(setup.secrets)
  exposure = np.zeros((num_models, num_canaries))
  first = np.zeros((num_models, num_canaries), bool)  # the secret has the lowest loss of all
  space_logits = jnp.asarray(shadow.logits_of_all(setup.apply_fn, params, setup.space_tokens,
                                                  batch_size=2048, frozen=setup.fixed))
  for c in range(num_canaries):
    closs = np.asarray(optax.softmax_cross_entropy_with_integer_labels(
        space_logits, jnp.full(space_logits.shape[:2], setup.canary_labels[c])))
    secret_idx = setup.secret_index[c]
    # the secret and any secret encoded alike (hash collisions, WordPiece's unknown token)
    own = (setup.space_tokens == setup.space_tokens[secret_idx]).all(1)
    for m in range(num_models):
      exposure[m, c] = canaries.exposure(closs[m, secret_idx], closs[m, ~own])
      first[m, c] = not (closs[m, ~own] <= closs[m, secret_idx]).any()
  stats = {"phi": phi, "loss": loss, "correct": correct, "eval_accuracy": eval_acc,
           "exposure": exposure, "ranked_first": first, "overflow": trained.overflow,
           "train_seconds": np.float64(train_seconds),
           "devices": np.int64(1 if mesh is None else mesh.size)}
  if dp_config is not None:  # what the models were trained with, whatever a rerun calibrates
    stats["noise_multiplier"] = np.float64(dp_config.noise_multiplier)
  if not setup.invertible:
    return stats

  # model inversion of each canary's secret token from every model
  pos = setup.secret_position
  hits = np.zeros((num_models, num_canaries), bool)
  bar = tqdm.tqdm(total=num_models * num_canaries, desc=f"invert {level}", mininterval=0.5,
                  disable=not show_progress)
  for m in range(num_models):
    p_m = jax.tree.map(lambda x, m=m: x[m], params)
    if setup.fixed is not None:
      p_m = training.merge_frozen(p_m, setup.fixed)
    for c in range(num_canaries):
      inv = inversion.invert_canary(
          setup.apply_fn, p_m, setup.canary_tokens[c], [pos], int(setup.canary_labels[c]),
          candidates=setup.candidate_ids, steps=cfg.audit.inversion_steps,
          learning_rate=cfg.audit.inversion_learning_rate, restarts=cfg.audit.inversion_restarts,
          seed=cfg.seed + c)
      hits[m, c] = int(inv.guess[0]) == setup.secret_ids[c]
      bar.update(1)
  bar.close()
  return {**stats, "inversion_hit": hits}


def attack_scores(setup: AuditSetup, stats: dict) -> dict[str, np.ndarray]:
  """{"lira", "rmia", "loss"}: each attack's scores [models, pool] (row t: against target t)
  from a level's saved statistics."""
  cfg = setup.cfg
  return {
      # as many "in" as "out" shadows per example (membership.balanced_shadows)
      "lira": membership.leave_one_out_lira(stats["phi"], setup.is_in, online=True,
                                            global_variance=cfg.audit.global_variance,
                                            seed=cfg.seed),
      # the label's probability, from the saved cross-entropy
      "rmia": membership.leave_one_out_rmia(np.exp(-stats["loss"].astype(np.float64)),
                                            setup.is_in, gamma=cfg.audit.rmia_gamma),
      "loss": np.asarray(membership.loss_threshold_scores(stats["loss"])),
  }


def level_metrics(setup: AuditSetup, level: str, stats: dict) -> tuple[dict, dict]:
  """The audit's numbers for one level (see the module docstring), and `attack_scores`."""
  cfg, is_in = setup.cfg, setup.is_in
  m = is_in.shape[0]
  scores = attack_scores(setup, stats)
  out = {"level": level, "models": m, "pool": int(is_in.shape[1]), "steps": setup.num_steps,
         "train_seconds": float(stats["train_seconds"]),
         "devices": int(stats["devices"]) if "devices" in stats else None,  # older runs: unsaved
         "member_accuracy": float(stats["correct"][is_in].mean()),
         "nonmember_accuracy": float(stats["correct"][~is_in].mean()),
         "eval_accuracy": float(np.mean(stats["eval_accuracy"])),
         "overflow": int(np.sum(stats["overflow"]))}
  for name, s in scores.items():
    ok = np.isfinite(s)  # NaN: LiRA or RMIA lacked the shadow models the example needs
    out[f"{name}_auc"] = metrics.roc_auc(is_in[ok], s[ok])
    for f in cfg.audit.fprs:
      out[f"{name}_tpr@{f:g}"] = metrics.tpr_at_fpr(is_in[ok], s[ok], f)
  out.update(auc_intervals(is_in, scores, cfg.audit.bootstrap_resamples, cfg.audit.confidence,
                           seed=cfg.seed))
  half = m // 2
  for name, key in (("lira", "epsilon_lower_bound"), ("rmia", "rmia_epsilon_lower_bound")):
    s = scores[name]
    sel, held = np.isfinite(s[:half]), np.isfinite(s[half:])
    thr = metrics.best_threshold(is_in[:half][sel], s[:half][sel], delta=setup.delta,
                                 confidence=cfg.audit.confidence)
    out[key] = metrics.empirical_epsilon_lower_bound(
        is_in[half:][held], s[half:][held], delta=setup.delta, confidence=cfg.audit.confidence,
        threshold=thr)
  # LiRA's and RMIA's scores read the other models, whose training sets were drawn together
  # with the target's (every example in exactly half), so only the loss qualifies here
  confidence = 1.0 - (1.0 - cfg.audit.confidence) / m
  rows = setup.one_run_rows
  out["one_run_epsilon_lower_bound"] = max(
      metrics.one_run_epsilon_lower_bound(is_in[t, rows], scores["loss"][t, rows],
                                          delta=setup.delta, confidence=confidence)
      for t in range(m))
  cin = is_in[:, setup.canary_rows]
  out["exposure_in"] = float(stats["exposure"][cin].mean())
  out["exposure_out"] = float(stats["exposure"][~cin].mean())
  out["exposure_max_bits"] = float(np.log2(len(setup.space_tokens)))
  out["ranked_first_in"] = float(stats["ranked_first"][cin].mean())
  out["ranked_first_out"] = float(stats["ranked_first"][~cin].mean())
  hits = stats.get("inversion_hit")  # None: the secrets are not single tokens (WordPiece)
  out["inversion_in"] = None if hits is None else float(hits[cin].mean())
  out["inversion_out"] = None if hits is None else float(hits[~cin].mean())
  dp = setup.mechanisms.get(level)
  if dp is not None:
    if "noise_multiplier" in stats:  # the saved level's own noise (older runs did not save it)
      dp = dataclasses.replace(dp, noise_multiplier=float(stats["noise_multiplier"]))
    ledger = shadow.ledger_for(dp, setup.num_steps)
    rep = ledger.report(setup.delta, cfg.dp.accountant)
    out.update(epsilon=rep["epsilon"], delta=rep["delta_total"],
               noise_multiplier=dp.noise_multiplier, l2_clip=dp.l2_clip)
  else:
    out.update(epsilon=None, delta=None)  # no guarantee (JSON has no infinity)
  return out, scores


def auc_intervals(is_in: np.ndarray, scores: dict[str, np.ndarray], num_resamples: int,
                  confidence: float, seed: int = 0) -> dict:
  """{"<name>_auc_low", "<name>_auc_high"} per attack in `scores` ([models, pool] arrays):
  BCa bootstrap intervals of the pooled AUCs ({} when num_resamples is 0), all from the same
  resamples. The unit resampled is a pool example with its scores under every model
  (non-finite scores are left out as in the AUC), since one example's scores across models are
  not independent; the models themselves are not resampled, so the interval leaves out their
  variation."""
  if not num_resamples:
    return {}
  cols = np.broadcast_to(np.arange(is_in.shape[1]), is_in.shape)
  aucs = []
  for s in scores.values():
    ok = np.isfinite(s)
    aucs.append((stats.weighted_auc(is_in[ok], s[ok]), jnp.asarray(cols[ok])))
  every = lambda w: jnp.stack([auc(w[c]) for auc, c in aucs])
  got = stats.bootstrap_interval(every, is_in.shape[1], rng=seed, num_resamples=num_resamples,
                                 confidence=confidence)
  out = {}
  for i, name in enumerate(scores):
    out[f"{name}_auc_low"], out[f"{name}_auc_high"] = float(got.low[i]), float(got.high[i])
  return out


def _plot_roc(curves: dict, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(5.2, 4.6))
  styles = {"lira": ("-", "LiRA"), "rmia": ("-.", "RMIA"), "loss": ("--", "loss threshold")}
  for i, (level, (is_in, scores)) in enumerate(curves.items()):
    for name, s in scores.items():
      ok = np.isfinite(s)
      f, t, _ = metrics.roc_curve(is_in[ok], s[ok])
      ls, label = styles[name]
      ax.plot(f, t, color=f"C{i}", ls=ls, label=f"{level} {label}")
  grid = np.logspace(-4, 0, 50)
  ax.plot(grid, grid, color="gray", lw=0.8, ls=":", label="chance")
  ax.set(xscale="log", yscale="log", xlim=(1e-4, 1), ylim=(1e-4, 1),
         xlabel="false positive rate", ylabel="true positive rate",
         title="Membership inference (pooled over targets)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  reporting.save_figure(fig, path)


# A rerun may add or drop privacy levels, change where results go, and change what only sets the
# speed (devices, chunking: the same models up to float rounding, tests/attacks/test_shadow.py);
# levels already saved are reused, so anything else that shapes them must match.
# (the bootstrap and RMIA only read the saved statistics)
_RESUMABLE_CHANGES = {"dp.epsilons", "dp.nondp", "results_dir", "train.num_devices",
                      "train.model_chunk", "train.chunk_steps", "audit.bootstrap_resamples",
                      "audit.rmia_gamma"}


def run(cfg: ml_collections.ConfigDict, *, show_progress: bool = True) -> dict:
  """Runs the audit per `cfg` and writes results/<run_name>/. Returns the summary."""
  setup = AuditSetup(cfg)  # raises on bad input before anything is written
  workdir = os.path.join(cfg.results_dir, cfg.run_name)
  os.makedirs(os.path.join(workdir, "levels"), exist_ok=True)
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  cfg_path = os.path.join(workdir, "config.json")
  stored = json.loads(cfg.to_json_best_effort())
  if os.path.exists(cfg_path):
    # fields added to the code since the run began count as unchanged at their defaults
    changed = config_changes(cfg_path, cfg, _RESUMABLE_CHANGES, default_config())
    if changed:
      raise ValueError(f"cannot resume the audit in {workdir}: its config differs in {changed}; "
                       "pick another run_name or delete the folder")
  reporting.write_json(cfg_path, stored)
  rows, curves = [], {}
  for level in setup.levels:
    path = os.path.join(workdir, "levels", f"{level}.npz")
    if os.path.exists(path):
      with np.load(path) as z:
        stats = {k: z[k] for k in z.files}
    else:
      partial = os.path.join(workdir, "levels", f"{level}.training")  # Ctrl-C's checkpoint
      stats = train_level(setup, level, show_progress=show_progress, checkpoint=partial)
      np.savez(path + ".tmp.npz", **stats)
      os.replace(path + ".tmp.npz", path)
      if os.path.exists(partial):
        os.remove(partial)
    row, scores = level_metrics(setup, level, stats)
    rows.append(row)
    curves[level] = (setup.is_in, scores)
  summary = {"levels": rows, "delta": setup.delta, "sampling_rate": setup.sampling_rate,
             "batch_size_padded": setup.batch_size, "canaries": len(setup.secrets),
             "mislabeled": len(setup.mislabeled_rows),
             "secret_space": len(setup.space_tokens),
             "trainable_parameters": setup.trainable_parameters,
             "backend": jax.default_backend()}
  reporting.write_json(os.path.join(workdir, "summary.json"), summary)
  _plot_roc(curves, os.path.join(workdir, "plots", "roc.png"))
  with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
    f.write(report(cfg, summary))
  return summary


def _with_interval(r: dict, key: str) -> str | float:
  if f"{key}_low" not in r:
    return r[key]
  return f"{r[key]:.4f} ({r[f'{key}_low']:.3f}-{r[f'{key}_high']:.3f})"


def report_table(summary: dict, fprs) -> str:
  cols = (["level", "epsilon", "eval acc", "member acc", "LiRA AUC"]
          + [f"LiRA TPR@{f:g}" for f in fprs] + ["RMIA AUC"] + [f"RMIA TPR@{f:g}" for f in fprs]
          + ["loss AUC"] + [f"loss TPR@{f:g}" for f in fprs]
          + ["epsilon lower bound (LiRA / RMIA / one run)", "exposure in / out (bits)",
             "ranked first in / out", "inverted in / out"])
  rows = []
  for r in summary["levels"]:
    eps = "none" if r["epsilon"] is None else r["epsilon"]
    rows.append([r["level"], eps, r["eval_accuracy"], r["member_accuracy"],
                 _with_interval(r, "lira_auc")]
                + [r[f"lira_tpr@{f:g}"] for f in fprs] + [_with_interval(r, "rmia_auc")]
                + [r[f"rmia_tpr@{f:g}"] for f in fprs]
                + [_with_interval(r, "loss_auc")] + [r[f"loss_tpr@{f:g}"] for f in fprs]
                + [f"{r['epsilon_lower_bound']:.4g} / {r['rmia_epsilon_lower_bound']:.4g} / "
                   f"{r['one_run_epsilon_lower_bound']:.4g}",
                   f"{r['exposure_in']:.2f} / {r['exposure_out']:.2f}",
                   f"{r['ranked_first_in']:.3f} / {r['ranked_first_out']:.3f}",
                   "n/a" if r["inversion_in"] is None
                   else f"{r['inversion_in']:.3f} / {r['inversion_out']:.3f}"])
  return reporting.markdown_table(cols, rows)


def _model_description(cfg) -> str:
  m = cfg.model
  if m.name != "bert":
    parts = [f"{m.name} from scratch on a hash vocabulary of {cfg.data.vocab_size} ids"]
  else:
    parts = [f"fine-tuned from {m.pretrained_path or 'all-MiniLM-L6-v2'}"]
  if m.lora_rank:
    parts.append(f"LoRA rank {m.lora_rank} (alpha {m.lora_alpha:g}) on "
                 f"{', '.join(lora_targets(m))}, checkpoint weights frozen")
  if m.frozen:
    parts.append(f"frozen: {m.frozen}")
  if m.name == "bert":
    parts.append("no model inversion (WordPiece splits secrets into several tokens)")
  return "; ".join(parts)


def report(cfg, summary: dict) -> str:
  first = summary["levels"][0]
  return "\n".join([
      f"# Privacy audit {cfg.run_name}", "",
      f"Command: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`", "",
      f"{first['models']} models per level, each trained on a random half of {first['pool']} "
      f"examples ({summary['canaries']} of them canaries"
      + (f", {summary['mislabeled']} queries mislabeled" if summary["mislabeled"] else "")
      + f") for {first['steps']} steps, Poisson "
      f"rate {summary['sampling_rate']:.4g}; delta = {summary['delta']:g}. Epsilon lower bounds "
      f"at confidence {cfg.audit.confidence}: LiRA's and RMIA's with the threshold from targets "
      f"1..{first['models'] // 2} and the bound on the rest; one run: each target's loss alone "
      f"(Steinke et al. 2023), guessing among "
      f"{'the mislabeled queries' if summary['mislabeled'] else 'all pool examples'}, the "
      f"confidence split over the {first['models']} targets. "
      f"Exposure out of {first['exposure_max_bits']:.2f} bits."
      + (f" AUCs with {cfg.audit.confidence:.0%} BCa bootstrap intervals over the pool's "
         f"examples ({cfg.audit.bootstrap_resamples} resamples; the models are not resampled)."
         if cfg.audit.bootstrap_resamples else ""), "",
      f"Model: {_model_description(cfg)}; {summary['trainable_parameters']:,} trained "
      "parameters per model.", "",
      report_table(summary, cfg.audit.fprs), "", "![ROC](plots/roc.png)", ""])


def default_config() -> ml_collections.ConfigDict:
  """Every field the audit reads; configs/audit_*.py start from this."""
  from ml_collections import config_dict  # pylint: disable=import-outside-toplevel

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.results_dir = "results"
  c.run_name = "audit"
  c.data = ml_collections.ConfigDict()
  c.data.name = "snips"  # snips | synthetic_nlu
  c.data.data_dir = ""  # SNIPS folder
  c.data.pool_size = 2000  # examples drawn from the training split (0 = all)
  c.data.num_examples = 4000  # synthetic_nlu corpus size
  c.data.num_devices = 200  # synthetic_nlu devices
  c.data.eval_fraction = 0.1  # synthetic_nlu held-out fraction (SNIPS has its validation split)
  # fixed without the data: hash (models from scratch) | pretrained (model.name="bert")
  c.data.tokenizer = "hash"
  c.data.vocab_size = 8192  # hash buckets + pad + OOV
  c.data.max_length = 32
  c.canaries = ml_collections.ConfigDict()
  c.canaries.num = 20  # canaries planted in the pool, each once, each with a random label
  c.canaries.digits = 4  # secret space 10**digits
  c.canaries.template = "my pin code is {}"
  c.canaries.mislabeled = 0  # pool queries given a wrong intent: the one-run bound's canaries
  c.model = ml_collections.ConfigDict()
  c.model.name = "bag_of_embeddings"  # bag_of_embeddings | transformer | bert (pretrained)
  c.model.pretrained_path = ""  # bert: a Hugging Face BERT folder ("" = all-MiniLM-L6-v2)
  c.model.frozen = ""  # parameter path prefixes held fixed, e.g. "encoder" (a linear probe)
  c.model.lora_rank = 0  # bert: LoRA adapters on lora_targets (checkpoint weights frozen)
  c.model.lora_alpha = 8.0
  c.model.lora_targets = "query,value"  # any of query, key, value, out, intermediate, output
  c.model.embed_dim = 64
  c.model.num_layers = 1
  c.model.num_heads = 4
  c.model.mlp_dim = 128
  c.train = ml_collections.ConfigDict()
  c.train.num_models = 32  # even; each example is in exactly half of them
  c.train.batch_size = 64  # expected batch (Poisson rate = batch / (pool / 2))
  c.train.epochs = 30.0
  c.train.learning_rate = 3e-3  # Adam, non-DP
  c.train.dp_learning_rate = 1e-2  # Adam, DP levels
  c.train.chunk_steps = 100  # steps per compiled call
  c.train.model_chunk = 0  # models per vmap (0 = all on an accelerator, 2 on a CPU), per device
  c.train.num_devices = 0  # devices the models are sharded over (0 = all, one per core on a CPU)
  c.dp = ml_collections.ConfigDict()
  c.dp.nondp = True  # audit a non-DP level too
  c.dp.epsilons = (8.0, 1.0)  # one DP level per target epsilon
  c.dp.l2_clip = 1.0
  c.dp.delta = config_dict.placeholder(float)  # None = largest power of ten below 1/(pool/2)
  c.dp.accountant = "pld"
  c.dp.method = "auto"
  c.audit = ml_collections.ConfigDict()
  c.audit.fprs = (0.01, 0.001)
  c.audit.confidence = 0.95  # of the epsilon lower bound and of the AUCs' bootstrap intervals
  c.audit.bootstrap_resamples = 2000  # over the pool's examples; 0 = no AUC intervals
  c.audit.global_variance = True  # LiRA's pooled variance (recommended below 64 shadows)
  c.audit.rmia_gamma = 1.0  # RMIA's threshold on its pairwise likelihood ratio (paper: >= 1)
  c.audit.inversion_steps = 300
  c.audit.inversion_learning_rate = 0.3
  c.audit.inversion_restarts = 4
  return c
