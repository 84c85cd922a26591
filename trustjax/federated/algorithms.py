"""Federated algorithms in optax's shape: `FederatedAlgorithm(init, apply)`.

`init(params) -> ServerState`; `apply(state, cohort, key) -> (state, metrics)` runs one round:
every client of the cohort trains locally (a loop over its padded batches inside `vmap` over
clients, optionally over size-sorted chunks of clients: one compiled program for the whole
cohort), the server rejects non-finite updates, aggregates the rest with the selection's weights
and applies its optimizer to the pseudo-gradient -(aggregate update).

Clients run plain SGD (learning rate `client_lr`) on minibatches of `batch_size` for
`local_epochs` passes over their data; padded rows and padded steps change nothing.

References:
  McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
  AISTATS 2017 (FedAvg).
  Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020 (FedProx).
  Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (FedOpt: FedAdam, FedYogi, FedAdagrad).
  Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning", ICML 2020.
  McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018 (DP-FedAvg).
  Andrew et al., "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021.
  Kairouz et al., "Practical and Private (Deep) Learning without Sampling or Shuffling", ICML
  2021 (DP-FTRL).
  Kalinin and Lampert, "Banded Square Root Matrix Factorization for Differentially Private Model
  Training", NeurIPS 2024 (the factorization of DP-MF).
  Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018
  (coordinate-wise median and trimmed mean).
  Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
  NeurIPS 2017 (Krum, Multi-Krum; the Gaussian Byzantine client).
  El Mhamdi, Guerraoui and Rouault, "The Hidden Vulnerability of Distributed Learning in
  Byzantium", ICML 2018 (Bulyan).
  Li, Sanjabi, Beirami and Smith, "Fair Resource Allocation in Federated Learning", ICLR 2020
  (q-FFL, q-FedAvg).
  Li et al., "RSA: Byzantine-Robust Stochastic Aggregation Methods for Distributed Learning from
  Heterogeneous Datasets", AAAI 2019 (the sign-flipping client).
"""

from __future__ import annotations

import contextlib
import dataclasses
import contextvars
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from trustjax.privacy import noise, quantile
from trustjax.privacy.dp_ftrl import add_residual_noise
from trustjax.privacy.dp_mf import bsr_coefficients, correlated_noise, empty_history
from trustjax.types import LossFn, Params, PRNGKey

tmap = jax.tree_util.tree_map


class Cohort(NamedTuple):
  """The clients of one round (leading axis k = slots).

  Attributes:
    examples: name -> [k, capacity, ...] padded examples.
    counts: int32 [k] real examples per client.
    ids: int32 [k] client ids (index into per-client server state, e.g. SCAFFOLD controls).
    weights: float32 [k] aggregation weights (0 = padding slot).
    work: float32 [k] fraction of local steps the client completes: 1 = all, in (0, 1) = a
      straggler, 0 = dropped out (no update).
  """

  examples: dict
  counts: jax.Array
  ids: jax.Array
  weights: jax.Array
  work: jax.Array


class ServerState(NamedTuple):
  params: Params  # the global model
  opt_state: optax.OptState  # server optimizer state
  round: jax.Array  # int32 []: rounds applied so far
  extra: Any  # algorithm-specific: SCAFFOLD controls, DP-FedAvg clip norm; () otherwise


class FederatedAlgorithm(NamedTuple):
  init: Callable[[Params], ServerState]
  apply: Callable[[ServerState, Cohort, PRNGKey], tuple[ServerState, dict]]


# ----------------------------------------------------------------------------- the client


class LocalResult(NamedTuple):
  params: Params  # the client's model after local training
  loss_sum: jax.Array  # sum over its local steps of the minibatch mean loss
  steps: jax.Array  # int32: local steps taken


def local_train(params: Params, examples: dict, count: jax.Array, key: PRNGKey, work: jax.Array,
                correction: Params | None = None, *, loss_fn: LossFn, client_lr: float,
                batch_size: int, local_epochs: int, prox_mu: float = 0.0) -> LocalResult:
  """Local SGD of one client (no client axis; vmap this).

  A client with n examples takes ceil(n / batch_size) steps per epoch (each epoch a fresh
  permutation of its n examples) for local_epochs epochs, and a straggler only the first
  ceil(work * all) of those; a client with no examples or no work takes none.

  Args:
    params: the global model (the starting point).
    examples: name -> [capacity, ...].
    count: number of real examples n.
    key: the client's PRNG key for this round.
    work: fraction of its steps the client completes (0 = none).
    correction: optional pytree added to every gradient (SCAFFOLD's c - c_i).
    loss_fn: `loss_fn(params, batch) -> [b]` per-example losses.
    client_lr: SGD learning rate.
    batch_size: local minibatch size.
    local_epochs: passes over the client's data.
    prox_mu: FedProx proximal weight: the gradient gains mu * (w - w_global).
  """
  examples = tmap(jnp.asarray, examples)
  capacity = next(iter(examples.values())).shape[0]
  spe = -(-capacity // batch_size)  # most steps per epoch any client of this capacity takes
  count = count.astype(jnp.int32)
  own = (count + batch_size - 1) // batch_size  # this client's steps per epoch
  limit = jnp.where((work > 0) & (own > 0), jnp.maximum(1, jnp.ceil(work * local_epochs * own)),
                    0).astype(jnp.int32)
  keys = jax.random.split(key, local_epochs)
  pos = jnp.arange(spe * batch_size)

  def perm(k):
    u = jnp.where(pos < count, jax.random.uniform(k, pos.shape), 2.0 + pos)
    return jnp.argsort(u).astype(jnp.int32)

  perms = jax.vmap(perm)(keys)  # [epochs, spe * batch]; real rows first
  w0 = params
  safe_own = jnp.maximum(own, 1)

  def step(carry):
    p, loss_acc, t = carry
    # The t-th step the client takes: epoch t // own, minibatch t % own of that epoch's permutation.
    epoch, i = t // safe_own, t % safe_own
    rows = jax.lax.dynamic_slice(perms[epoch], (i * batch_size,), (batch_size,))
    mask = (i * batch_size + jnp.arange(batch_size)) < count
    rows = jnp.where(mask, rows, 0)
    batch = tmap(lambda x: x[rows], examples)

    def mean_loss(q):
      per = loss_fn(q, batch)
      m = mask.astype(per.dtype)
      return (per * m).sum() / jnp.maximum(m.sum(), 1.0)

    loss, g = jax.value_and_grad(mean_loss)(p)
    if prox_mu:
      g = tmap(lambda gi, pi, wi: gi + prox_mu * (pi - wi), g, p, w0)
    if correction is not None:
      g = tmap(jnp.add, g, correction)
    p = tmap(lambda pi, gi: pi - client_lr * gi.astype(pi.dtype), p, g)
    return p, loss_acc + loss, t + 1

  # The first step starts from the server's model, which every client shares: taken before the
  # loop, its forward and input-gradient products use one weight matrix for all clients under
  # vmap (one product for the chunk instead of one per client; 16% off a round of LSTM 128 in
  # BENCHMARKS.md). It is computed for every client and kept where limit > 0 (a select, which is
  # what a batched lax.cond would become). Then a while loop of exactly the remaining steps:
  # under vmap it runs as many iterations as the busiest client of the batch needs (the others
  # are masked by the batching rule), so a cohort whose clients are processed in size-sorted
  # chunks (see `_run_clients`) does not pay for padding.
  init = (params, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
  init = tmap(lambda stepped, unchanged: jnp.where(limit > 0, stepped, unchanged), step(init), init)
  p, loss_sum, steps = jax.lax.while_loop(lambda c: c[2] < limit, step, init)
  return LocalResult(p, loss_sum, steps)


def _tree_sq_norm(tree) -> jax.Array:
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree))


