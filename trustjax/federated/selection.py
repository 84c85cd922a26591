"""Client selection: which clients take part in a round, and the weight of each in the aggregate.

Every selector is a pure function of (seed, round), so a resumed run selects exactly the clients
the uninterrupted run would have. Weights are the aggregation weights the server uses:
`aggregate = sum_i w_i * delta_i` (rescaled by the server when selected clients drop out).

- `uniform`: m distinct clients uniformly at random; w_i = n_i / sum_selected n_j (FedAvg).
- `by_activity`: m draws with replacement with P(i) = p_i proportional to n_i^power (active devices
  are chosen more often); w_i = (n_i / N) / (m p_i), the importance (Hansen-Hurwitz) weights that
  make sum_i w_i delta_i an unbiased estimate of the full-participation average sum_i (n_i/N) delta_i.
- `poisson`: each client independently with probability q (what DP-FedAvg's accountant assumes),
  padded to a static number of slots; weights 1 for real slots, 0 for padding.
- `shuffled`: epochs of clients: each epoch a permutation of all clients, cut into cohorts of m
  (the last one padded), so every client takes part exactly once per epoch (what DP-FTRL's
  tree accounting assumes); weights 1 for real slots, 0 for padding.

References: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017 (FedAvg); Hansen and Hurwitz, "On the Theory of Sampling from Finite
Populations", Ann. Math. Stat. 1943 (unbiased weights for sampling with unequal probabilities).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from trustjax.privacy import sampling

SELECTIONS = ("uniform", "by_activity")


class Selection(NamedTuple):
  ids: np.ndarray  # int32 [slots]; padded slots hold id 0
  weights: np.ndarray  # float32 [slots]; 0 on padded slots
  overflow: int = 0  # Poisson only: clients sampled but dropped because slots ran out


def _check(counts: np.ndarray, num_selected: int) -> None:
  if len(counts) == 0:
    raise ValueError("no clients to select from")
  if (np.asarray(counts) <= 0).any():
    raise ValueError("every client needs a positive example count (empty clients?)")
  if not 1 <= num_selected:
    raise ValueError(f"clients per round must be >= 1, got {num_selected=}")


def activity_probabilities(counts: np.ndarray, power: float = 1.0) -> np.ndarray:
  """p_i proportional to counts_i ** power (power 0 = uniform, 1 = proportional to activity)."""
  if not power >= 0:
    raise ValueError(f"power must be >= 0, got {power=}")
  w = np.asarray(counts, np.float64) ** power
  return w / w.sum()


def uniform(seed: int, round_num: int, counts: np.ndarray, num_selected: int) -> Selection:
  """m distinct clients uniformly at random, FedAvg weights n_i / sum of selected n."""
  counts = np.asarray(counts)
  _check(counts, num_selected)
  if num_selected > len(counts):
    raise ValueError(f"more clients per round than clients: {num_selected=} > {len(counts)}")
  rng = np.random.default_rng([seed, round_num, 0])
  ids = np.sort(rng.choice(len(counts), size=num_selected, replace=False)).astype(np.int32)
  w = counts[ids].astype(np.float64)
  return Selection(ids, (w / w.sum()).astype(np.float32))


def by_activity(seed: int, round_num: int, counts: np.ndarray, num_selected: int, *,
                power: float = 1.0) -> Selection:
  """m draws with replacement, P(i) proportional to n_i^power, unbiased weights (n_i/N)/(m p_i)."""
  counts = np.asarray(counts)
  _check(counts, num_selected)
  p = activity_probabilities(counts, power)
  rng = np.random.default_rng([seed, round_num, 1])
  ids = np.sort(rng.choice(len(counts), size=num_selected, replace=True, p=p)).astype(np.int32)
  w = (counts[ids] / counts.sum()) / (num_selected * p[ids])
  return Selection(ids, w.astype(np.float32))


def poisson(seed: int, round_num: int, num_clients: int, rate: float, max_clients: int) -> Selection:
  """Poisson client sampling with static shape (see privacy.sampling for the overflow rule)."""
  b = sampling.poisson_batch(seed, round_num, num_clients, rate, max_clients)
  return Selection(b.indices.astype(np.int32), b.mask.astype(np.float32), b.overflow)


def rounds_per_epoch(num_clients: int, num_selected: int) -> int:
  """ceil(N / m): the rounds `shuffled` takes to visit every client once."""
  return -(-num_clients // num_selected)


def shuffled(seed: int, round_num: int, num_clients: int, num_selected: int,
             reshuffle: bool = True) -> Selection:
  """Round r's cohort of m clients: part r mod R of epoch r // R's permutation of the N clients
  (R = ceil(N / m)), padded with weight-0 slots to m; each client once per epoch. With
  `reshuffle=False` every epoch uses epoch 0's permutation: client i is in rounds t0, t0 + R,
  t0 + 2R, ... (what DP-MF's sensitivity assumes)."""
  if num_clients < 1:
    raise ValueError("no clients to select from")
  if not 1 <= num_selected <= num_clients:
    raise ValueError(f"clients per round must lie in [1, {num_clients} clients], got "
                     f"{num_selected=}")
  epoch, part = divmod(round_num, rounds_per_epoch(num_clients, num_selected))
  perm = np.random.default_rng([seed, epoch if reshuffle else 0, 2]).permutation(num_clients)
  ids = perm[part * num_selected:(part + 1) * num_selected]
  pad = num_selected - len(ids)
  return Selection(np.concatenate([np.sort(ids), np.zeros(pad, int)]).astype(np.int32),
                   np.concatenate([np.ones(len(ids)), np.zeros(pad)]).astype(np.float32))


def select(kind: str, seed: int, round_num: int, counts: np.ndarray, num_selected: int, *,
           power: float = 1.0) -> Selection:
  """Dispatches on `kind` in SELECTIONS."""
  if kind == "uniform":
    return uniform(seed, round_num, counts, num_selected)
  if kind == "by_activity":
    return by_activity(seed, round_num, counts, num_selected, power=power)
  raise ValueError(f"selection must be one of {SELECTIONS}, got {kind!r}")
