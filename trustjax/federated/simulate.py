"""The round function, its sharding over a "clients" mesh axis, faults, federated evaluation and
the continual-data store.

`run_round(algorithm, state, clients, rng)` is `algorithm.apply` jitted once per algorithm; with
`mesh` the cohort's client axis is split over the mesh axis "clients" (the server state is
replicated), so each device trains its share of the clients and XLA inserts the reduction of the
weighted sum. On several hosts, call `jax.distributed.initialize()` first and build the mesh over
`jax.devices()` (all processes' devices); nothing else changes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from trustjax import sharding
from trustjax.federated import algorithms
from trustjax.federated.algorithms import Cohort, FederatedAlgorithm, ServerState
from trustjax.federated.client_data import ClientData, ClientStore
from trustjax.federated.selection import Selection
from trustjax.types import Params, PRNGKey

CLIENTS_AXIS = algorithms.CLIENTS_AXIS


def client_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh named "clients" over the first `num_devices` devices (default: all)."""
  return sharding.data_mesh(num_devices, axis=CLIENTS_AXIS)


@functools.lru_cache(maxsize=64)
def _jitted(apply: Callable, mesh: Mesh | None = None) -> Callable:
  def traced(state, clients, rng):
    with algorithms.sharded_clients(mesh):
      return apply(state, clients, rng)

  return jax.jit(traced)


def run_round(algorithm: FederatedAlgorithm, state: ServerState, clients: Cohort, rng: PRNGKey, *,
              mesh: Mesh | None = None) -> tuple[ServerState, dict]:
  """One federated round: `algorithm.apply` compiled once per cohort shape.

  Args:
    algorithm: a FederatedAlgorithm.
    state: server state (replicated over `mesh`).
    clients: the round's Cohort (slots must be a multiple of the mesh size; see `pad_cohort`).
    rng: the round's key.
    mesh: optional mesh with axis "clients".
  """
  if mesh is not None:
    clients = shard_cohort(clients, mesh)
    state = sharding.replicate(state, mesh)
  return _jitted(algorithm.apply, mesh)(state, clients, rng)


def shard_cohort(cohort: Cohort, mesh: Mesh) -> Cohort:
  """Places the cohort split along its client axis over the mesh axis "clients"."""
  n = mesh.shape[CLIENTS_AXIS]
  k = cohort.counts.shape[0]
  if k % n:
    raise ValueError(f"{k} client slots are not divisible by the {n} devices of the mesh; "
                     f"pad_cohort(cohort, multiple_of={n}) first")
  return jax.device_put(cohort, NamedSharding(mesh, P(CLIENTS_AXIS)))


def pad_cohort(cohort: Cohort, multiple_of: int) -> Cohort:
  """Appends zero-weight, zero-work slots (ignored by every algorithm) up to a multiple."""
  k = cohort.counts.shape[0]
  extra = (-k) % multiple_of
  if not extra:
    return cohort
  pad = lambda x: np.concatenate([np.asarray(x), np.zeros((extra,) + np.shape(x)[1:],
                                                          np.asarray(x).dtype)])
  ex = {name: pad(v) for name, v in cohort.examples.items()}
  counts = np.concatenate([np.asarray(cohort.counts), np.ones(extra, np.int32)])
  return Cohort(ex, counts, pad(cohort.ids), pad(cohort.weights), pad(cohort.work))


# ----------------------------------------------------------------------------- faults


@dataclasses.dataclass(frozen=True, kw_only=True)
class Faults:
  """Per-round client failures.

  Attributes:
    dropout: probability that a selected client sends nothing (work 0).
    straggler: probability that a selected client completes only part of its local steps.
    straggler_min_work: a straggler's completed fraction is uniform in [straggler_min_work, 1).
  """

  dropout: float = 0.0
  straggler: float = 0.0
  straggler_min_work: float = 0.1

  def __post_init__(self):
    for name in ("dropout", "straggler"):
      v = getattr(self, name)
      if not 0.0 <= v < 1.0:
        raise ValueError(f"{name} probability must lie in [0, 1), got {name}={v}")
    if not 0.0 < self.straggler_min_work <= 1.0:
      raise ValueError(f"straggler_min_work must lie in (0, 1], got {self.straggler_min_work=}")

  def work(self, seed: int, round_num: int, num_slots: int) -> np.ndarray:
    """float32 [slots]: 0 dropped, (0, 1) straggler, 1 full; a pure function of (seed, round)."""
    rng = np.random.default_rng([seed, round_num, 7])
    work = np.ones(num_slots, np.float32)
    strag = rng.random(num_slots) < self.straggler
    work[strag] = rng.uniform(self.straggler_min_work, 1.0, strag.sum())
    work[rng.random(num_slots) < self.dropout] = 0.0
    return work


def make_cohort(store: ClientStore, selection: Selection, work: np.ndarray | None = None, *,
                capacity: int | None = None, multiple_of: int = 1) -> Cohort:
  """Gathers the selected clients' padded examples into a Cohort (padded to `multiple_of` slots)."""
  data: ClientData = store.gather(selection.ids, capacity)
  k = len(selection.ids)
  work = np.ones(k, np.float32) if work is None else np.asarray(work, np.float32)
  cohort = Cohort(data.examples, data.counts, np.asarray(selection.ids, np.int32),
                  np.asarray(selection.weights, np.float32), work)
  return pad_cohort(cohort, multiple_of)


# ----------------------------------------------------------------------------- evaluation


