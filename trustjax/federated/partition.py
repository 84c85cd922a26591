"""Partitioners: how a pooled dataset is split into clients (the FedNLP non-IID settings).

Every partitioner is a pure function of its arguments and `seed` and returns a list of index
arrays, one per client, each sorted. Together they cover every example exactly once (except
`natural`, which covers exactly the examples it is given).

Reference: Lin et al., "FedNLP: Benchmarking Federated Learning Methods for Natural Language
Processing Tasks", Findings of NAACL 2022 (label skew Dir(alpha * p), quantity skew Dir(beta),
feature clusters by k-means on sentence embeddings); Hsu et al., "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification", 2019 (the Dirichlet prior
alpha * p).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _check(n: int, num_clients: int) -> None:
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients=}")
  if num_clients > n:
    raise ValueError(f"more clients than examples: {num_clients=} > {n} examples; every client "
                     f"needs at least one example")


def _positive(**kw) -> None:
  for k, v in kw.items():
    if not v > 0:
      raise ValueError(f"{k} must be > 0, got {k}={v}")


def _equal_sizes(n: int, num_clients: int) -> np.ndarray:
  sizes = np.full(num_clients, n // num_clients, np.int64)
  sizes[:n % num_clients] += 1
  return sizes


def iid(num_examples: int, num_clients: int, *, seed: int = 0) -> list[np.ndarray]:
  """A uniformly random split into clients of (almost) equal size."""
  _check(num_examples, num_clients)
  perm = np.random.default_rng(seed).permutation(num_examples)
  bounds = np.concatenate([[0], np.cumsum(_equal_sizes(num_examples, num_clients))])
  return [np.sort(perm[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def quantity_skew(num_examples: int, num_clients: int, *, beta: float,
                  seed: int = 0) -> list[np.ndarray]:
  """Client sizes ~ 1 + Multinomial(n - K, Dir(beta * 1_K)); examples assigned at random.

  Small beta: a few clients hold most examples; large beta: near-equal sizes.
  """
  _check(num_examples, num_clients)
  _positive(beta=beta)
  rng = np.random.default_rng(seed)
  props = rng.dirichlet(np.full(num_clients, beta))
  sizes = 1 + rng.multinomial(num_examples - num_clients, props)
  perm = rng.permutation(num_examples)
  bounds = np.concatenate([[0], np.cumsum(sizes)])
  return [np.sort(perm[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def dirichlet_label(labels: np.ndarray, num_clients: int, *, alpha: float, seed: int = 0,
                    sizes: Sequence[int] | None = None) -> list[np.ndarray]:
  """Label skew: client k's label distribution q_k ~ Dir(alpha * p), p the global distribution.

  Clients (of equal size unless `sizes` is given) are filled in random order by drawing labels
  from q_k among the examples still unassigned; when a label runs out, q_k is renormalised over the
  labels left. Small alpha: each client sees few labels; large alpha: close to iid.

  Args:
    labels: int [n] (class or cluster ids).
    num_clients: K.
    alpha: concentration (> 0).
    seed: random seed.
    sizes: optional client sizes summing to n.
  """
  labels = np.asarray(labels)
  n = len(labels)
  _check(n, num_clients)
  _positive(alpha=alpha)
  rng = np.random.default_rng(seed)
  classes, y = np.unique(labels, return_inverse=True)
  prior = np.bincount(y, minlength=len(classes)) / n
  if sizes is None:
    sizes = _equal_sizes(n, num_clients)
  sizes = np.asarray(sizes, np.int64)
  if len(sizes) != num_clients or sizes.sum() != n or sizes.min() < 1:
    raise ValueError(f"sizes must be {num_clients} positive ints summing to {n}")
  pools = [rng.permutation(np.flatnonzero(y == c)) for c in range(len(classes))]
  left = np.asarray([len(p) for p in pools], np.int64)
  used = np.zeros(len(classes), np.int64)
  parts: list[np.ndarray] = [np.empty(0, np.int64)] * num_clients
  for k in rng.permutation(num_clients):
    q = rng.dirichlet(alpha * prior)
    take = np.zeros(len(classes), np.int64)
    need = sizes[k]
    while need > 0:
      avail = left - take
      probs = np.where(avail > 0, q, 0.0)
      if probs.sum() <= 0:
        probs = (avail > 0).astype(float)
      draw = np.minimum(rng.multinomial(need, probs / probs.sum()), avail)
      take += draw
      need -= draw.sum()
    idx = [pools[c][used[c]:used[c] + take[c]] for c in range(len(classes))]
    used += take
    left -= take
    parts[k] = np.sort(np.concatenate(idx))
  return parts


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, iters: int = 100) -> np.ndarray:
  """Lloyd's k-means with k-means++ seeding (float64 numpy); returns cluster ids [n].

  Reference: Arthur and Vassilvitskii, "k-means++: The Advantages of Careful Seeding", SODA 2007.
  """
  x = np.asarray(x, np.float64)
  if not 1 <= k <= len(x):
    raise ValueError(f"num_clusters must lie in [1, {len(x)}], got {k}")
  rng = np.random.default_rng(seed)
  centers = [x[rng.integers(len(x))]]
  d2 = ((x - centers[0]) ** 2).sum(1)
  for _ in range(1, k):
    p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1 / len(x))
    centers.append(x[rng.choice(len(x), p=p)])
    d2 = np.minimum(d2, ((x - centers[-1]) ** 2).sum(1))
  c = np.stack(centers)
  assign = np.full(len(x), -1)
  for _ in range(iters):
    dist = (x ** 2).sum(1)[:, None] - 2 * x @ c.T + (c ** 2).sum(1)[None]
    new = dist.argmin(1)
    if np.array_equal(new, assign):
      break
    assign = new
    for j in range(k):
      members = x[assign == j]
      if len(members):
        c[j] = members.mean(0)
  return assign


def feature_clusters(embeddings: np.ndarray, num_clients: int, *, num_clusters: int, alpha: float,
                     seed: int = 0) -> list[np.ndarray]:
  """Feature skew: k-means on sentence embeddings [n, d], then label skew (Dir(alpha * p)) over
  the cluster ids, so each client's inputs come from few regions of the embedding space."""
  _check(len(embeddings), num_clients)
  _positive(alpha=alpha)
  clusters = kmeans(embeddings, num_clusters, seed=seed)
  return dirichlet_label(clusters, num_clients, alpha=alpha, seed=seed + 1)


