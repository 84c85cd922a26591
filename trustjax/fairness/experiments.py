"""Config -> unintended identity bias of a toxicity classifier -> a results folder
(`scripts/bias.py`).

After Dixon et al. (AIES 2018): a classifier is trained on real Wikipedia talk-page comments
with a toxicity label, then scored on the templated madlibs sentences, where every identity term
appears equally often in toxic and non-toxic sentences. Any gap between identities is therefore
bias the model learned. Each training set in `data.train_sets` ("nonfuzzed": the comments as
written; "fuzzed": the same comments with identity terms swapped at random, Dixon et al.'s
counterfactual copy) is trained with every seed in `seeds`; per identity term the driver reports
the bias AUCs of Borkan et al. (2019) and the accumulated prediction sensitivity of P(toxic) to
the identity term's tokens (`sensitivity.embedding_prediction_sensitivity`: the derivative when
their embeddings are scaled, averaged over the term's sentences), and over identities the
generalized means of the AUCs and the threshold gaps (demographic parity and equalized odds
differences).

Mitigations. With `postprocess` (constraints of `postprocessing.fit_thresholds`), each model's
scores are post-processed (Hardt et al. 2016): per-identity randomised thresholds are fitted on
a fixed random half of the sentences that name an identity (each (term, label) cell halved),
and the other half reports accuracy and the demographic parity and equalized odds differences,
in expectation over the randomisation, beside the plain threshold on that half. With
`inprocess` (constraints of `reductions.exponentiated_gradient`; the "minilm" model only, whose
inputs are features), logistic regressions on each training set's comment embeddings are
trained without and with the constraint over the comments' identity groups (Agarwal et al.
2018; `comment_groups`; with `inprocess_grid_limits`, also by grid search), and measured on the
same held-out half beside the unconstrained one post-processed. With `adversarial`
(constraints of `adversarial.fit_adversarial`), the same model class is trained against an
adversary of those groups (Zhang et al. 2018), once per seed, beside the same training without
the adversary.

The classifier (`model.name`) is a token model trained from scratch on a hash vocabulary
("bag_of_embeddings", "transformer") or an MLP head on frozen all-MiniLM-L6-v2 sentence
embeddings ("minilm"), whose sensitivity is taken through the encoder's word-piece embeddings.
`data.eval_per_identity`, `data.max_train` and `aps_per_identity` subsample for smaller runs.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from trustjax import data as tjdata
from trustjax import models, reporting, training
from trustjax.data import toxicity
from trustjax.experiments import classifier_from_config
from trustjax.fairness import (adversarial, group, postprocessing, preprocessing, reductions,
                               sensitivity)
from trustjax.stats import mean_and_sd, roc_auc

TRAIN_SETS = ("nonfuzzed", "fuzzed")


MODELS = ("bag_of_embeddings", "transformer", "minilm")


def _check(cfg) -> None:
  if not cfg.data.data_dir:
    raise ValueError("data.data_dir is required (a copy of Dixon et al.'s eval_datasets folder)")
  bad = [s for s in cfg.data.train_sets if s not in TRAIN_SETS]
  if bad or not cfg.data.train_sets:
    raise ValueError(f"data.train_sets must list some of {TRAIN_SETS}, got "
                     f"{tuple(cfg.data.train_sets)}")
  if cfg.model.name not in MODELS:
    raise ValueError(f"model.name must be one of {MODELS}, got {cfg.model.name!r}")
  if not cfg.seeds:
    raise ValueError("seeds is empty")
  if cfg.train.epochs <= 0 or cfg.train.batch_size <= 0 or not cfg.train.learning_rate > 0:
    raise ValueError(f"train.epochs, train.batch_size and train.learning_rate must be positive, "
                     f"got {cfg.train.epochs=}, {cfg.train.batch_size=}, "
                     f"{cfg.train.learning_rate=}")
  if not 0.0 < cfg.threshold < 1.0:
    raise ValueError(f"threshold must lie in (0, 1), got {cfg.threshold=}")
  bad = [c for c in cfg.postprocess if c not in postprocessing.CONSTRAINTS]
  if bad:
    raise ValueError(f"postprocess must list some of {postprocessing.CONSTRAINTS}, got {bad}")
  for field, allowed in (("inprocess", reductions.CONSTRAINTS),
                         ("adversarial", adversarial.CONSTRAINTS)):
    bad = [c for c in cfg[field] if c not in allowed]
    if bad:
      raise ValueError(f"{field} must list some of {allowed}, got {bad}")
    if cfg[field] and cfg.model.name != "minilm":
      raise ValueError(f"{field} trains on sentence embeddings: it needs model.name='minilm', "
                       f"got {cfg.model.name!r}")
  if not (cfg.adversarial_alpha >= 0 and cfg.adversarial_epochs >= 1):
    raise ValueError(f"adversarial_alpha must be >= 0 and adversarial_epochs >= 1, got "
                     f"{cfg.adversarial_alpha=}, {cfg.adversarial_epochs=}")
  if cfg.inprocess_learner not in ("logistic_regression", "mlp"):
    raise ValueError(f"inprocess_learner must be 'logistic_regression' or 'mlp', got "
                     f"{cfg.inprocess_learner!r}")
  if not all(v > 0 for v in cfg.inprocess_grid_limits):
    raise ValueError(f"inprocess_grid_limits must be positive, got {cfg.inprocess_grid_limits=}")
  if not (cfg.inprocess_eps > 0 and cfg.inprocess_l2 > 0 and cfg.inprocess_min_group >= 1
          and cfg.inprocess_steps >= 1):
    raise ValueError(f"inprocess_eps, inprocess_l2, inprocess_min_group and inprocess_steps "
                     f"must be positive, got {cfg.inprocess_eps=}, {cfg.inprocess_l2=}, "
                     f"{cfg.inprocess_min_group=}, {cfg.inprocess_steps=}")
  if (cfg.postprocess or cfg.inprocess or cfg.adversarial) and cfg.data.eval_per_identity == 1:
    raise ValueError("postprocess, inprocess and adversarial halve each (identity term, label) "
                     "cell: they need data.eval_per_identity = 0 (all) or >= 2, got 1")
  for k, v in (("data.eval_per_identity", cfg.data.eval_per_identity),
               ("data.max_train", cfg.data.max_train), ("aps_per_identity", cfg.aps_per_identity)):
    if v < 0:
      raise ValueError(f"{k} must be >= 0 (0 = all), got {v}")


def _terms(identities: list) -> np.ndarray:
  """Each sentence's identity term as a string array, "" for none."""
  return np.array(["" if i is None else i for i in identities])


