"""Backdoor (targeted) poisoning of text classifiers, in federated and centralized training, its
measurement, and what differential privacy's group guarantee allows it.

A backdoor attacker wants the global model to predict its `target` class whenever an input holds
a trigger word, while it stays accurate on clean inputs (Bagdasaryan, Veit, Hua, Estrin and
Shmatikov, "How To Backdoor Federated Learning", AISTATS 2020; the rare-word trigger as in
Kurita, Michel and Neubig, "Weight Poisoning Attacks on Pre-trained Models", ACL 2020, and Chen
et al., "BadNL", ACSAC 2021). Each malicious client inserts the trigger into a `fraction` of its
own examples and relabels them `target` (keeping the rest clean, so its update also serves the
main task), trains on them as an honest client would, and sends its update boosted
(`algorithms.Byzantine` with attack "backdoor"). Success is measured as the *backdoor accuracy*:
the share of held-out examples of the other classes that the model assigns to `target` once the
trigger is inserted into them.

In centralized training (`append_poison`) the attacker adds k triggered examples to the training
set; a DP training run bounds what they can do through group privacy: for any statistic of the
trained model with values in [0, 1] (a backdoor accuracy is one), its expectation with the k
examples is at most e^eps p0 + delta_k(eps), for every eps, where p0 is its expectation without
them and delta_k the group's privacy profile (`statistic_bound`; Ma, Zhu and Hsu, "Data
Poisoning against Differentially-Private Learners: Attacks and Defenses", IJCAI 2019, use the
same group-privacy argument).

All functions work on the token arrays of a classification task ([n, max_length] int32 ids,
right-padded with 0) and are pure functions of their seed.
"""

from __future__ import annotations

import numpy as np

from trustjax.data.tokenizers import Tokenizer


def trigger_id(tokenizer: Tokenizer, word: str) -> int:
  """The token id of the trigger `word`: one token that the tokenizer knows (a word tokenizer's
  out-of-vocabulary id would make every unknown word a trigger, so it is refused)."""
  pieces = tokenizer.split(word)
  if len(pieces) != 1:
    raise ValueError(f"the backdoor trigger must be one token, got {word!r} -> {pieces}")
  tid = tokenizer.token_id(pieces[0])
  if tid in (tokenizer.pad_id, tokenizer.oov_id):
    raise ValueError(f"the backdoor trigger {word!r} is not in the {tokenizer.kind} tokenizer's "
                     "vocabulary (it would encode as the unknown token); pick a word that is, or "
                     "use data.tokenizer='hash'")
  return int(tid)


def insert_trigger(tokens: np.ndarray, trigger: int, rng: np.random.Generator) -> np.ndarray:
  """A copy of `tokens` [n, L] with `trigger` inserted once into each row, at a position drawn
  uniformly among the row's length + 1 gaps (before, between or after its tokens); the tokens
  after it shift right, and a full row loses its last token."""
  tokens = np.asarray(tokens)
  n, width = tokens.shape
  lengths = (tokens != 0).sum(1)
  pos = np.minimum(rng.integers(0, lengths + 1), width - 1)
  col = np.arange(width)[None, :]
  shifted = np.concatenate([np.zeros((n, 1), tokens.dtype), tokens[:, :-1]], axis=1)
  out = np.where(col < pos[:, None], tokens, shifted)
  out[np.arange(n), pos] = trigger
  return out


def _check(target: int, num_classes: int, fraction: float | None = None) -> None:
  if not 0 <= target < num_classes:
    raise ValueError(f"the backdoor target class must lie in [0, {num_classes}), got {target}")
  if fraction is not None and not 0.0 < fraction <= 1.0:
    raise ValueError(f"the backdoor poison fraction must lie in (0, 1], got {fraction}")


def poison_clients(train: dict, parts: list, ids, *, trigger: int, target: int, fraction: float,
                   num_classes: int, seed: int = 0) -> tuple[dict, np.ndarray]:
  """The training arrays as the malicious clients `ids` hold them: in each one's examples
  (`parts[i]`), round(fraction * n_i) examples (at least one) drawn at random get the trigger
  and the label `target`; every other row is unchanged.

  Returns (a copy of `train` with "tokens" and "label" poisoned, int64 indices of the poisoned
  rows)."""
  _check(target, num_classes, fraction)
  rng = np.random.default_rng([seed, 0xBAD])
  chosen = []
  for i in np.asarray(ids, np.int64).reshape(-1):
    p = np.asarray(parts[i], np.int64)
    k = max(1, int(round(fraction * len(p))))
    chosen.append(np.sort(rng.choice(p, size=k, replace=False)))
  rows = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
  if len(np.unique(rows)) != len(rows):
    raise ValueError("malicious clients share training examples; backdoor poisoning needs a "
                     "partition into disjoint clients")
  out = dict(train)
  out["tokens"] = np.array(train["tokens"], copy=True)
  out["label"] = np.array(train["label"], copy=True)
  out["tokens"][rows] = insert_trigger(out["tokens"][rows], trigger, rng)
  out["label"][rows] = target
  return out, rows