def natural(group_ids: np.ndarray, *, min_examples: int = 1) -> tuple[list[np.ndarray], np.ndarray]:
  """One client per distinct id (user, device or speaking role), ids in increasing order.

  Returns:
    (parts, ids): index arrays and the id of each client; groups with fewer than `min_examples`
    examples are dropped.
  """
  group_ids = np.asarray(group_ids)
  if group_ids.size == 0:
    raise ValueError("natural partition of an empty dataset")
  uniq, inv = np.unique(group_ids, return_inverse=True)
  order = np.argsort(inv, kind="stable")
  bounds = np.concatenate([[0], np.cumsum(np.bincount(inv, minlength=len(uniq)))])
  parts = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
  keep = [i for i, p in enumerate(parts) if len(p) >= min_examples]
  if not keep:
    raise ValueError(f"no group has >= {min_examples=} examples")
  return [parts[i] for i in keep], uniq[keep]


# ----------------------------------------------------------------------------- statistics


def label_divergence(labels: np.ndarray, parts: Sequence[np.ndarray]) -> float:
  """Mean total-variation distance between each client's label distribution and the global one."""
  labels = np.asarray(labels)
  classes, y = np.unique(labels, return_inverse=True)
  glob = np.bincount(y, minlength=len(classes)) / len(y)
  tvs = [0.5 * np.abs(np.bincount(y[p], minlength=len(classes)) / len(p) - glob).sum()
         for p in parts]
  return float(np.mean(tvs))


def size_spread(parts: Sequence[np.ndarray]) -> float:
  """Coefficient of variation (std / mean) of client sizes."""
  sizes = np.asarray([len(p) for p in parts], np.float64)
  return float(sizes.std() / sizes.mean())