def _rows(v: jax.Array, d: jax.Array) -> jax.Array:
  """A per-client vector [k] shaped to broadcast over the rows of a client-stacked leaf d."""
  return v.reshape((-1,) + (1,) * (d.ndim - 1))


def _masked_sq_norms(deltas: Params, mask: jax.Array) -> jax.Array:
  """float32 [k]: each client's squared update norm over all parameters, 0 where mask is False
  (whose rows may be NaN)."""
  return jax.vmap(_tree_sq_norm)(tmap(lambda d: jnp.where(_rows(mask, d), d, 0.0), deltas))


def _finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def _weighted_sum(deltas: Params, w: jax.Array) -> Params:
  """sum_i w_i delta_i over the leading axis; zero-weight rows (maybe NaN) contribute exactly 0."""
  return tmap(lambda d: jnp.tensordot(w, jnp.where(
      _rows(w > 0, d), d, 0.0).astype(jnp.float32), axes=1), deltas)


def _local_fn(loss_fn, client_lr, batch_size, local_epochs, prox_mu=0.0):
  return functools.partial(local_train, loss_fn=loss_fn, client_lr=client_lr, batch_size=batch_size,
                           local_epochs=local_epochs, prox_mu=prox_mu)


def _check_client(client_lr, batch_size, local_epochs, client_chunk=None):
  if not client_lr > 0:
    raise ValueError(f"client_lr must be positive, got {client_lr=}")
  if batch_size < 1 or local_epochs < 1:
    raise ValueError(f"batch_size and local_epochs must be >= 1, got {batch_size=}, {local_epochs=}")
  if client_chunk is not None and client_chunk < 1:
    raise ValueError(f"client_chunk must be >= 1 or None, got {client_chunk=}")


_CLIENT_MESH = contextvars.ContextVar("trustjax_client_mesh", default=None)
CLIENTS_AXIS = "clients"


@contextlib.contextmanager
def sharded_clients(mesh):
  """While a round is traced inside this context, `client_chunk` runs on each device of `mesh`
  (a jax.sharding.Mesh with axis "clients", or None) separately, through `jax.shard_map`: each
  device sorts and chunks its own contiguous block of the cohort, so no client moves between
  devices and each device's loops and skipped chunks are its own. `simulate.run_round` sets it."""
  token = _CLIENT_MESH.set(mesh)
  try:
    yield
  finally:
    _CLIENT_MESH.reset(token)


def _run_clients(local, params, cohort: Cohort, key, corrections=None, client_chunk=None,
                 byzantine: Byzantine | None = None):
  """Runs `local` on every client of the cohort; returns (deltas [k, ...], LocalResult, accepted
  [k], finite [k]).

  With `byzantine`, the updates of its clients are replaced by what they send instead (see
  `Byzantine`) before anything checks or aggregates them.

  client_chunk None (or >= k): one vmap over all k clients. Otherwise the clients are sorted by
  their amount of local work and run `client_chunk` at a time (`lax.map` with vmap inside), so
  each chunk's loop runs only as long as its busiest client (padding steps are not computed) and
  only one chunk's models are live at once (bounds memory; keeps the chunk's weights in cache on a
  CPU), and a chunk in which no client has work (dropped clients, the empty slots that pad a
  Poisson-sampled DP-FedAvg cohort) is skipped. Under `sharded_clients(mesh)` this happens on
  each of the mesh's n devices for its own block of k / n clients (`jax.shard_map`). Each client
  gets the same key and the same result either way.
  """
  k = cohort.counts.shape[0]
  keys = jax.random.split(key, k)
  vlocal = jax.vmap(local, in_axes=(None, 0, 0, 0, 0, None if corrections is None else 0))
  args = (cohort.examples, cohort.counts, keys, cohort.work, corrections)
  mesh = _CLIENT_MESH.get()
  shards = 1 if mesh is None else mesh.shape[CLIENTS_AXIS]
  shards = shards if k % shards == 0 else 1
  if client_chunk is None or client_chunk >= k // shards:
    res = vlocal(params, *args)
  else:
    def one_chunk(p, chunk):
      _, counts, _, work, _ = chunk
      c = counts.shape[0]
      idle = LocalResult(tmap(lambda x: jnp.broadcast_to(x, (c,) + x.shape), p),
                         jnp.zeros((c,), jnp.float32), jnp.zeros((c,), jnp.int32))
      # A chunk in which no client has work (dropped clients, empty padding slots) costs nothing;
      # the result is what local_train returns for such clients.
      return jax.lax.cond(jnp.any((counts > 0) & (work > 0)), lambda ch: vlocal(p, *ch),
                          lambda ch: idle, chunk)

    def one_block(p, block):
      _, counts, _, work, _ = block
      per = counts.shape[0]
      c = min(client_chunk, per)
      n_chunks = -(-per // c)
      order = jnp.argsort(-(counts * (work > 0)), stable=True)
      # Sorted, then padded to whole chunks of `c` with copies of the last client given no work.
      idx = jnp.concatenate([order, jnp.full((n_chunks * c - per,), order[-1])])
      examples, counts, keys, work, corr = tmap(lambda x: x[idx], block)
      work = jnp.where(jnp.arange(n_chunks * c) < per, work, 0.0)
      padded = (examples, counts, keys, work, corr)
      res = jax.lax.map(lambda ch: one_chunk(p, ch),
                        tmap(lambda x: x.reshape((n_chunks, c) + x.shape[1:]), padded))
      res = tmap(lambda x: x.reshape((n_chunks * c,) + x.shape[2:])[:per], res)
      return tmap(lambda x: jnp.zeros_like(x).at[order].set(x), res)

    if shards == 1:
      res = one_block(params, args)
    else:  # each device runs its own block: its own loops, conditionals and skipped chunks
      spec = jax.sharding.PartitionSpec(CLIENTS_AXIS)
      res = jax.shard_map(one_block, mesh=mesh, in_specs=(jax.sharding.PartitionSpec(), spec),
                          out_specs=spec, check_vma=False)(params, args)
  deltas = tmap(lambda new, old: new - old[None], res.params, params)
  if byzantine is not None:
    deltas = byzantine.corrupt(deltas, cohort.ids, jax.random.fold_in(key, 0x42595a))
  finite = jax.vmap(_finite)(deltas) & jnp.isfinite(res.loss_sum)
  accepted = finite & (cohort.weights > 0) & (cohort.work > 0) & (res.steps > 0)
  return deltas, res, accepted, finite


def _round_metrics(cohort, res, accepted, finite, agg, byzantine=None) -> dict:
  real = cohort.weights > 0
  fa = accepted.astype(jnp.float32)
  extra = {}
  if byzantine is not None:  # Byzantine updates the server took in (it cannot tell them apart)
    extra["clients_byzantine"] = (accepted & byzantine.mask(cohort.ids)).sum().astype(jnp.float32)
  return {**extra,
      "clients_accepted": fa.sum(),
      "clients_rejected_nonfinite": (real & (cohort.work > 0) & ~finite).sum().astype(jnp.float32),
      "clients_dropped": (real & (cohort.work <= 0)).sum().astype(jnp.float32),
      "train_loss_sum": jnp.where(accepted, res.loss_sum, 0.0).sum(),
      "train_loss_steps": jnp.where(accepted, res.steps, 0).sum().astype(jnp.float32),
      "update_norm": jnp.sqrt(_tree_sq_norm(agg)),
  }


def aggregate(deltas: Params, weights: jax.Array, accepted: jax.Array) -> Params:
  """sum_{accepted} w_i delta_i, rescaled by (sum of all weights) / (sum of accepted weights) so
  that dropped or rejected clients do not shrink the step; 0 when nobody is accepted."""
  w_acc = jnp.where(accepted, weights, 0.0)
  scale = jnp.where(w_acc.sum() > 0, weights.sum() / jnp.maximum(w_acc.sum(), 1e-30), 0.0)
  return _weighted_sum(deltas, w_acc * scale)


# ----------------------------------------------------------------------------- Byzantine clients

BYZANTINE_ATTACKS = ("sign_flip", "gaussian", "backdoor")


@dataclasses.dataclass(frozen=True, eq=False)
class Byzantine:
  """Malicious clients, simulated: whenever one of `ids` is in a cohort and trains, it sends

  - "sign_flip": -scale times its honest update (the sign-flipping client of Li et al. 2019);
  - "gaussian": independent N(0, scale^2) noise in every coordinate, whatever its data
    (Blanchard et al. 2017's Gaussian Byzantine client),
  - "backdoor": scale times the update it trained on its own (poisoned) data: the boosted
    update of Bagdasaryan et al., "How To Backdoor Federated Learning", AISTATS 2020 (scale =
    clients per round / server learning rate replaces the global model by the attacker's; 1 =
    plain data poisoning). The poisoning itself is in the client's data (`attacks.backdoor`),

  instead of its update. A Byzantine client that drops out sends nothing, like any other. Build
  with `make_byzantine`, which checks the values.

  Attributes:
    ids: int32 [m] the malicious clients' ids (indices into the ClientStore, as Cohort.ids).
    attack: one of BYZANTINE_ATTACKS.
    scale: the attack's magnitude (> 0).
  """

  ids: jax.Array
  attack: str
  scale: float

  def mask(self, client_ids: jax.Array) -> jax.Array:
    """bool [k]: which slots hold a malicious client."""
    return jnp.isin(client_ids, self.ids)

  def corrupt(self, deltas: Params, client_ids: jax.Array, key: PRNGKey) -> Params:
    """The updates as the server receives them: malicious slots replaced by their attack."""
    bad = self.mask(client_ids)
    leaves, treedef = jax.tree_util.tree_flatten(deltas)
    out = []
    for i, d in enumerate(leaves):
      if self.attack == "sign_flip":
        sent = -self.scale * d
      elif self.attack == "backdoor":
        sent = self.scale * d
      else:
        sent = self.scale * jax.random.normal(jax.random.fold_in(key, i), d.shape, d.dtype)
      out.append(jnp.where(_rows(bad, d), sent, d))
    return jax.tree_util.tree_unflatten(treedef, out)


def make_byzantine(ids, attack: str = "sign_flip", scale: float = 4.0) -> Byzantine | None:
  """A checked `Byzantine` (None when `ids` is empty: no malicious clients)."""
  if attack not in BYZANTINE_ATTACKS:
    raise ValueError(f"Byzantine attack must be one of {BYZANTINE_ATTACKS}, got {attack!r}")
  if not scale > 0:
    raise ValueError(f"Byzantine attack scale must be positive, got {scale=}")
  ids = jnp.asarray(ids, jnp.int32).reshape(-1)
  return Byzantine(ids, attack, float(scale)) if ids.size else None


# ----------------------------------------------------------------------------- robust aggregation

AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "norm_bound",
               "rlr")


