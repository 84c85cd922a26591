"""Canaries: secrets planted in a training set, and their exposure.

Reference: Carlini, Liu, Erlingsson, Kos and Song, "The Secret Sharer: Evaluating and Testing
Unintended Memorization in Neural Networks", USENIX Security 2019.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np

from trustjax.data.corpus import TextDataset


def make_secrets(num: int, *, digits: int = 4, seed: int = 0) -> list[str]:
  """`num` distinct random secrets of `digits` decimal digits (the canaries' random part)."""
  space = 10 ** digits
  if not 0 < num <= space:
    raise ValueError(f"num must lie in [1, {space}] for {digits} digits, got {num=}")
  picks = np.random.default_rng(seed).choice(space, size=num, replace=False)
  return [f"{int(p):0{digits}d}" for p in picks]


def all_secrets(digits: int) -> list[str]:
  """The whole secret space of `digits` decimal digits (exposure's reference set)."""
  if not 1 <= digits <= 6:
    raise ValueError(f"digits must lie in [1, 6] (10**digits candidates are scored), got {digits=}")
  return ["".join(t) for t in itertools.product("0123456789", repeat=digits)]


def fill(template: str, secrets: Sequence[str]) -> list[str]:
  """Canary texts: `template` with "{}" replaced by each secret."""
  if template.count("{}") != 1:
    raise ValueError(f"template must hold exactly one '{{}}', got {template!r}")
  return [template.format(s) for s in secrets]


def insert_canaries(dataset: TextDataset, texts: Sequence[str], labels: Sequence[int], *,
                    repeats: int = 1) -> tuple[TextDataset, np.ndarray]:
  """Appends every canary `repeats` times to `dataset`.

  Returns:
    (the new dataset, int [len(texts), repeats] the rows of each canary's copies).
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats=}")
  if len(texts) != len(labels) or not len(texts):
    raise ValueError(f"need as many canary labels as texts (at least one), got {len(texts)} "
                     f"texts and {len(labels)} labels")
  labels = np.asarray(labels, dataset.labels.dtype)
  if labels.min() < 0 or labels.max() >= dataset.num_classes:
    raise ValueError(f"canary labels must lie in [0, {dataset.num_classes})")
  n, k = len(dataset), len(texts)
  rows = n + np.arange(k * repeats).reshape(repeats, k).T
  extra = lambda v, fillv: None if v is None else np.concatenate(
      [v, np.full(k * repeats, fillv, v.dtype)])
  out = TextDataset(
      texts=list(dataset.texts) + list(texts) * repeats,
      labels=np.concatenate([dataset.labels, np.tile(labels, repeats)]),
      label_names=dataset.label_names,
      device_ids=extra(dataset.device_ids, -1),
      timestamps=extra(dataset.timestamps, np.nan),
      slots=None if dataset.slots is None else list(dataset.slots) + [[]] * (k * repeats))
  return out, rows


def exposure(secret_perplexity, reference_perplexities) -> float:
  """Exposure in bits, the rank form of Carlini et al. 2019 (Def. 4):
  log2 |R| - log2 rank(secret), where R is the candidate set (the references plus the secret)
  and rank 1 is the lowest perplexity (or loss).

  Ties are ranked against the secret (it is placed after every reference with the same value),
  so a flat model does not show exposure.

  Args:
    secret_perplexity: the model's perplexity (or any loss) on the inserted secret.
    reference_perplexities: [r] the same on the other candidates (not containing the secret).
  """
  ref = np.asarray(reference_perplexities, np.float64).reshape(-1)
  s = float(secret_perplexity)
  if not ref.size:
    raise ValueError("reference_perplexities is empty")
  if not (math.isfinite(s) and np.isfinite(ref).all()):
    raise ValueError("perplexities must be finite")
  rank = 1 + int((ref <= s).sum())
  return math.log2(ref.size + 1) - math.log2(rank)
