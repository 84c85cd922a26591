"""Fixed-shape padded batches with `batch["mask"]`: one compiled program for every batch."""

from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np


def gather_batch(arrays: Mapping[str, np.ndarray], indices: np.ndarray,
                 mask: np.ndarray) -> dict[str, np.ndarray]:
  """Rows `indices` of every array plus `mask`; padded rows repeat row indices[0] (masked out).

  Args:
    arrays: dict of arrays with a shared leading axis [N, ...].
    indices: int [B] row ids; entries where `mask` is False are ignored.
    mask: bool [B], True for real rows.
  """
  indices = np.where(mask, indices, indices[mask][0] if mask.any() else 0)
  out = {k: v[indices] for k, v in arrays.items()}
  out["mask"] = mask.astype(bool)
  return out


def pad_indices(idx: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices [batch_size], mask [batch_size]): `idx` followed by masked-out padding."""
  mask = np.zeros(batch_size, bool)
  mask[:len(idx)] = True
  return np.pad(np.asarray(idx), (0, batch_size - len(idx))), mask


def padded_batches(arrays: Mapping[str, np.ndarray], batch_size: int, *, shuffle: bool = False,
                   seed: int = 0, epoch: int = 0, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Iterates over one epoch in batches of exactly `batch_size` rows; the last one padded.

  Args:
    arrays: dict of arrays with a shared leading axis [N, ...].
    batch_size: rows per batch.
    shuffle: permute rows with a permutation determined by (seed, epoch).
    seed: shuffling seed.
    epoch: epoch number, so each epoch has its own permutation and a run can resume mid-way.
    start: index of the first batch to yield (for exact resume).
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size=}")
  n = len(next(iter(arrays.values())))
  if n == 0:
    raise ValueError("cannot batch an empty dataset")
  order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n))
  num_batches = -(-n // batch_size)
  for b in range(start, num_batches):
    yield gather_batch(arrays, *pad_indices(order[b * batch_size:(b + 1) * batch_size],
                                            batch_size))


def num_batches(num_examples: int, batch_size: int) -> int:
  return -(-num_examples // batch_size)