def check_aggregator(aggregator: str, robust_fraction: float, norm_bound: float | None = None,
                     rlr_threshold: int | None = None) -> None:
  if aggregator not in AGGREGATORS:
    raise ValueError(f"aggregator must be one of {AGGREGATORS}, got {aggregator!r}")
  if not 0.0 <= robust_fraction < 0.5:
    raise ValueError(f"robust_fraction must lie in [0, 0.5), got {robust_fraction=}")
  if aggregator == "norm_bound" and not (norm_bound is not None and norm_bound > 0):
    raise ValueError(f"aggregator 'norm_bound' needs a positive norm_bound, got {norm_bound=}")
  if aggregator == "rlr" and not (rlr_threshold is not None and rlr_threshold >= 1):
    raise ValueError(f"aggregator 'rlr' needs an rlr_threshold >= 1, got {rlr_threshold=}")


def norm_bounded_mean(deltas: Params, weights: jax.Array, accepted: jax.Array,
                      bound: float) -> Params:
  """Norm bounding (Sun, Kairouz, Suresh and McMahan, "Can You Really Backdoor Federated
  Learning?", 2019): each accepted update is scaled to L2 norm at most `bound` (over all its
  parameters), then averaged with the selection's weights as `aggregate` does. A boosted
  (model-replacement) update can then move the model no further than an honest one of norm
  `bound`; with Gaussian noise added this is DP-FedAvg's clipping (their "weak DP")."""
  return aggregate(_bounded(deltas, accepted, bound), weights, accepted)


def _clip_factors(deltas: Params, accepted: jax.Array, bound) -> tuple[jax.Array, jax.Array]:
  """(min(1, bound / ||delta_i||) per client, the norms ||delta_i|| over all parameters; 0 where
  not accepted)."""
  norms = jnp.sqrt(_masked_sq_norms(deltas, accepted))
  return jnp.minimum(1.0, bound / jnp.maximum(norms, 1e-12)), norms


def _bounded(deltas: Params, accepted: jax.Array, bound: float) -> Params:
  """Each update scaled to L2 norm at most `bound` (over all its parameters)."""
  factors, _ = _clip_factors(deltas, accepted, bound)
  return tmap(lambda d: d * _rows(factors, d).astype(d.dtype), deltas)


def _floor_table(fraction: float, k: int) -> jax.Array:
  """int32 [k + 1]: int(fraction * n) for n = 0..k, in Python's float64 (as scipy counts)."""
  return jnp.asarray([int(fraction * n) for n in range(k + 1)], jnp.int32)


def _sorted_accepted(d: jax.Array, accepted: jax.Array) -> jax.Array:
  """Each coordinate's values sorted over the accepted clients, which come first (the others,
  NaN included, are +inf and sort last)."""
  return jnp.sort(jnp.where(_rows(accepted, d), d.astype(jnp.float32), jnp.inf), axis=0)


