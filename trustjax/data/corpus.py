"""The in-memory text-classification dataset every loader returns."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class TextDataset:
  """Texts with integer labels, plus optional per-example metadata.

  Attributes:
    texts: n strings.
    labels: int32 [n], values in [0, len(label_names)).
    label_names: class names, index = label id.
    device_ids: optional int32 [n] (who produced the example; used by federated learning).
    timestamps: optional float64 [n] (seconds since the corpus epoch; used by continual learning).
    slots: optional list of n lists of (slot_name, start, end) character spans.
  """

  texts: Sequence[str]
  labels: np.ndarray
  label_names: tuple[str, ...]
  device_ids: np.ndarray | None = None
  timestamps: np.ndarray | None = None
  slots: Sequence[Sequence[tuple[str, int, int]]] | None = None

  def __post_init__(self):
    n = len(self.texts)
    if n == 0:
      raise ValueError("dataset is empty: no texts")
    if len(self.labels) != n:
      raise ValueError(f"{len(self.texts)=} but {len(self.labels)=}")
    for name in ("device_ids", "timestamps", "slots"):
      v = getattr(self, name)
      if v is not None and len(v) != n:
        raise ValueError(f"{name} has {len(v)} entries for {n} texts")
    if self.labels.min() < 0 or self.labels.max() >= len(self.label_names):
      raise ValueError(f"labels must lie in [0, {len(self.label_names)}), got "
                       f"[{self.labels.min()}, {self.labels.max()}]")

  def __len__(self) -> int:
    return len(self.texts)

  @property
  def num_classes(self) -> int:
    return len(self.label_names)

  def subset(self, idx: np.ndarray) -> "TextDataset":
    idx = np.asarray(idx)
    pick = lambda v: None if v is None else (v[idx] if isinstance(v, np.ndarray)
                                             else [v[i] for i in idx])
    return TextDataset(texts=[self.texts[i] for i in idx], labels=self.labels[idx],
                       label_names=self.label_names, device_ids=pick(self.device_ids),
                       timestamps=pick(self.timestamps), slots=pick(self.slots))

  def class_ids(self, classes: Sequence[int | str]) -> list[int]:
    """Label ids of `classes` given as ids or names; unknown ones raise a ValueError."""
    ids = []
    for c in classes:
      if isinstance(c, str):
        if c not in self.label_names:
          raise ValueError(f"unknown class {c!r}; the classes are {list(self.label_names)}")
        c = self.label_names.index(c)
      elif not 0 <= int(c) < self.num_classes:
        raise ValueError(f"class id {c} must lie in [0, {self.num_classes})")
      ids.append(int(c))
    if len(set(ids)) < len(ids):
      raise ValueError(f"classes must be distinct, got {list(classes)}")
    return ids

  def downsample(self, classes: Sequence[int | str], fraction: float,
                 seed: int) -> "TextDataset":
    """Keeps round(fraction * n_c) examples (at least one) of each class c in `classes`, drawn
    uniformly without replacement by `seed`, and every example of the other classes (in their
    order). Makes the under-represented classes of Bagdasaryan et al.'s study of DP's
    disparate impact (NeurIPS 2019)."""
    if not 0.0 < fraction <= 1.0:
      raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    keep = np.ones(len(self), bool)
    for c in self.class_ids(classes):
      rows = np.flatnonzero(self.labels == c)
      if rows.size == 0:
        raise ValueError(f"class {self.label_names[c]!r} has no examples to downsample")
      keep[rows] = False
      keep[rng.choice(rows, max(1, round(fraction * rows.size)), replace=False)] = True
    return self.subset(np.flatnonzero(keep))

  def split(self, eval_fraction: float, seed: int) -> tuple["TextDataset", "TextDataset"]:
    """A seeded random split into (train, eval)."""
    if not 0.0 < eval_fraction < 1.0:
      raise ValueError(f"eval_fraction must lie in (0, 1), got {eval_fraction=}")
    perm = np.random.default_rng(seed).permutation(len(self))
    n_eval = max(1, int(round(eval_fraction * len(self))))
    return self.subset(np.sort(perm[n_eval:])), self.subset(np.sort(perm[:n_eval]))