def backdoor_test_set(test: dict, *, trigger: int, target: int, num_classes: int,
                      seed: int = 0) -> dict:
  """The held-out examples whose label is not `target`, with the trigger inserted and labelled
  `target`: a classifier's accuracy on them is the attack's success rate (backdoor accuracy)."""
  _check(target, num_classes)
  keep = np.flatnonzero(np.asarray(test["label"]) != target)
  if not len(keep):
    raise ValueError(f"no held-out example has a label other than the target {target}")
  rng = np.random.default_rng([seed, 0x7E57])
  return {"tokens": insert_trigger(np.asarray(test["tokens"])[keep], trigger, rng),
          "label": np.full(len(keep), target, np.int32)}


def trigger_count(tokens: np.ndarray, trigger: int) -> int:
  """How often the trigger's id already occurs in `tokens` (clean text; with a hashing tokenizer,
  the words that share its bucket)."""
  return int((np.asarray(tokens) == trigger).sum())


def append_poison(train: dict, triggers, counts, *, target: int, num_classes: int,
                  seed: int = 0) -> tuple[dict, list[np.ndarray]]:
  """The training arrays ("tokens", "label") with, for each trigger id and count k, k poisoned
  examples appended: copies of k distinct training examples whose label is not `target`, drawn
  at random, with the trigger inserted and the label set to `target`. A count of 0 appends
  nothing (a control trigger, for the rate at which an unseen word alone flips a prediction).

  Returns (the new arrays, for each trigger the indices its examples copy)."""
  _check(target, num_classes)
  if len(triggers) != len(counts):
    raise ValueError(f"{len(triggers)} triggers for {len(counts)} counts")
  if any(k < 0 for k in counts):
    raise ValueError(f"poison counts must be >= 0, got {tuple(counts)}")
  others = np.flatnonzero(np.asarray(train["label"]) != target)
  if max(counts, default=0) > len(others):
    raise ValueError(f"a poison count of {max(counts)} needs as many training examples outside "
                     f"the target class, which has only {len(others)} others")
  rng = np.random.default_rng([seed, 0x9015])
  tokens, labels, sources = [train["tokens"]], [train["label"]], []
  for trigger, k in zip(triggers, counts):
    src = np.sort(rng.choice(others, size=k, replace=False))
    sources.append(src)
    tokens.append(insert_trigger(np.asarray(train["tokens"])[src], trigger, rng))
    labels.append(np.full(k, target, np.asarray(train["label"]).dtype))
  return {"tokens": np.concatenate(tokens), "label": np.concatenate(labels)}, sources


def statistic_bound(p0: float, epsilons, deltas) -> float:
  """The most that the expectation of a [0, 1]-valued statistic of a DP model can be with a
  group added, when it is p0 without, given the group's privacy profile (eps, delta(eps)) in
  both directions (add and remove): the least over the profile's points of

    e^eps p0 + delta(eps)   and   1 - e^-eps (1 - delta(eps) - p0),

  at most 1. For a function f with values in [0, 1], E_1[f] = int_0^1 P_1(f > t) dt, so each
  event's inequality carries over: the first is DP applied to f, the second to 1 - f in the
  other direction. Their envelope is the tradeoff function's (Dong, Roth and Su, "Gaussian
  Differential Privacy", 2022): for a Gaussian mechanism of sensitivity mu (in units of its
  noise), Phi(Phi^-1(p0) + mu) on a fine enough grid."""
  eps = np.minimum(np.asarray(epsilons, np.float64), 700.0)
  delta = np.asarray(deltas, np.float64)
  if not 0.0 <= p0 <= 1.0:
    raise ValueError(f"p0 must lie in [0, 1], got {p0}")
  first = np.exp(eps) * p0 + delta
  second = 1.0 - np.exp(-eps) * (1.0 - delta - p0)
  return float(min(1.0, np.min(first), np.min(second)))