def _median_of_sorted(s: jax.Array, n: jax.Array) -> jax.Array:
  """The median over axis 0 of the first n rows of `s`, each column sorted (the mean of the two
  middle values for an even n)."""
  lo = jnp.take(s, jnp.maximum((n - 1) // 2, 0), axis=0)
  hi = jnp.take(s, n // 2, axis=0, mode="clip")
  return 0.5 * (lo + hi)


def coordinate_median(deltas: Params, accepted: jax.Array) -> Params:
  """Coordinate-wise median of the accepted clients' updates (Yin et al. 2018), unweighted: every
  accepted slot counts once whatever its examples; for an even count, the mean of the two middle
  values; 0 when nobody is accepted."""
  n = accepted.sum()

  def one(d):
    return jnp.where(n > 0, _median_of_sorted(_sorted_accepted(d, accepted), n), 0.0)

  return tmap(one, deltas)


def trimmed_mean(deltas: Params, accepted: jax.Array, fraction: float) -> Params:
  """Coordinate-wise trimmed mean (Yin et al. 2018): in each coordinate, the int(fraction * n)
  largest and as many smallest of the n accepted values are dropped and the rest averaged
  (scipy.stats.trim_mean's count), unweighted; 0 when nobody is accepted."""
  n = accepted.sum()

  def one(d):
    t = _floor_table(fraction, d.shape[0])[n]
    s = _sorted_accepted(d, accepted)
    pos = _rows(jnp.arange(d.shape[0]), d)
    kept = jnp.where((pos >= t) & (pos < n - t), s, 0.0).sum(0)
    return jnp.where(n > 0, kept / jnp.maximum(n - 2 * t, 1), 0.0)

  return tmap(one, deltas)


def _flat_rows(deltas: Params, accepted: jax.Array) -> jax.Array:
  """float32 [k, parameters]: each slot's update over all leaves, 0 for rejected slots."""
  leaves = jax.tree_util.tree_leaves(deltas)
  k = leaves[0].shape[0]
  return jnp.concatenate([jnp.where(_rows(accepted, d), d, 0.0).reshape(k, -1)
                          .astype(jnp.float32) for d in leaves], axis=1)


def _sq_distances(flat: jax.Array) -> jax.Array:
  """[k, k] squared L2 distances between the rows of `flat`."""
  sq = jnp.sum(jnp.square(flat), axis=1)
  gram = jnp.matmul(flat, flat.T, precision=jax.lax.Precision.HIGHEST)  # full float32 on TPU too
  return jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)


def _krum_scores(dist: jax.Array, pool: jax.Array, f: jax.Array) -> jax.Array:
  """Krum's score of every slot in `pool` (inf elsewhere): the summed squared distance to its
  n - f - 2 nearest others in the pool (at least one), n the pool's size."""
  k = dist.shape[0]
  pair = pool[:, None] & pool[None, :] & ~jnp.eye(k, dtype=bool)
  nearest = jnp.sort(jnp.where(pair, dist, jnp.inf), axis=1)
  m = jnp.maximum(pool.sum() - f - 2, 1)
  rank = jnp.arange(k)[None, :]
  score = jnp.where((rank < m) & jnp.isfinite(nearest), nearest, 0.0).sum(1)
  return jnp.where(pool, score, jnp.inf)


def _krum_inputs(deltas: Params, accepted: jax.Array, fraction: float):
  """(n accepted, f = int(fraction * n) assumed Byzantine, [k, k] squared distances between the
  slots' flattened updates): what Krum, Multi-Krum and Bulyan start from."""
  n = accepted.sum()
  f = _floor_table(fraction, accepted.shape[0])[n]
  return n, f, _sq_distances(_flat_rows(deltas, accepted))


def krum(deltas: Params, accepted: jax.Array, fraction: float) -> Params:
  """Krum (Blanchard et al. 2017): the one accepted update whose summed squared distance to its
  n - f - 2 nearest other accepted updates is smallest, where n is the number accepted and
  f = int(fraction * n) the number of Byzantine clients it assumes (at least one neighbour is
  used when n - f - 2 < 1, where the paper's guarantee, which needs n > 2f + 2, does not hold).
  Distances over all parameters together; 0 when nobody is accepted."""
  n, f, dist = _krum_inputs(deltas, accepted, fraction)
  best = jnp.argmin(_krum_scores(dist, accepted, f))
  return tmap(lambda d: jnp.where(n > 0, d[best].astype(jnp.float32), 0.0), deltas)


def multi_krum(deltas: Params, accepted: jax.Array, fraction: float) -> Params:
  """Multi-Krum (Blanchard et al. 2017): the unweighted mean of the n - f accepted updates with
  the lowest Krum scores (f = int(fraction * n), scores as in `krum`); 0 when nobody is
  accepted."""
  n, f, dist = _krum_inputs(deltas, accepted, fraction)
  # rank 0 = the best score; rejected slots rank last
  rank = jnp.argsort(jnp.argsort(_krum_scores(dist, accepted, f)))
  keep = accepted & (rank < jnp.maximum(n - f, 1))
  count = jnp.maximum(keep.sum(), 1)
  return tmap(lambda d: jnp.where(_rows(keep, d), d.astype(jnp.float32), 0.0).sum(0) / count,
              deltas)


def bulyan(deltas: Params, accepted: jax.Array, fraction: float) -> Params:
  """Bulyan (El Mhamdi, Guerraoui and Rouault, ICML 2018) over Krum: theta = n - 2f updates are
  chosen one at a time, each the Krum choice (f as in `krum`) among the accepted updates not yet
  chosen; then, coordinate by coordinate, the mean of the beta = theta - 2f chosen values
  closest to their median. Its guarantee needs n >= 4f + 3; below that theta is kept at least 1,
  and where beta < 1 the coordinate-wise median of the chosen updates is the output (with f = 0:
  the mean of all). Unweighted; 0 when nobody is accepted."""
  k = accepted.shape[0]
  n, f, dist = _krum_inputs(deltas, accepted, fraction)
  theta = jnp.maximum(n - 2 * f, 1)
  beta = theta - 2 * f

  def choose(i, carry):
    pool, chosen = carry
    best = jnp.argmin(_krum_scores(dist, pool, f))
    take = (i < theta) & pool[best]
    return pool.at[best].set(pool[best] & ~take), chosen.at[best].set(chosen[best] | take)

  _, chosen = jax.lax.fori_loop(0, k, choose, (accepted, jnp.zeros_like(accepted)))

  def one(d):
    s = _sorted_accepted(d, chosen)  # the theta chosen values first, in order
    median = _median_of_sorted(s, theta)
    gap = jnp.where(_rows(jnp.arange(k) < theta, s), jnp.abs(s - median), jnp.inf)
    closest = jnp.take_along_axis(s, jnp.argsort(gap, axis=0), axis=0)
    pos = _rows(jnp.arange(k), d)
    mean = jnp.where(pos < beta, closest, 0.0).sum(0) / jnp.maximum(beta, 1)
    return jnp.where(n > 0, jnp.where(beta >= 1, mean, median), 0.0)

  return tmap(one, deltas)


def robust_learning_rate_mean(deltas: Params, weights: jax.Array, accepted: jax.Array,
                             threshold: int, bound: float | None = None) -> Params:
  """The robust learning rate (Ozdayi, Kantarcioglu and Gel, "Defending against Backdoors in
  Federated Learning with Robust Learning Rate", AAAI 2021): `aggregate`'s weighted mean, with
  its sign flipped in every coordinate where fewer than `threshold` accepted clients agree on
  the direction (|sum_i sign(delta_i)| < threshold). A backdoor moves coordinates that few
  clients move, and honest clients leave alone (a trigger word's embedding), so the server steps
  back from them; coordinates most clients agree on step forward as usual. With `bound`, the
  updates are first scaled to norm at most `bound` (the paper's combination with clipping):
  the votes are the same, but a boosted update no longer dominates the mean that is flipped."""
  mean = aggregate(deltas if bound is None else _bounded(deltas, accepted, bound), weights,
                   accepted)

  def one(d, m):
    votes = jnp.where(_rows(accepted, d), jnp.sign(d), 0.0).sum(0)
    return jnp.where(jnp.abs(votes) >= threshold, m, -m)

  return tmap(one, deltas, mean)


def robust_aggregate(deltas: Params, weights: jax.Array, accepted: jax.Array,
                     aggregator: str = "mean", robust_fraction: float = 0.1,
                     norm_bound: float | None = None, rlr_threshold: int | None = None) -> Params:
  """The server's aggregate of the accepted updates: "mean" is `aggregate` (weighted by the
  selection's weights); "norm_bound" is `norm_bounded_mean` (weighted too) at `norm_bound`,
  "rlr" `robust_learning_rate_mean` (weighted too) at `rlr_threshold`, on updates scaled to
  norm at most `norm_bound` first where it is given;
  "median", "trimmed_mean" (cutting `robust_fraction` from each end),
  "krum", "multi_krum" and "bulyan" (assuming a `robust_fraction` of Byzantine clients) are
  unweighted, as their papers define them: they treat every accepted slot alike whatever its
  weight, so with non-uniform selection weights they are not unbiased estimates of the mean
  update."""
  check_aggregator(aggregator, robust_fraction, norm_bound, rlr_threshold)
  if aggregator == "mean":
    return aggregate(deltas, weights, accepted)
  if aggregator == "norm_bound":
    return norm_bounded_mean(deltas, weights, accepted, norm_bound)
  if aggregator == "rlr":
    return robust_learning_rate_mean(deltas, weights, accepted, rlr_threshold, norm_bound)
  if aggregator == "median":
    return coordinate_median(deltas, accepted)
  if aggregator == "trimmed_mean":
    return trimmed_mean(deltas, accepted, robust_fraction)
  if aggregator == "multi_krum":
    return multi_krum(deltas, accepted, robust_fraction)
  if aggregator == "bulyan":
    return bulyan(deltas, accepted, robust_fraction)
  return krum(deltas, accepted, robust_fraction)


# ----------------------------------------------------------------------------- server algorithms


def _server_step(optimizer: optax.GradientTransformation, state: ServerState, update: Params):
  """Applies `optimizer` to the pseudo-gradient -update. Returns (params, opt_state)."""
  updates, opt_state = optimizer.update(tmap(jnp.negative, update), state.opt_state, state.params)
  return optax.apply_updates(state.params, updates), opt_state


def fedopt(*, loss_fn: LossFn, server_optimizer: optax.GradientTransformation, client_lr: float,
           batch_size: int, local_epochs: int = 1, prox_mu: float = 0.0,
           client_chunk: int | None = None, aggregator: str = "mean",
           robust_fraction: float = 0.1, norm_bound: float | None = None,
           rlr_threshold: int | None = None,
           byzantine: Byzantine | None = None) -> FederatedAlgorithm:
  """FedOpt: the server applies `server_optimizer` to the pseudo-gradient -(weighted mean update).

  FedAvg is FedOpt with optax.sgd(1.0); FedAdam / FedYogi / FedAdagrad use optax.adam / yogi /
  adagrad (Reddi et al. 2021). prox_mu > 0 adds FedProx's proximal term to the clients.
  client_chunk (every builder): clients trained together per vmap, see `_run_clients`; None = the
  whole cohort at once. It changes speed and memory, not results.
  aggregator: "mean" (the weighted mean above) or a Byzantine-robust rule in its place, "median",
  "trimmed_mean", "krum", "multi_krum" or "bulyan", with `robust_fraction`, "norm_bound",
  with `norm_bound`, or "rlr", with `rlr_threshold` (and `norm_bound` if given; see
  `robust_aggregate`).
  byzantine (every builder): simulated malicious clients (`make_byzantine`); None = none.
  """
  _check_client(client_lr, batch_size, local_epochs, client_chunk)
  check_aggregator(aggregator, robust_fraction, norm_bound, rlr_threshold)
  if prox_mu < 0:
    raise ValueError(f"prox_mu must be >= 0, got {prox_mu=}")
  local = _local_fn(loss_fn, client_lr, batch_size, local_epochs, prox_mu)

  def init(params):
    return ServerState(params, server_optimizer.init(params), jnp.zeros((), jnp.int32), ())

  def apply(state: ServerState, cohort: Cohort, key: PRNGKey):
    deltas, res, accepted, finite = _run_clients(local, state.params, cohort, key,
                                                 client_chunk=client_chunk, byzantine=byzantine)
    agg = robust_aggregate(deltas, cohort.weights, accepted, aggregator, robust_fraction,
                           norm_bound, rlr_threshold)
    params, opt_state = _server_step(server_optimizer, state, agg)
    return (ServerState(params, opt_state, state.round + 1, state.extra),
            _round_metrics(cohort, res, accepted, finite, agg, byzantine))

  return FederatedAlgorithm(init, apply)


def fedavg(*, loss_fn: LossFn, client_lr: float, batch_size: int, local_epochs: int = 1,
           server_lr: float = 1.0, client_chunk: int | None = None,
           **robust) -> FederatedAlgorithm:
  """FedAvg (McMahan et al. 2017): the new model is the weighted mean of the clients' models
  (server_lr 1). `robust`: fedopt's aggregator, robust_fraction, norm_bound, rlr_threshold and
  byzantine."""
  return fedopt(loss_fn=loss_fn, server_optimizer=make_server_optimizer("sgd", server_lr),
                client_lr=client_lr, batch_size=batch_size, local_epochs=local_epochs,
                client_chunk=client_chunk, **robust)


def fedprox(*, loss_fn: LossFn, client_lr: float, batch_size: int, mu: float,
            local_epochs: int = 1, server_lr: float = 1.0,
            client_chunk: int | None = None, **robust) -> FederatedAlgorithm:
  """FedProx (Li et al. 2020): FedAvg whose clients minimise loss + mu/2 ||w - w_global||^2.
  `robust`: fedopt's aggregator, robust_fraction, norm_bound, rlr_threshold and
  byzantine."""
  if not mu > 0:
    raise ValueError(f"FedProx needs mu > 0, got {mu=}")
  return fedopt(loss_fn=loss_fn, server_optimizer=make_server_optimizer("sgd", server_lr),
                client_lr=client_lr, batch_size=batch_size, local_epochs=local_epochs,
                prox_mu=mu, client_chunk=client_chunk, **robust)


def client_losses(loss_fn: LossFn, params: Params, cohort: Cohort) -> jax.Array:
  """float32 [k]: each client's mean loss over all its examples at `params` (0 for an empty
  slot); one forward pass over the cohort's padded examples."""
  def one(examples, count):
    per = loss_fn(params, examples).astype(jnp.float32)
    real = jnp.arange(per.shape[0]) < count
    return jnp.where(real, per, 0.0).sum() / jnp.maximum(count, 1).astype(jnp.float32)

  return jax.vmap(one)(tmap(jnp.asarray, cohort.examples), cohort.counts)


def qfedavg(*, loss_fn: LossFn, client_lr: float, batch_size: int, q: float,
            local_epochs: int = 1, lipschitz: float | None = None,
            client_chunk: int | None = None,
            byzantine: Byzantine | None = None) -> FederatedAlgorithm:
  """q-FedAvg (Li et al. 2020), which minimises sum_k p_k F_k(w)^(q+1) / (q+1), p_k being the
  probability that client k is selected (the paper selects by size: `selection.by_activity` at
  power 1; uniform selection makes p_k = 1/N): larger q puts more weight on the clients whose
  loss is high, for a more uniform accuracy across clients.

  Each round every accepted client k reports its loss F_k at the server's model w (over all its
  examples, `client_losses`) and its local model w_k after the usual local SGD; with
  dw_k = L (w - w_k), the server sets
    w <- w - sum_k F_k^q dw_k / sum_k (q F_k^(q-1) ||dw_k||^2 + L F_k^q)
  over the accepted clients (unweighted: fairness comes from F_k^q, not from client sizes).
  L = `lipschitz`, by default 1 / client_lr as in the paper; q = 0 is the unweighted mean of the
  clients' models.
  """
  _check_client(client_lr, batch_size, local_epochs, client_chunk)
  if not q >= 0:
    raise ValueError(f"q-FedAvg needs q >= 0, got {q=}")
  big_l = 1.0 / client_lr if lipschitz is None else float(lipschitz)
  if not big_l > 0:
    raise ValueError(f"lipschitz must be positive, got {lipschitz=}")
  local = _local_fn(loss_fn, client_lr, batch_size, local_epochs)
  opt = optax.sgd(1.0)

  def init(params):
    return ServerState(params, opt.init(params), jnp.zeros((), jnp.int32), ())

  def apply(state: ServerState, cohort: Cohort, key: PRNGKey):
    losses = jnp.maximum(client_losses(loss_fn, state.params, cohort), 1e-10)
    deltas, res, accepted, finite = _run_clients(local, state.params, cohort, key,
                                                 client_chunk=client_chunk, byzantine=byzantine)
    use = accepted & jnp.isfinite(losses)
    sq = _masked_sq_norms(deltas, use)
    fq = jnp.where(use, losses ** q, 0.0)
    h = jnp.where(use, q * losses ** (q - 1.0) * big_l ** 2 * sq + big_l * fq, 0.0)
    # w - sum_k fq_k L (w - w_k) / sum h = w + sum_k (fq_k L / sum h) * delta_k
    agg = _weighted_sum(deltas, fq * big_l / jnp.maximum(h.sum(), 1e-30))
    params, opt_state = _server_step(opt, state, agg)
    metrics = _round_metrics(cohort, res, use, finite, agg, byzantine)
    metrics["client_loss_max"] = jnp.where(use, losses, 0.0).max()
    return ServerState(params, opt_state, state.round + 1, state.extra), metrics

  return FederatedAlgorithm(init, apply)


class ScaffoldState(NamedTuple):
  server_control: Params  # c
  client_controls: Params  # c_i for every client, leaves [num_clients, ...]


def scaffold(*, loss_fn: LossFn, client_lr: float, batch_size: int, num_clients: int,
             local_epochs: int = 1, server_lr: float = 1.0,
             client_chunk: int | None = None,
             byzantine: Byzantine | None = None) -> FederatedAlgorithm:
  """SCAFFOLD (Karimireddy et al. 2020, option II): clients correct each gradient by c - c_i and
  update c_i+ = c_i - c + (x - y_i) / (K_i * client_lr) after K_i local steps; the server moves
  x by server_lr * (weighted mean of y_i - x) and c by (1/N) * sum of the accepted c_i+ - c_i
  (a client selected in several slots contributes the mean of its slots' c_i+ - c_i, once).
  Client controls are server state of shape [num_clients, ...] (stateful clients)."""
  _check_client(client_lr, batch_size, local_epochs, client_chunk)
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients=}")
  local = _local_fn(loss_fn, client_lr, batch_size, local_epochs)
  opt = make_server_optimizer("sgd", server_lr)

  def init(params):
    zeros = tmap(jnp.zeros_like, params)
    controls = tmap(lambda p: jnp.zeros((num_clients,) + p.shape, p.dtype), params)
    return ServerState(params, opt.init(params), jnp.zeros((), jnp.int32),
                       ScaffoldState(zeros, controls))

  def apply(state: ServerState, cohort: Cohort, key: PRNGKey):
    c, cis = state.extra
    ci = tmap(lambda x: x[cohort.ids], cis)
    corr = tmap(lambda a, b: a[None] - b, c, ci)
    deltas, res, accepted, finite = _run_clients(local, state.params, cohort, key, corr,
                                                 client_chunk=client_chunk, byzantine=byzantine)
    k_lr = jnp.maximum(res.steps, 1).astype(jnp.float32) * client_lr
    ci_new = tmap(lambda cii, cc, d: cii - cc[None] - d / _rows(k_lr, d), ci, c, deltas)
    # A client drawn more than once (selection with replacement) updates its control once, by the
    # mean of its accepted slots' updates.
    mult = jnp.zeros((num_clients,), jnp.float32).at[cohort.ids].add(accepted.astype(jnp.float32))
    share = jnp.where(accepted, 1.0 / jnp.maximum(mult[cohort.ids], 1.0), 0.0)
    dci = tmap(lambda a, b: _rows(share, a) * jnp.where(_rows(accepted, a), a - b, 0.0),
               ci_new, ci)
    agg = aggregate(deltas, cohort.weights, accepted)
    params, opt_state = _server_step(opt, state, agg)
    c = tmap(lambda cc, d: cc + d.sum(0) / num_clients, c, dci)
    cis = tmap(lambda all_, d: all_.at[cohort.ids].add(d), cis, dci)
    return (ServerState(params, opt_state, state.round + 1, ScaffoldState(c, cis)),
            _round_metrics(cohort, res, accepted, finite, agg, byzantine))

  return FederatedAlgorithm(init, apply)


def _clipped_client_sum(local, params, cohort: Cohort, key: PRNGKey, clip, client_chunk,
                        byzantine):
  """The cohort's updates, each clipped to L2 norm `clip` and summed with weight 1 (non-finite
  updates and padded or dropped slots count 0). Returns (clipped sum, local results, accepted,
  finite, use (1.0 where a client contributes), norms)."""
  deltas, res, accepted, finite = _run_clients(local, params, cohort, key,
                                               client_chunk=client_chunk, byzantine=byzantine)
  use = accepted.astype(jnp.float32)
  factors, norms = _clip_factors(deltas, accepted, clip)
  return _weighted_sum(deltas, use * factors), res, accepted, finite, use, norms


def dp_fedavg(*, loss_fn: LossFn, client_lr: float, batch_size: int, l2_clip: float,
              noise_multiplier: float, expected_clients: float, local_epochs: int = 1,
              server_optimizer: optax.GradientTransformation | None = None,
              adaptive: quantile.QuantileClipping | None = None,
              client_chunk: int | None = None,
              byzantine: Byzantine | None = None) -> FederatedAlgorithm:
  """DP-FedAvg (McMahan et al. 2018): user-level DP with Poisson-sampled clients.

  Each client's model update is clipped to L2 norm C (over all parameters); the server sums the
  clipped updates of the sampled clients (every client weight 1), adds N(0, (sigma C)^2) to the sum,
  divides by the *fixed* denominator expected_clients = q N, and applies `server_optimizer`
  (default SGD with learning rate 1) to minus that. Adding or removing one client changes the sum
  by at most C, so each round is a Poisson-subsampled Gaussian mechanism with multiplier sigma,
  which the caller records in the PrivacyLedger. Non-finite client updates are replaced by zeros
  before clipping (counted in the metrics), which keeps the bound.

  Args:
    l2_clip: C (with `adaptive`, ignored in favour of adaptive.initial_clip).
    noise_multiplier: sigma, the effective multiplier the accountant uses. With adaptive clipping
      the sum gets sigma_sum = (sigma^-2 - (2 sigma_b)^-2)^(-1/2) so that the sum and the clip
      update together cost sigma (Andrew et al. 2021).
    expected_clients: q * N.
    adaptive: optional QuantileClipping; the clip norm is server state.
    byzantine: simulated malicious clients; their updates are clipped like any other.
  """
  _check_client(client_lr, batch_size, local_epochs, client_chunk)
  quantile.check_expected_count(expected_clients)
  if not noise_multiplier >= 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier=}")
  if adaptive is None and not l2_clip > 0:
    raise ValueError(f"l2_clip must be positive, got {l2_clip=}")
  sum_sigma = noise_multiplier
  if adaptive is not None:
    sum_sigma = quantile.sum_noise_multiplier(noise_multiplier, adaptive.count_noise_multiplier)
  opt = server_optimizer or optax.sgd(1.0)
  local = _local_fn(loss_fn, client_lr, batch_size, local_epochs)
  clip0 = adaptive.initial_clip if adaptive is not None else l2_clip

  def init(params):
    return ServerState(params, opt.init(params), jnp.zeros((), jnp.int32),
                       jnp.asarray(clip0, jnp.float32))

  def apply(state: ServerState, cohort: Cohort, key: PRNGKey):
    k_clients, k_noise, k_count = jax.random.split(key, 3)
    clip = state.extra
    clipped_sum, res, accepted, finite, use, norms = _clipped_client_sum(
        local, state.params, cohort, k_clients, clip, client_chunk, byzantine)
    mean = noise.privatize(clipped_sum, k_noise, l2_clip=clip, noise_multiplier=sum_sigma,
                           expected_batch_size=expected_clients)
    params, opt_state = _server_step(opt, state, mean)
    metrics = _round_metrics(cohort, res, accepted, finite, mean, byzantine)
    metrics["clip"] = clip
    metrics["clients_clipped"] = (use * (norms > clip)).sum()
    new_clip = clip
    if adaptive is not None:
      # Count only clients that sent an update (a dropped client has no norm to compare).
      new_clip, frac = quantile.update_clip(clip, norms, use, k_count,
                                            expected_count=expected_clients, config=adaptive)
      metrics["unclipped_fraction_noisy"] = frac
    return ServerState(params, opt_state, state.round + 1, new_clip), metrics

  return FederatedAlgorithm(init, apply)