def per_identity_sample(identities: list, labels: np.ndarray, k: int,
                        seed: int = 0) -> np.ndarray:
  """Sorted indices of at most k sentences per (identity term, label), sentences without a
  term counting as one more term, drawn with a fixed seed; all indices when k = 0. Both labels
  stay in every subgroup, so its AUCs are defined."""
  if k == 0:
    return np.arange(len(identities))
  rng = np.random.default_rng(seed)
  ident = _terms(identities)
  out = []
  for term in sorted(set(ident)):
    for label in (0, 1):
      rows = np.flatnonzero((ident == term) & (labels == label))
      out.append(rng.choice(rows, size=min(k, len(rows)), replace=False))
  return np.sort(np.concatenate(out))


class Inputs(NamedTuple):
  """What the classifiers of one study read: eval inputs, a training-set encoder, and the
  tokens and protected positions of the sentences whose prediction sensitivity is measured."""
  eval_inputs: np.ndarray  # int tokens [n, L] or float features [n, dim]
  encode_train: Callable[[Sequence[str]], np.ndarray]
  aps_tokens: np.ndarray  # int [m, L']
  aps_protected: np.ndarray  # bool [m, L']
  vocab_size: int
  encoder: object = None  # models.SentenceEncoder for "minilm"


def study_inputs(cfg, texts: Sequence[str], identities: list, aps_idx: np.ndarray) -> Inputs:
  """Token ids (hash vocabulary) for the token models; frozen all-MiniLM-L6-v2 sentence
  embeddings (`models.load_bert`) for "minilm", whose sensitivity is taken through the encoder."""
  aps_texts = [texts[i] for i in aps_idx]
  aps_ident = [identities[i] for i in aps_idx]
  terms = sorted({t for t in identities if t is not None})
  if cfg.model.name == "minilm":
    enc = models.load_bert(batch_size=256)
    ids, _ = enc.tokenize(aps_texts)
    term_ids = {}
    for t in terms:  # the term's word pieces, without [CLS] and [SEP]
      t_ids, t_mask = enc.tokenize([t])
      term_ids[t] = list(t_ids[0, 1:int(t_mask[0].sum()) - 1])
    return Inputs(enc.encode(texts), enc.encode, ids,
                  protected_positions(ids, aps_ident, term_ids), 0, enc)
  tok = tjdata.build_hash_tokenizer(cfg.data.vocab_size - 2)
  tokens = tok.encode(texts, cfg.data.max_length)
  term_ids = {t: [tok.token_id(w) for w in t.split()] for t in terms}
  return Inputs(tokens, lambda x: tok.encode(x, cfg.data.max_length), tokens[aps_idx],
                protected_positions(tokens[aps_idx], aps_ident, term_ids), tok.vocab_size)


