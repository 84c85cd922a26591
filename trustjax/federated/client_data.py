"""Client datasets as padded structure-of-arrays.

`ClientStore` holds every client's examples once, host-side, as flat arrays sorted by client with
offsets (memory = the number of examples, whatever the spread of client sizes). Each round,
`ClientStore.gather(ids)` builds the `ClientData` of the chosen clients: arrays with leading axes
[clients, capacity] plus per-client counts. The capacity is the smallest *size bucket* that holds
the largest chosen client (buckets grow geometrically from `min_capacity`), so a few very large
clients do not pad every round to their size, and the round function compiles once per bucket,
not once per combination of client sizes.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import numpy as np


class ClientData(NamedTuple):
  """Examples of a group of clients.

  Attributes:
    examples: name -> array [clients, capacity, ...]; rows >= count are padding (zeros).
    counts: int32 [clients]: number of real examples of each client.
  """

  examples: dict
  counts: np.ndarray

  @property
  def num_clients(self) -> int:
    return int(self.counts.shape[0])

  @property
  def capacity(self) -> int:
    return int(next(iter(self.examples.values())).shape[1])


def bucket_capacities(max_count: int, *, min_capacity: int, growth: float = 2.0) -> tuple[int, ...]:
  """Geometric capacities min_capacity, ~min_capacity*growth, ... up to >= max_count (multiples of
  min_capacity)."""
  if min_capacity < 1:
    raise ValueError(f"min_capacity must be >= 1, got {min_capacity=}")
  if growth <= 1:
    raise ValueError(f"growth must be > 1, got {growth=}")
  caps = [min_capacity]
  while caps[-1] < max_count:
    nxt = int(np.ceil(caps[-1] * growth / min_capacity)) * min_capacity
    caps.append(max(nxt, caps[-1] + min_capacity))
  return tuple(caps)


class ClientStore:
  """All clients' examples, built once from arrays and a partition.

  Args:
    arrays: name -> array [n, ...] (the pooled dataset).
    parts: one index array per client (into `arrays`); every client must be non-empty.
    min_capacity: smallest bucket (use the local batch size or a multiple of it).
    growth: ratio between consecutive bucket capacities.
    max_capacity: clients with more examples keep only their first `max_capacity` (None = keep all).
    names: optional client names.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray], parts: Sequence[np.ndarray], *,
               min_capacity: int = 16, growth: float = 2.0, max_capacity: int | None = None,
               names: Sequence[str] | None = None):
    if not parts:
      raise ValueError("no clients: the partition is empty")
    n = len(next(iter(arrays.values())))
    for k, v in arrays.items():
      if len(v) != n:
        raise ValueError(f"array {k!r} has {len(v)} rows, expected {n}")
    parts = [np.asarray(p, np.int64) for p in parts]
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
      raise ValueError(f"clients {empty[:10]} are empty; every client needs at least one example "
                       f"({len(empty)} empty of {len(parts)})")
    for p in parts:
      if p.min() < 0 or p.max() >= n:
        raise ValueError(f"partition indices must lie in [0, {n}), got [{p.min()}, {p.max()}]")
    if max_capacity is not None:
      parts = [p[:max_capacity] for p in parts]
    if names is not None and len(names) != len(parts):
      raise ValueError(f"{len(names)} names for {len(parts)} clients")
    self.names = tuple(names) if names is not None else None
    self.counts = np.asarray([len(p) for p in parts], np.int32)
    self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
    order = np.concatenate(parts)
    self.flat = {k: np.asarray(v)[order] for k, v in arrays.items()}
    self.capacities = bucket_capacities(int(self.counts.max()), min_capacity=min_capacity,
                                        growth=growth)

  @property
  def num_clients(self) -> int:
    return len(self.counts)

  @property
  def num_examples(self) -> int:
    return int(self.counts.sum())

  def capacity_for(self, ids: np.ndarray) -> int:
    """The smallest bucket capacity that holds every client in `ids`."""
    need = int(self.counts[ids].max())
    return next(c for c in self.capacities if c >= need)

  def gather(self, ids: np.ndarray, capacity: int | None = None) -> ClientData:
    """The padded ClientData of clients `ids` (repeats allowed), at `capacity` (default: bucket)."""
    ids = np.asarray(ids, np.int64)
    if ids.size == 0:
      raise ValueError("gather needs at least one client id")
    if ids.min() < 0 or ids.max() >= self.num_clients:
      raise ValueError(f"client ids must lie in [0, {self.num_clients}), got "
                       f"[{ids.min()}, {ids.max()}]")
    cap = self.capacity_for(ids) if capacity is None else int(capacity)
    counts = np.minimum(self.counts[ids], cap).astype(np.int32)
    pos = np.arange(cap)[None, :]
    valid = pos < counts[:, None]
    rows = np.where(valid, self.offsets[ids][:, None] + pos, 0)
    examples = {}
    for k, v in self.flat.items():
      x = v[rows]
      x[~valid] = 0
      examples[k] = x
    return ClientData(examples, counts)

  def client_examples(self, i: int) -> dict:
    """Client i's examples, unpadded."""
    a, b = self.offsets[i], self.offsets[i + 1]
    return {k: v[a:b] for k, v in self.flat.items()}