def dp_ftrl_fedavg(*, loss_fn: LossFn, client_lr: float, batch_size: int, l2_clip: float,
                   noise_multiplier: float, clients_per_round: int, rounds_per_tree: int,
                   noise_seed: int = 0, local_epochs: int = 1,
                   server_optimizer: optax.GradientTransformation | None = None,
                   client_chunk: int | None = None,
                   byzantine: Byzantine | None = None) -> FederatedAlgorithm:
  """DP-FTRL in federated learning (Kairouz et al. 2021, who designed it for settings like this
  one): user-level DP without sampling clients at random.

  Clients come in epochs (`selection.shuffled`: every client once per epoch, cohorts of m =
  `clients_per_round`, `rounds_per_tree` = ceil(N / m) rounds). Each update is clipped to L2 norm
  C and the clipped updates are summed as in DP-FedAvg; the server adds the tree-aggregation
  residual of round r (`privacy.dp_ftrl.add_residual_noise`, node std sigma C, tree r //
  rounds_per_tree, restarted every epoch), divides by the fixed m and applies
  `server_optimizer` (default SGD with learning rate 1) to minus that. Replacing one client's
  data with a zero update moves each released prefix sum by at most C, and a client adds to at
  most ceil(log2(rounds_per_tree + 1)) released nodes per tree; the caller records each round
  with `PrivacyLedger.record_tree`.

  Args:
    l2_clip: C.
    noise_multiplier: sigma, per tree node.
    clients_per_round: m, the fixed denominator.
    rounds_per_tree: rounds per epoch of clients (one tree each).
    noise_seed: seeds every tree's key (a fresh one per run).
    byzantine: simulated malicious clients; their updates are clipped like any other.
  """
  _check_fixed_cohorts(client_lr, batch_size, local_epochs, client_chunk, noise_multiplier,
                       l2_clip, clients_per_round)
  if rounds_per_tree < 1:
    raise ValueError(f"rounds_per_tree must be >= 1, got {rounds_per_tree=}")
  opt = server_optimizer or optax.sgd(1.0)
  local = _local_fn(loss_fn, client_lr, batch_size, local_epochs)
  run_key = jax.random.fold_in(jax.random.key(noise_seed), 0xF7E1)

  def init(params):  # no extra state: the tree's position is the round
    return ServerState(params, opt.init(params), jnp.zeros((), jnp.int32), ())

  def apply(state: ServerState, cohort: Cohort, key: PRNGKey):
    clipped_sum, res, accepted, finite, use, norms = _clipped_client_sum(
        local, state.params, cohort, key, l2_clip, client_chunk, byzantine)
    tree, pos = jnp.divmod(state.round, rounds_per_tree)
    mean = add_residual_noise(clipped_sum, jax.random.fold_in(run_key, tree), pos + 1,
                              l2_clip=l2_clip, noise_multiplier=noise_multiplier,
                              divisor=clients_per_round)
    params, opt_state = _server_step(opt, state, mean)
    metrics = _round_metrics(cohort, res, accepted, finite, mean, byzantine)
    metrics["clients_clipped"] = (use * (norms > l2_clip)).sum()
    return ServerState(params, opt_state, state.round + 1, state.extra), metrics

  return FederatedAlgorithm(init, apply)