def federated_evaluate(metrics_fn: Callable[[Params, dict], dict], params: Params,
                       store: ClientStore, *, clients_per_call: int = 64,
                       capacity: int | None = None, max_rows: int = 2048,
                       mesh: Mesh | None = None) -> dict:
  """Evaluates on every client (vmapped over clients, sums with a denominator per client), then
  reduces: example-weighted means over all clients' examples.

  Memory is bounded: one compiled call sees at most `clients_per_call` clients (no more than the
  store holds) and `max_rows` example slots in all; a chunk of clients whose bucket is wider is
  evaluated in slices of its example axis, and the slices' outputs are added (every output of
  `metrics_fn` must be a sum over examples, as loss_sum, correct and count are). With `mesh`
  (the rounds' "clients" mesh), each call's clients are split over its devices (the chunk
  rounded up to a multiple of their number). Without one, the mesh that `params` are replicated
  over, if any (`sharding.replicated_mesh`), is used: otherwise every one of its devices would
  evaluate every client.

  Returns:
    {"loss", "accuracy" (if the metrics have "correct"), "count", "client_accuracy_mean",
     "client_accuracy_p10", "client_accuracy_sd"} (the last three: unweighted over clients with
     examples, where "correct" exists; sd is the population standard deviation, as q-FFL's
     fairness is measured).
  """
  if clients_per_call < 1 or max_rows < 1:
    raise ValueError(f"clients_per_call and max_rows must be >= 1, got {clients_per_call=}, "
                     f"{max_rows=}")
  fn = _eval_fn(metrics_fn)
  k = min(clients_per_call, store.num_clients)
  if mesh is None:
    mesh = sharding.replicated_mesh(params)
  if mesh is not None:
    per = mesh.shape[mesh.axis_names[0]]
    k = -(-k // per) * per
    params = sharding.replicate(params, mesh)
    place = lambda tree: sharding.shard_batch(tree, mesh, mesh.axis_names[0])
  else:
    place = lambda tree: tree
  per_client = []
  order = np.argsort(store.counts, kind="stable")  # similar sizes share a bucket
  for a in range(0, store.num_clients, k):
    ids = order[a:a + k]
    ids_padded = np.concatenate([ids, np.full(k - len(ids), ids[0])])
    cap = store.capacity_for(ids_padded) if capacity is None else int(capacity)
    width = min(cap, max(1, max_rows // k))
    # gathered to a multiple of the slice width (so every slice has the compiled shape), the
    # counts still cut at `cap`
    data = store.gather(ids_padded, -(-cap // width) * width)
    counts = np.minimum(data.counts, cap)
    sums = None
    for start in range(0, cap, width):
      part = {name: x[:, start:start + width] for name, x in data.examples.items()}
      in_slice = np.clip(counts - start, 0, width).astype(np.int32)
      out = jax.device_get(fn(params, *place((part, in_slice))))
      sums = out if sums is None else {n: sums[n] + out[n] for n in sums}
    per_client.append({n: np.asarray(v)[:len(ids)] for n, v in sums.items()})
  tot = {k: np.concatenate([p[k] for p in per_client]) for k in per_client[0]}
  count = tot["count"].sum()
  out = {"loss": float(tot["loss_sum"].sum() / count), "count": float(count)}
  if "correct" in tot:
    out["accuracy"] = float(tot["correct"].sum() / count)
    acc = (tot["correct"] / np.maximum(tot["count"], 1))[tot["count"] > 0]
    out["client_accuracy_mean"] = float(acc.mean())
    out["client_accuracy_p10"] = float(np.percentile(acc, 10))
    out["client_accuracy_sd"] = float(acc.std())
  return out


@functools.lru_cache(maxsize=16)
def _eval_fn(metrics_fn):
  def one(params, examples, count):
    cap = next(iter(examples.values())).shape[0]
    batch = dict(examples, mask=jnp.arange(cap) < count)
    return metrics_fn(params, batch)

  return jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))


# ----------------------------------------------------------------------------- continual data


STORAGE_POLICIES = ("fifo", "random")


def continual_parts(client_of: np.ndarray, period_of: np.ndarray, period: int, *, budget: int,
                    policy: str = "fifo", seed: int = 0) -> list[np.ndarray]:
  """What each device holds at the end of `period` when data arrives over time.

  Device d receives its examples of periods 0..period in order; after each arrival it keeps at
  most `budget` examples, deleting the oldest ("fifo") or uniformly random ones ("random").

  Args:
    client_of: int [n] device of each example (0..K-1).
    period_of: int [n] arrival period of each example.
    period: the period at whose end the stores are taken.
    budget: storage budget per device (>= 1).
    policy: "fifo" or "random".
    seed: seed of the random deletions (a pure function of (seed, device, period)).

  Returns:
    K index arrays (possibly empty for devices that have no data yet).
  """
  if budget < 1:
    raise ValueError(f"storage budget must be >= 1 example, got {budget=}")
  if policy not in STORAGE_POLICIES:
    raise ValueError(f"storage policy must be one of {STORAGE_POLICIES}, got {policy=}")
  client_of = np.asarray(client_of)
  period_of = np.asarray(period_of)
  num_clients = int(client_of.max()) + 1
  held: list[np.ndarray] = [np.empty(0, np.int64) for _ in range(num_clients)]
  for t in range(period + 1):
    arriving = np.flatnonzero(period_of == t)
    by_client = {}
    for i in arriving:
      by_client.setdefault(int(client_of[i]), []).append(i)
    for d, idx in by_client.items():
      h = np.concatenate([held[d], np.asarray(idx, np.int64)])
      if len(h) > budget:
        if policy == "fifo":
          h = h[-budget:]
        else:
          rng = np.random.default_rng([seed, d, t])
          h = np.sort(rng.choice(h, size=budget, replace=False))
      held[d] = h
  return held