def train_and_score(cfg, arrays: dict, inputs: Inputs, seed: int, *,
                    show_progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Trains the classifier on `arrays` ("inputs", "label"; Adam, shuffled epochs) and returns
  P(toxic) on `inputs.eval_inputs` and the prediction sensitivity of P(toxic) to the protected
  tokens of `inputs.aps_tokens` (`sensitivity.embedding_prediction_sensitivity`; for "minilm"
  through the frozen encoder and the trained head)."""
  if cfg.model.name == "minilm":
    model = models.MLPClassifier(hidden=(cfg.model.mlp_dim,), num_classes=2)
  else:
    model = classifier_from_config(cfg.model, vocab_size=inputs.vocab_size, num_classes=2,
                                   max_length=cfg.data.max_length)
  head = training.fit_adam_epochs(
      model, models.classification_loss(model, "inputs"), arrays,
      jnp.asarray(arrays["inputs"][:1]), learning_rate=cfg.train.learning_rate,
      batch_size=cfg.train.batch_size, epochs=cfg.train.epochs, seed=seed,
      show_progress=show_progress)
  prob = jax.jit(lambda p, x: jax.nn.softmax(model.apply({"params": p}, x))[:, 1])
  # Chunks of one shape (the last one padded), so the scoring compiles once.
  chunk = min(4096, len(inputs.eval_inputs))
  scores = np.concatenate([np.asarray(prob(head, jnp.asarray(b["inputs"])))[b["mask"]]
                           for b in tjdata.padded_batches({"inputs": inputs.eval_inputs}, chunk)])
  if inputs.encoder is not None:  # the encoder's weights are an argument, not a constant
    enc = inputs.encoder

    def apply_fn(p, t):
      m = t != 0  # [PAD] is id 0 in BERT vocabularies
      e = models.mean_pool(enc.model.apply({"params": p[0]}, t, m), m, normalize=True)
      return model.apply({"params": p[1]}, e)
    params = (enc.params, head)
  else:
    apply_fn = lambda p, t: model.apply({"params": p}, t)
    params = head
  ps = jax.jit(lambda p, t, m: sensitivity.embedding_prediction_sensitivity(
      apply_fn, p, t, m, jnp.array([0.0, 1.0])))
  if not len(inputs.aps_tokens):
    return scores, np.zeros(0, np.float32)
  aps = [np.asarray(ps(params, jnp.asarray(b["tokens"]), jnp.asarray(b["protected"])))[b["mask"]]
         for b in tjdata.padded_batches({"tokens": inputs.aps_tokens,
                                         "protected": inputs.aps_protected}, 256)]
  return scores, np.concatenate(aps)  # batches of one shape: one compilation


def protected_positions(tokens: np.ndarray, identities: list,
                        term_ids: dict[str, Sequence[int]]) -> np.ndarray:
  """bool, tokens' shape: the positions holding a token of each sentence's identity term
  (`term_ids`: term -> its token ids)."""
  out = np.zeros(tokens.shape, bool)
  ident = _terms(identities)
  for term in sorted(set(ident) - {""}):
    rows = ident == term
    out[rows] = np.isin(tokens[rows], list(term_ids[term]))
  return out


def bias_metrics(y: np.ndarray, scores: np.ndarray, identities: list, threshold: float,
                 p: float, aps: np.ndarray | None = None) -> dict:
  """Overall AUC, per-identity bias AUCs, their generalized means, and threshold gaps; with
  `aps` (each sentence's prediction sensitivity to its identity term, NaN where not
  measured), its mean over the sentences with a term ("aps") and per identity."""
  ident = _terms(identities)
  terms = sorted(set(ident) - {""})
  per = {t: {"subgroup_auc": group.subgroup_auc(y, scores, ident == t),
             "bpsn_auc": group.bpsn_auc(y, scores, ident == t),
             "bnsp_auc": group.bnsp_auc(y, scores, ident == t)} for t in terms}
  if aps is not None:  # NaN marks sentences outside the sensitivity sample
    for t in terms:
      per[t]["aps"] = float(np.nanmean(aps[ident == t]))
  out = {"overall_auc": roc_auc(y, scores), "per_identity": per}
  if aps is not None:
    out["aps"] = float(np.nanmean(aps[ident != ""]))
  for k in ("subgroup_auc", "bpsn_auc", "bnsp_auc"):
    out[f"mean_{k}"] = group.generalized_mean_bias([v[k] for v in per.values()], p=p)
  has = ident != ""
  pred = (scores > threshold).astype(int)
  out["demographic_parity_difference"] = group.demographic_parity_difference(
      y[has], pred[has], sensitive_features=ident[has])
  out["equalized_odds_difference"] = group.equalized_odds_difference(
      y[has], pred[has], sensitive_features=ident[has])
  out["accuracy"] = float((pred == y).mean())
  return out


def fit_half(identities: list, labels: np.ndarray, seed: int = 0) -> np.ndarray:
  """bool [n]: a fixed random half of each (identity term, label) cell of the sentences that
  name a term (the rounded-down half), on which post-processing is fitted; the rest of those
  sentences evaluate it."""
  rng = np.random.default_rng(seed)
  ident = _terms(identities)
  out = np.zeros(len(ident), bool)
  for term in sorted(set(ident) - {""}):
    for label in (0, 1):
      rows = np.flatnonzero((ident == term) & (labels == label))
      out[rng.permutation(rows)[:len(rows) // 2]] = True
  return out


_HELD_KEYS = ("accuracy", "demographic_parity_difference", "equalized_odds_difference")


class _Split(NamedTuple):
  """The sentences' terms and the post-processing halves of those that name one."""
  terms: np.ndarray  # str [n], "" for none
  fit: np.ndarray  # bool [n] `fit_half`
  held: np.ndarray  # bool [n] the other sentences with a term


def _split(identities: list, y: np.ndarray) -> _Split:
  terms, fit = _terms(identities), fit_half(identities, y)
  return _Split(terms, fit, (terms != "") & ~fit)


def _held_rates(y: np.ndarray, split: _Split, prob: np.ndarray) -> dict:
  """`postprocessing.expected_rates` on the held-out half, from its P(y_hat = 1)."""
  return postprocessing.expected_rates(y[split.held], prob,
                                       sensitive_features=split.terms[split.held])


def _post_processed(y: np.ndarray, split: _Split, fit_scores: np.ndarray,
                    held_scores: np.ndarray, constraint: str):
  """Per-term thresholds fitted on the fit half's scores; the rule and its held-out rates."""
  rule = postprocessing.fit_thresholds(y[split.fit], fit_scores,
                                       sensitive_features=split.terms[split.fit],
                                       constraint=constraint)
  return rule, _held_rates(y, split, postprocessing.threshold_probabilities(
      rule, held_scores, sensitive_features=split.terms[split.held]))


def postprocess_metrics(y: np.ndarray, scores: np.ndarray, identities: list, threshold: float,
                        constraints) -> dict:
  """Threshold post-processing per identity term (`postprocessing.fit_thresholds`, accuracy
  objective) fitted on `fit_half` and measured on the other half of the sentences with a term:
  "heldout_{accuracy,demographic_parity_difference,equalized_odds_difference}" for the plain
  threshold and "{constraint}_{...}" for each constraint (expected values), and
  "postprocess_rates": each rule's per-identity held-out TPR and FPR ("groups" names them)."""
  split = _split(identities, y)
  plain = _held_rates(y, split, (scores[split.held] > threshold).astype(np.float64))
  out = {f"heldout_{k}": plain[k] for k in _HELD_KEYS}
  rates = {"groups": [str(g) for g in plain["groups"]],
           "heldout": {k: plain[k].tolist() for k in ("tpr", "fpr")}}
  for c in constraints:
    rule, r = _post_processed(y, split, scores[split.fit], scores[split.held], c)
    out.update({f"{c}_{k}": r[k] for k in _HELD_KEYS})
    out[f"{c}_fit_accuracy"] = rule.objective_value
    rates[c] = {k: r[k].tolist() for k in ("tpr", "fpr")}
  out["postprocess_rates"] = rates
  return out


def mentioned_terms(texts: Sequence[str]) -> list[list[str]]:
  """The identity terms (`toxicity.IDENTITY_TERMS`) each text mentions as whole words, two-word
  terms first and taken out of the text, so "african american" is not also "american"."""
  pats = [(t, re.compile(r"\b" + re.escape(t) + r"\b")) for t in toxicity.IDENTITY_TERMS]
  out = []
  for text in texts:
    text, found = text.lower(), []
    for term, pat in pats:
      if pat.search(text):
        found.append(term)
        text = pat.sub(" ", text)
    out.append(found)
  return out


def comment_groups(texts: Sequence[str], labels: np.ndarray, min_count: int) -> np.ndarray:
  """str [n]: each training comment's group for in-processing: of the terms it mentions, the
  one mentioned by most comments among those with at least `min_count` toxic and `min_count`
  non-toxic comments (and keeps that many after the assignment); "other identity" when it
  mentions only other terms, "none" when none. "other identity" joins "none" if it lacks
  either label."""
  terms = mentioned_terms(texts)
  count: dict[str, list[int]] = {}
  for found, label in zip(terms, labels):
    for t in found:
      count.setdefault(t, [0, 0])[int(label)] += 1
  kept = sorted((t for t, c in count.items() if min(c) >= min_count), key=lambda t: -sum(count[t]))
  rank = {t: i for i, t in enumerate(kept)}
  out = np.array(["none"] * len(terms), dtype=object)
  for i, found in enumerate(terms):
    ranked = sorted((rank[t], t) for t in found if t in rank)
    out[i] = ranked[0][1] if ranked else ("other identity" if found else "none")
  for t in kept:  # a term left with too few of either label (its comments went to commoner
    rows = out == t  # terms) joins "other identity"
    if min(int((labels[rows] == 0).sum()), int((labels[rows] == 1).sum())) < min_count:
      out[rows] = "other identity"
  other = out == "other identity"
  if other.any() and len(set(labels[other].tolist())) < 2:
    out[other] = "none"
  return out.astype(str)


def inprocess_learner(cfg):
  """The in-processing model (`cfg.inprocess_learner`) as a `reductions.Learner` and a score
  function (params, x) -> float64 [n], positive where it predicts toxic."""
  if cfg.inprocess_learner == "logistic_regression":
    learner = reductions.logistic_regression(l2=cfg.inprocess_l2)
    return learner, lambda p, x: np.asarray(x, np.float64) @ np.asarray(p)[:-1] + float(p[-1])
  model = models.MLPClassifier(hidden=(cfg.model.mlp_dim,), num_classes=2)
  learner = reductions.flax_learner(model, steps=cfg.inprocess_steps,
                                    learning_rate=cfg.train.learning_rate)
  logit = jax.jit(lambda p, x: jnp.diff(model.apply({"params": p}, x), axis=-1)[:, 0])
  return learner, lambda p, x: np.asarray(logit(p, jnp.asarray(x, jnp.float32)), np.float64)


def inprocess_metrics(train_features: np.ndarray, train_labels: np.ndarray,
                      train_groups: np.ndarray, features: np.ndarray, y: np.ndarray,
                      identities: list, cfg) -> dict:
  """Models (`inprocess_learner`) on the training comments' sentence embeddings: unconstrained (also
  post-processed on the madlibs fit half, each of `cfg.postprocess`), on the embeddings
  decorrelated from the comments' identity groups (`preprocessing`; a madlibs sentence takes
  its term's group, "other identity" when no comment group has the term), and trained under
  each of `cfg.inprocess` over those groups by the exponentiated-gradient reduction (and, with
  `cfg.inprocess_grid_limits`, by grid search). Per rule: the madlibs held-out half's accuracy
  and gaps (expected values); for the reductions their training error and violation (largest
  moment minus `cfg.inprocess_eps`), the number of classifiers mixed and the iterations (the grid
  search: the selected point and its multipliers' L1 norm)."""
  split = _split(identities, y)
  held = split.held
  pick = lambda r: {k: r[k] for k in _HELD_KEYS}
  measure = lambda prob: pick(_held_rates(y, split, prob))
  learner, score_fn = inprocess_learner(cfg)
  labels, ones = train_labels.astype(np.float32), np.ones(len(train_labels), np.float32)
  params = learner.fit(train_features, labels, ones)
  fit_scores = score_fn(params, features[split.fit])
  held_scores = score_fn(params, features[held])
  out = {"unconstrained": measure((held_scores > 0).astype(np.float64))}
  for c in cfg.postprocess:
    out[f"+ {c} thresholds"] = pick(_post_processed(y, split, fit_scores, held_scores, c)[1])
  # Pre-processing: the comments' embeddings decorrelated from their groups; each madlibs
  # sentence takes its term's group ("other identity" for a term no comment group has).
  remover = preprocessing.fit_correlation_remover(train_features, sensitive_features=train_groups)
  known = set(remover.groups.tolist())
  other = "other identity" if "other identity" in known else "none"
  held_groups = np.array([t if t in known else other for t in split.terms[held]])
  decorrelated = learner.fit(
      np.asarray(preprocessing.remove_correlation(remover, train_features,
                                                  sensitive_features=train_groups), np.float32),
      labels, ones)
  x_held = preprocessing.remove_correlation(remover, features[held],
                                            sensitive_features=held_groups)
  out["decorrelated embeddings"] = measure(
      (score_fn(decorrelated, x_held) > 0).astype(np.float64))
  for c in cfg.inprocess:
    res = reductions.exponentiated_gradient(learner, train_features, train_labels,
                                            sensitive_features=train_groups, constraint=c,
                                            eps=cfg.inprocess_eps)
    out[f"exponentiated gradient, {c}"] = {
        **measure(reductions.reduction_probabilities(res, features[held])),
        "train_error": res.error, "train_violation": res.violation,
        "classifiers": int((res.weights > 0).sum()), "iterations": len(res.gaps)}
  for c in cfg.inprocess if cfg.inprocess_grid_limits else ():
    grids = [reductions.multiplier_grid(train_labels, sensitive_features=train_groups,
                                        constraint=c, grid_size=None, grid_limit=v)
             for v in cfg.inprocess_grid_limits]
    grid = np.concatenate([grids[0]] + [g[g.any(axis=1)] for g in grids[1:]])  # one lambda = 0
    res = reductions.grid_search(learner, train_features, train_labels,
                                 sensitive_features=train_groups, constraint=c, grid=grid)
    top = float(res.gammas[res.best].max())
    out[f"grid search, {c}"] = {
        **measure(reductions.grid_search_predict(res, features[held])),
        "train_error": float(res.errors[res.best]), "train_violation": top - cfg.inprocess_eps,
        "train_largest_moment": top, "grid_point": res.best,
        "grid_point_norm": float(res.lambdas[res.best].sum()),
        "grid_train_errors": res.errors.tolist(),
        "grid_train_largest_moments": res.gammas.max(axis=1).tolist()}
  return out


def adversarial_metrics(train_features: np.ndarray, train_labels: np.ndarray,
                        train_groups: np.ndarray, features: np.ndarray, y: np.ndarray,
                        identities: list, cfg) -> dict:
  """The in-processing model class (`cfg.inprocess_learner`: a linear layer or an MLP of width
  `cfg.model.mlp_dim`, one logit) trained on the comments' embeddings by minibatch Adam
  (`cfg.train.batch_size`, `cfg.train.learning_rate`, `cfg.adversarial_epochs` epochs) without
  an adversary, and against one that predicts the comment groups (`fit_adversarial`, alpha
  `cfg.adversarial_alpha`) for each of `cfg.adversarial`. Per rule, over `cfg.seeds`: the
  madlibs held-out half's accuracy and gaps (P(toxic) > 0.5), the training error and the
  adversary's last-epoch loss, mean and sd."""
  split = _split(identities, y)
  hidden = () if cfg.inprocess_learner == "logistic_regression" else (cfg.model.mlp_dim,)
  predictor = models.MLPClassifier(hidden=hidden, num_classes=1)
  rules = {"no adversary (same training)": {"alpha": 0.0, "project": False},
           **{f"adversarial, {c}": {"constraint": c, "alpha": cfg.adversarial_alpha}
              for c in cfg.adversarial}}
  keys = (*_HELD_KEYS, "train_error", "adversary_loss")
  out = {}
  for rule, kw in rules.items():
    runs = []
    for seed in cfg.seeds:
      res = adversarial.fit_adversarial(
          predictor, train_features, train_labels, sensitive_features=train_groups,
          epochs=cfg.adversarial_epochs, batch_size=cfg.train.batch_size,
          learning_rate=cfg.train.learning_rate, seed=seed, **kw)
      held = adversarial.adversarial_probabilities(res, features[split.held]) > 0.5
      train = adversarial.adversarial_probabilities(res, train_features) > 0.5
      runs.append({**_held_rates(y, split, held.astype(np.float64)),
                   "train_error": float(np.mean(train != train_labels)),
                   "adversary_loss": float(res.adversary_loss[-1])})
    out[rule] = mean_and_sd(runs, keys)
  return out


def _mean_rates(runs: list) -> dict:
  """Each rule's per-identity held-out TPR and FPR, averaged over seeds."""
  first = runs[0]["postprocess_rates"]
  return {"groups": first["groups"],
          **{rule: {k: np.mean([r["postprocess_rates"][rule][k] for r in runs], 0).tolist()
                    for k in ("tpr", "fpr")} for rule in first if rule != "groups"}}


def _plot_postprocessing(train_sets: dict, threshold: float, path: str) -> None:
  """Per training set, each identity term's held-out (FPR, TPR) under each rule: the plain
  threshold's terms spread over ROC space, equalized odds gathers them in one point."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, len(train_sets), figsize=(4.5 * len(train_sets), 4.3),
                           squeeze=False, sharey=True)
  for ax, (name, r) in zip(axes[0], train_sets.items()):
    rates = r["postprocess_rates"]
    for i, rule in enumerate(k for k in rates if k != "groups"):
      label = f"P(toxic) > {threshold}" if rule == "heldout" else rule
      ax.plot(rates[rule]["fpr"], rates[rule]["tpr"], "o", ms=3.5, alpha=0.7, color=f"C{i}",
              label=label)
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="false-positive rate",
           title=f"trained on {name}")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("true-positive rate")
  axes[0][0].legend(fontsize=8, title="one point per identity term", title_fontsize=8)
  reporting.save_figure(fig, path)


def _plot_grid_search(train_sets: dict, path: str) -> None:
  """Per training set and constraint, every grid point's training error against its largest
  moment on the comments, the selected point ringed, beside the exponentiated-gradient
  mixture: the trade-off the grid explores."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  first = next(iter(train_sets.values()))["inprocess"]
  constraints = [k.split(", ", 1)[1] for k in first if k.startswith("grid search, ")]
  fig, axes = plt.subplots(len(train_sets), len(constraints), squeeze=False,
                           figsize=(4.6 * len(constraints), 3.8 * len(train_sets)))
  for row, (name, s) in zip(axes, train_sets.items()):
    for ax, c in zip(row, constraints):
      gs = s["inprocess"][f"grid search, {c}"]
      ax.plot(gs["grid_train_largest_moments"], gs["grid_train_errors"], "o", ms=4, alpha=0.6,
              color="C0", label="grid points")
      ax.plot([gs["train_largest_moment"]], [gs["train_error"]], "o", ms=11, mfc="none",
              color="C3", label="selected (w = 0.5)")
      eg = s["inprocess"].get(f"exponentiated gradient, {c}")
      if eg is not None:
        eps = gs["train_largest_moment"] - gs["train_violation"]
        ax.plot([eg["train_violation"] + eps], [eg["train_error"]], "*", ms=11, color="C2",
                label="exponentiated gradient")
      ax.set(xlabel="largest moment on the comments", ylabel="training error",
             title=f"{name}: {c}")
      ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  reporting.save_figure(fig, path)


def _plot(per_set: dict, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  first = next(iter(per_set.values()))
  terms = sorted(first, key=lambda t: first[t]["bpsn_auc"])
  fig, axes = plt.subplots(1, 2, figsize=(10, 0.2 * len(terms) + 1.5), sharey=True)
  for ax, key in zip(axes, ("bpsn_auc", "bnsp_auc")):
    for i, (name, per) in enumerate(per_set.items()):
      ax.plot([per[t][key] for t in terms], range(len(terms)), "o", ms=4, color=f"C{i}",
              label=name)
    ax.set_yticks(range(len(terms)), terms, fontsize=7)
    ax.set_title(key.replace("_auc", " AUC").upper().replace(" AUC", " AUC"))
    ax.grid(alpha=0.3)
  axes[0].legend(title="trained on", fontsize=8)
  reporting.save_figure(fig, path)


def run(cfg: ml_collections.ConfigDict, *, show_progress: bool = True) -> dict:
  """Trains and measures per `cfg`; writes results/<run_name>/. Returns the summary."""
  _check(cfg)
  madlibs, identities = toxicity.load_madlibs(cfg.data.data_dir)
  keep = per_identity_sample(identities, madlibs.labels, cfg.data.eval_per_identity)
  madlibs, identities = madlibs.subset(keep), [identities[i] for i in keep]
  sets = {}
  for s in cfg.data.train_sets:
    train = toxicity.load_wiki_toxicity(cfg.data.data_dir, fuzzed=s == "fuzzed")
    if 0 < cfg.data.max_train < len(train):
      train = train.subset(np.sort(np.random.default_rng(0).choice(
          len(train), cfg.data.max_train, replace=False)))
    sets[s] = train
  workdir = reporting.start_resumable_run(cfg)
  aps_idx = per_identity_sample(identities, madlibs.labels, cfg.aps_per_identity)
  inputs = study_inputs(cfg, list(madlibs.texts), identities, aps_idx)
  y = madlibs.labels
  summary, per_set = {"train_sets": {}}, {}
  for name, train in sets.items():
    @functools.cache  # once per set, shared by its seeds; not at all if every seed is kept
    def arrays(train=train):
      return {"inputs": inputs.encode_train(list(train.texts)),
              "label": train.labels.astype(np.int32)}

    def one_seed(seed):
      scores, aps_sample = train_and_score(cfg, arrays(), inputs, seed,
                                           show_progress=show_progress)
      aps = np.full(len(y), np.nan)
      aps[aps_idx] = aps_sample
      out = bias_metrics(y, scores, identities, cfg.threshold, cfg.generalized_mean_p, aps=aps)
      if cfg.postprocess:
        out.update(postprocess_metrics(y, scores, identities, cfg.threshold, cfg.postprocess))
      return out

    runs = [reporting.cached(workdir, f"{name}_seed_{seed}", functools.partial(one_seed, seed))
            for seed in cfg.seeds]
    keys = [k for k in runs[0] if k not in ("per_identity", "postprocess_rates")]
    agg = mean_and_sd(runs, keys)
    per_set[name] = {t: {k: float(np.mean([r["per_identity"][t][k] for r in runs]))
                         for k in runs[0]["per_identity"][t]}
                     for t in runs[0]["per_identity"]}
    summary["train_sets"][name] = {**agg, "per_identity": per_set[name],
                                   "train_examples": len(train),
                                   "train_toxic_fraction": float(train.labels.mean())}
    if cfg.postprocess:
      summary["train_sets"][name]["postprocess_rates"] = _mean_rates(runs)
    if cfg.inprocess or cfg.adversarial:
      groups = comment_groups(train.texts, train.labels, cfg.inprocess_min_group)
    if cfg.inprocess:  # deterministic: once per training set, not per seed
      summary["train_sets"][name]["inprocess"] = reporting.cached(
          workdir, f"{name}_inprocess", functools.partial(
              inprocess_metrics, np.asarray(arrays()["inputs"]), train.labels, groups,
              np.asarray(inputs.eval_inputs), y, identities, cfg))
      summary["train_sets"][name]["inprocess_groups"] = {
          g: int((groups == g).sum()) for g in sorted(set(groups.tolist()))}
    if cfg.adversarial:  # a part of its own: seeds inside, after the reductions
      summary["train_sets"][name]["adversarial"] = reporting.cached(
          workdir, f"{name}_adversarial", functools.partial(
              adversarial_metrics, np.asarray(arrays()["inputs"]), train.labels, groups,
              np.asarray(inputs.eval_inputs), y, identities, cfg))
  summary.update(eval_examples=len(madlibs), aps_examples=len(aps_idx), seeds=list(cfg.seeds),
                 backend=jax.default_backend())
  if cfg.postprocess or cfg.inprocess or cfg.adversarial:
    split = _split(identities, y)
    summary.update(postprocess=list(cfg.postprocess),
                   postprocess_fit_examples=int(split.fit.sum()),
                   postprocess_heldout_examples=int(split.held.sum()))
  reporting.write_json(os.path.join(workdir, "summary.json"), summary)
  _plot(per_set, os.path.join(workdir, "plots", "bias_aucs.png"))
  if cfg.postprocess:
    _plot_postprocessing(summary["train_sets"], cfg.threshold,
                         os.path.join(workdir, "plots", "postprocessing.png"))
  if cfg.inprocess and cfg.inprocess_grid_limits:
    _plot_grid_search(summary["train_sets"], os.path.join(workdir, "plots", "grid_search.png"))
  with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
    f.write(report(cfg, summary))
  return summary


def summary_table(summary: dict) -> str:
  cols = ["trained on", "madlibs AUC", "mean subgroup AUC", "mean BPSN AUC", "mean BNSP AUC",
          "demographic parity diff.", "equalized odds diff.", "APS"]
  rows = []
  for name, r in summary["train_sets"].items():
    rows.append([name] + [reporting.mean_sd_cell(r, k, len(summary["seeds"])) for k in (
        "overall_auc", "mean_subgroup_auc", "mean_bpsn_auc", "mean_bnsp_auc",
        "demographic_parity_difference", "equalized_odds_difference", "aps")])
  return reporting.markdown_table(cols, rows)


def postprocess_table(summary: dict, constraints, threshold: float) -> str:
  """Held-out accuracy and gaps: the plain threshold, then each post-processing constraint."""
  cols = ["trained on", "rule", "held-out accuracy", "demographic parity diff.",
          "equalized odds diff."]
  rows = []
  for name, r in summary["train_sets"].items():
    for prefix, label in [("heldout", f"P(toxic) > {threshold}")] + [(c, c) for c in constraints]:
      rows.append([name, label] + [reporting.mean_sd_cell(r, f"{prefix}_{k}",
                                                          len(summary["seeds"])) for k in (
          "accuracy", "demographic_parity_difference", "equalized_odds_difference")])
  return reporting.markdown_table(cols, rows)


def inprocess_table(summary: dict) -> str:
  """Per training set and rule: the madlibs held-out half's accuracy and gaps, and the
  reductions' violation on the training comments."""
  cols = ["trained on", "model", "held-out accuracy", "demographic parity diff.",
          "equalized odds diff.", "training violation"]
  rows = []
  for name, s in summary["train_sets"].items():
    for rule, r in s["inprocess"].items():
      rows.append([name, rule] + [f"{r[k]:.3f}" for k in (
          "accuracy", "demographic_parity_difference", "equalized_odds_difference")] + [
              f"{r['train_violation']:.4f}" if "train_violation" in r else "-"])
  return reporting.markdown_table(cols, rows)


def adversarial_table(summary: dict) -> str:
  """Per training set and rule: the held-out accuracy and gaps, the training error and the
  adversary's last loss, mean +- sd over seeds."""
  cols = ["trained on", "model", "held-out accuracy", "demographic parity diff.",
          "equalized odds diff.", "training error", "adversary loss"]
  runs = len(summary["seeds"])
  rows = [[name, rule] + [reporting.mean_sd_cell(r, k, runs) for k in (
      *_HELD_KEYS, "train_error", "adversary_loss")]
          for name, s in summary["train_sets"].items()
          for rule, r in s["adversarial"].items()]
  return reporting.markdown_table(cols, rows)


def _learner_note(cfg) -> str:
  if cfg.inprocess_learner == "logistic_regression":
    return f"Logistic regressions (L2 {cfg.inprocess_l2})"
  return (f"MLPs of width {cfg.model.mlp_dim} (full-batch Adam {cfg.train.learning_rate}, "
          f"{cfg.inprocess_steps} steps)")


def printed_tables(summary: dict, cfg) -> str:
  """What `scripts/bias.py` prints: the summary table, then the mitigations' tables."""
  parts = [summary_table(summary)]
  if cfg.postprocess:
    parts.append(postprocess_table(summary, cfg.postprocess, cfg.threshold))
  if cfg.inprocess:
    parts.append(inprocess_table(summary))
  if cfg.adversarial:
    parts.append(adversarial_table(summary))
  return "\n\n".join(parts)


def report(cfg, summary: dict) -> str:
  names = list(summary["train_sets"])
  per = {n: summary["train_sets"][n]["per_identity"] for n in names}
  terms = sorted(per[names[0]], key=lambda t: per[names[0]][t]["bpsn_auc"])
  rows = [[t] + [per[n][t][k] for n in names
                 for k in ("subgroup_auc", "bpsn_auc", "bnsp_auc", "aps")]
          for t in terms]
  cols = ["identity"] + [f"{n} {k}" for n in names for k in ("subgroup", "BPSN", "BNSP", "APS")]
  return "\n".join([
      f"# Identity bias {cfg.run_name}", "",
      f"Command: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`", "",
      f"Trained on Wikipedia comments, scored on {summary['eval_examples']} madlibs sentences; "
      f"{reporting.seeds_note(summary['seeds'])}; generalized means with p = "
      f"{cfg.generalized_mean_p}; threshold gaps at P(toxic) > {cfg.threshold}; APS: mean "
      "|d P(toxic) / dt| when the identity term's embeddings are scaled by (1 + t).", "",
      summary_table(summary), "",
      *(["## Post-processing (Hardt et al. 2016)", "",
         "Per-identity randomised thresholds (`fairness.postprocessing.fit_thresholds`, accuracy "
         f"objective) fitted on {summary['postprocess_fit_examples']:,} of the sentences that name "
         "an identity (each term and label halved, fixed seed) and measured on the other "
         f"{summary['postprocess_heldout_examples']:,}, in expectation over the randomisation:",
         "",
         postprocess_table(summary, cfg.postprocess, cfg.threshold), "",
         "![per-identity rates](plots/postprocessing.png)", ""]
        if cfg.postprocess else []),
      *(["## In-processing (Agarwal et al. 2018)", "",
         f"{_learner_note(cfg)} on the training comments' frozen "
         "sentence embeddings, unconstrained (also post-processed on the madlibs fit half), "
         "on the embeddings decorrelated from the comments' identity groups (pre-processing), "
         "and trained by the exponentiated-gradient reduction over those groups "
         f"(allowed violation {cfg.inprocess_eps}; groups: each term with at least "
         f"{cfg.inprocess_min_group} toxic and non-toxic comments, other identities, none: "
         + "; ".join(f"{n} " + ", ".join(f"{g} {k}" for g, k in s["inprocess_groups"].items())
                     for n, s in summary["train_sets"].items())
         + ")"
         + (", and by grid search over 0 and plus or minus each of "
            f"{', '.join(map(str, cfg.inprocess_grid_limits))} on each basis cell's multiplier "
            "(one deterministic classifier, selected by (training error + largest moment) / 2; "
            "no allowance)" if cfg.inprocess_grid_limits else "")
         + ", measured on the madlibs held-out half; deterministic, one run each. The "
         "training violation is the largest constraint moment minus the allowance on the "
         "comments (<= 0: met).", "", inprocess_table(summary), "",
         *(["![grid search](plots/grid_search.png)", ""] if cfg.inprocess_grid_limits else [])]
        if cfg.inprocess else []),
      *(["## Adversarial debiasing (Zhang et al. 2018)", "",
         ("Linear layers" if cfg.inprocess_learner == "logistic_regression"
          else f"MLPs of width {cfg.model.mlp_dim}")
         + " with one logit on the training comments' frozen sentence embeddings, minibatch Adam "
         f"(batch {cfg.train.batch_size}, learning rate {cfg.train.learning_rate}, "
         f"{cfg.adversarial_epochs} epochs), without an adversary and against one that "
         "predicts the comments' identity groups from P(toxic) (demographic parity) or from it and "
         f"the label (equalized odds), alpha {cfg.adversarial_alpha}; held-out half as above, "
         f"P(toxic) > 0.5; {reporting.seeds_note(summary['seeds'])}. The adversary's loss is "
         "its last epoch's cross-entropy (higher: it reads the group less well).", "",
         adversarial_table(summary), ""]
        if cfg.adversarial else []),
      "## Per identity" + reporting.over_seeds(summary["seeds"]), "",
      reporting.markdown_table(cols, rows), "", "![bias AUCs](plots/bias_aucs.png)", ""])


def default_config() -> ml_collections.ConfigDict:
  """Every field the bias study reads; configs/bias_*.py start from this."""
  c = ml_collections.ConfigDict()
  c.seeds = (0, 1, 2)
  c.results_dir = "results"
  c.run_name = "bias"
  c.threshold = 0.5  # P(toxic) above which a sentence is called toxic
  c.generalized_mean_p = -5.0
  c.aps_per_identity = 0  # sentences per identity term and label whose APS is measured (0 = all)
  # Post-processing constraints (fairness.postprocessing.CONSTRAINTS), fitted per identity term on
  # half of the madlibs sentences and measured on the rest; () = none.
  c.postprocess = ()
  # In-processing constraints (fairness.reductions.CONSTRAINTS; model "minilm" only): logistic
  # regressions on the training comments' embeddings, trained by the exponentiated-gradient
  # reduction over the comments' identity groups (the terms with at least inprocess_min_group
  # toxic and non-toxic comments, other identities, none) with allowed violation
  # inprocess_eps, measured on the madlibs held-out half; () = none.
  c.inprocess = ()
  c.inprocess_eps = 0.01
  c.inprocess_l2 = 1.0
  c.inprocess_min_group = 5
  # The model trained with and without the constraints: "logistic_regression" (L2
  # inprocess_l2, Newton steps) or "mlp" (the head's width model.mlp_dim; full-batch Adam at
  # train.learning_rate for inprocess_steps steps).
  c.inprocess_learner = "logistic_regression"
  c.inprocess_steps = 300
  # Also grid search (reductions.grid_search, constraint weight 0.5) for each of `inprocess`,
  # over the union of the multiplier grids with grid_size=None (0 and +-limit on each basis
  # cell) at each of these limits; () = none.
  c.inprocess_grid_limits = ()
  # Adversarial debiasing (fairness.adversarial.CONSTRAINTS; model "minilm" only): the
  # inprocess_learner's model class (one logit) trained by minibatch Adam (train.batch_size,
  # train.learning_rate) for adversarial_epochs epochs without an adversary and against one
  # that predicts the comment groups, with weight adversarial_alpha, once per seed; () = none.
  c.adversarial = ()
  c.adversarial_alpha = 1.0
  c.adversarial_epochs = 50
  c.data = ml_collections.ConfigDict()
  c.data.data_dir = ""  # Dixon et al.'s eval_datasets folder
  c.data.train_sets = TRAIN_SETS  # nonfuzzed | fuzzed
  c.data.vocab_size = 16384  # hash buckets + pad + OOV
  c.data.max_length = 128
  c.data.eval_per_identity = 0  # madlibs sentences per identity term and label (0 = all 76,564)
  c.data.max_train = 0  # training comments, drawn once with seed 0 (0 = all 1,492)
  c.model = ml_collections.ConfigDict()
  c.model.name = "bag_of_embeddings"  # bag_of_embeddings | transformer | minilm (frozen
  # all-MiniLM-L6-v2 sentence embeddings and an MLP head of width mlp_dim)
  c.model.embed_dim = 64
  c.model.num_layers = 1
  c.model.num_heads = 4
  c.model.mlp_dim = 64
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32
  c.train.epochs = 10.0
  c.train.learning_rate = 3e-3
  return c