def _check_fixed_cohorts(client_lr, batch_size, local_epochs, client_chunk, noise_multiplier,
                         l2_clip, clients_per_round) -> None:
  """The arguments DP-FTRL and DP-MF share: the clients' training, the noise, the clip and the
  fixed cohort size (the public denominator)."""
  _check_client(client_lr, batch_size, local_epochs, client_chunk)
  if not noise_multiplier >= 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier=}")
  if not l2_clip > 0:
    raise ValueError(f"l2_clip must be positive, got {l2_clip=}")
  if clients_per_round < 1:
    raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round=}")


def dp_mf_fedavg(*, loss_fn: LossFn, client_lr: float, batch_size: int, l2_clip: float,
                 noise_multiplier: float, clients_per_round: int, bands: int,
                 momentum: float = 0.0, noise_seed: int = 0, local_epochs: int = 1,
                 server_optimizer: optax.GradientTransformation | None = None,
                 client_chunk: int | None = None,
                 byzantine: Byzantine | None = None) -> FederatedAlgorithm:
  """DP-MF in federated learning: user-level DP without sampling clients, with the correlated
  noise of the banded square root factorization (Kalinin and Lampert 2024; the matrix mechanism
  of Denisov et al. 2022 and Choquette-Choo et al. 2023, which production federated training
  uses in place of tree aggregation).

  Clients come in epochs in one fixed order (`selection.shuffled(..., reshuffle=False)`: client
  i in rounds t0, t0 + R, ...). Each update is clipped to L2 norm C and the clipped updates are
  summed as in DP-FedAvg; round t adds w_t = (C^-1 Z)_t (`privacy.dp_mf.correlated_noise`, rows
  of Z with std sigma C, b = `bands` diagonals, the server keeping b - 1 past noises in
  `ServerState.extra`), divides by the fixed m and applies `server_optimizer` (default SGD with
  learning rate 1) to minus that. The caller records each round with
  `PrivacyLedger.record_mf` (sensitivity `accounting.mf_sensitivity`, replace one client's data
  with a zero update).

  Args:
    l2_clip: C.
    noise_multiplier: sigma, per row of C G.
    clients_per_round: m, the fixed denominator.
    bands: b.
    momentum: the workload's momentum (the server optimizer's); only utility depends on it.
    noise_seed: seeds the noise (a fresh one per run).
    byzantine: simulated malicious clients; their updates are clipped like any other.
  """
  _check_fixed_cohorts(client_lr, batch_size, local_epochs, client_chunk, noise_multiplier,
                       l2_clip, clients_per_round)
  coefficients = tuple(bsr_coefficients(bands, momentum))
  opt = server_optimizer or optax.sgd(1.0)
  local = _local_fn(loss_fn, client_lr, batch_size, local_epochs)
  run_key = jax.random.fold_in(jax.random.key(noise_seed), 0x3F0)

  def init(params):  # extra: the ring buffer of the last b - 1 noises (None for one band)
    return ServerState(params, opt.init(params), jnp.zeros((), jnp.int32),
                       empty_history(params, bands))

  def apply(state: ServerState, cohort: Cohort, key: PRNGKey):
    clipped_sum, res, accepted, finite, use, norms = _clipped_client_sum(
        local, state.params, cohort, key, l2_clip, client_chunk, byzantine)
    history = state.extra
    if noise_multiplier > 0:
      noise, history = correlated_noise(history, state.round,
                                        jax.random.fold_in(run_key, state.round),
                                        std=noise_multiplier * l2_clip, coefficients=coefficients,
                                        like=clipped_sum)
      clipped_sum = jax.tree_util.tree_map(jnp.add, clipped_sum, noise)
    mean = jax.tree_util.tree_map(lambda x: x / clients_per_round, clipped_sum)
    params, opt_state = _server_step(opt, state, mean)
    metrics = _round_metrics(cohort, res, accepted, finite, mean, byzantine)
    metrics["clients_clipped"] = (use * (norms > l2_clip)).sum()
    return ServerState(params, opt_state, state.round + 1, history), metrics

  return FederatedAlgorithm(init, apply)


SERVER_OPTIMIZERS = {"sgd": optax.sgd, "adam": functools.partial(optax.adam, b1=0.9, b2=0.99,
                                                                  eps=1e-3),
                     "yogi": functools.partial(optax.yogi, b1=0.9, b2=0.99, eps=1e-3),
                     "adagrad": functools.partial(optax.adagrad, eps=1e-3),
                     "momentum": functools.partial(optax.sgd, momentum=0.9)}


def make_server_optimizer(name: str, server_lr: float) -> optax.GradientTransformation:
  """SERVER_OPTIMIZERS[name] at learning rate `server_lr`, both checked."""
  if name not in SERVER_OPTIMIZERS:
    raise ValueError(f"server_optimizer must be one of {sorted(SERVER_OPTIMIZERS)}, got {name!r}")
  if not server_lr > 0:
    raise ValueError(f"server_lr must be positive, got {server_lr=}")
  return SERVER_OPTIMIZERS[name](server_lr)


def build(name: str, *, loss_fn: LossFn, client_lr: float, batch_size: int, local_epochs: int = 1,
          server_lr: float = 1.0, mu: float = 0.01, num_clients: int | None = None,
          server_optimizer: str = "adam", client_chunk: int | None = None,
          aggregator: str = "mean", robust_fraction: float = 0.1,
          norm_bound: float | None = None, rlr_threshold: int | None = None,
          byzantine: Byzantine | None = None, q: float = 1.0) -> FederatedAlgorithm:
  """Builds an algorithm by name: "fedavg", "fedprox", "fedopt" (with `server_optimizer` in
  SERVER_OPTIMIZERS at `server_lr`), "fedadam", "fedyogi", "fedadagrad", "scaffold", "qfedavg"
  (with `q`). Every one but SCAFFOLD (whose control variates are means) and q-FedAvg (whose
  aggregate is its own) takes a robust `aggregator`."""
  common = dict(loss_fn=loss_fn, client_lr=client_lr, batch_size=batch_size,
                local_epochs=local_epochs, client_chunk=client_chunk, byzantine=byzantine)
  robust = dict(aggregator=aggregator, robust_fraction=robust_fraction, norm_bound=norm_bound,
                rlr_threshold=rlr_threshold)
  alias = {"fedadam": "adam", "fedyogi": "yogi", "fedadagrad": "adagrad"}
  if name == "fedavg":
    return fedavg(server_lr=server_lr, **common, **robust)
  if name == "fedprox":
    return fedprox(mu=mu, server_lr=server_lr, **common, **robust)
  if name in alias or name == "fedopt":
    return fedopt(server_optimizer=make_server_optimizer(alias.get(name, server_optimizer),
                                                         server_lr), **common, **robust)
  if name == "scaffold":
    if num_clients is None:
      raise ValueError("scaffold needs num_clients (it keeps a control variate per client)")
    if aggregator != "mean":
      raise ValueError(f"scaffold aggregates with the mean (its control variates are means), "
                       f"got aggregator={aggregator!r}")
    return scaffold(num_clients=num_clients, server_lr=server_lr, **common)
  if name == "qfedavg":
    if aggregator != "mean":
      raise ValueError(f"qfedavg weighs the clients' updates by their losses itself, got "
                       f"aggregator={aggregator!r}")
    return qfedavg(q=q, **common)
  raise ValueError(f"unknown algorithm {name!r}; expected one of {ALGORITHMS}")


ALGORITHMS = ("fedavg", "fedprox", "fedopt", "fedadam", "fedyogi", "fedadagrad", "scaffold",
              "qfedavg")
