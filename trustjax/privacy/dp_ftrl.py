"""DP-FTRL: private training without amplification by sampling, through tree aggregation.

Every epoch passes over the data in fixed-size batches; each example is in at most one batch per
epoch, and the guarantee does not depend on the order (shuffled or not). Step t (1-based, within
the epoch) releases the noisy prefix sum

    S~_t = sum_{s <= t} clipped_sum_s + sum of the noises of the dyadic nodes that cover [1, t]

(the binary-tree mechanism for continual release: Dwork, Naor, Pitassi and Rothblum 2010; Chan,
Shi and Song 2011). The optimizer receives (S~_t - S~_{t-1}) / batch_size, a function of the
released sums (post-processing): with plain SGD the parameters are exactly FTRL's,
theta_t = theta_0 - lr * S~_t / batch_size; momentum or Adam on the same gradients stay private.

The tree restarts every epoch. An example adds to one leaf of each epoch's tree and hence to at
most depth = ceil(log2(T + 1)) released nodes (T steps per epoch), each with noise std sigma * C,
so one epoch is a Gaussian mechanism with L2 sensitivity C * sqrt(depth), and E epochs compose E
of them (`accounting.dp_ftrl_event`). The neighbouring relation is "replace one example with a
zero example" (Kairouz et al. 2021, Definition 1.1), not DP-SGD's add/remove: with fixed-size
batches in a fixed order, removing an example would move every later one to another batch.

The noise of node (level l, index j), covering steps [j 2^l + 1, (j + 1) 2^l], is drawn from a key
derived from (tree, l, j), so the step needs no stored tree: the residual at step t with k
trailing zero bits is the new node (k, t / 2^k - 1) minus the k nodes of t - 1 below level k, on
average two draws per step.

Reference: Kairouz, McMahan, Song, Thakkar, Thakurta and Xu, "Practical and Private (Deep)
Learning without Sampling or Shuffling", ICML 2021 (DP-FTRL, tree restarts, Appendix D).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from trustjax.privacy import accounting
from trustjax.privacy.clipping import NOISE_SCOPE, OPTIMIZER_SCOPE
from trustjax.privacy.dp_sgd import _clipped_sum, _metrics, check_mechanism_fields
from trustjax.privacy.noise import privatize, standard_normal
from trustjax.types import Batch, LossFn, Params, PRNGKey


@dataclasses.dataclass(frozen=True, kw_only=True)
class FixedBatchConfig:
  """The fields of a mechanism without sampling (DP-FTRL, DP-MF): epochs of fixed-size batches.

  Attributes:
    l2_clip: per-example clipping norm C.
    noise_multiplier: sigma (what it scales is the mechanism's own).
    batch_size: fixed rows per step (the last batch of an epoch is padded with masked rows);
      also the public denominator of the gradient.
    num_examples: N; an epoch is ceil(N / batch_size) steps.
    method, microbatch_size, normalization, auto_s_gamma, per_layer: the clipped sum, as in
      `DPConfig`.
  """

  l2_clip: float
  noise_multiplier: float
  batch_size: int
  num_examples: int
  method: str = "auto"
  microbatch_size: int | None = None
  normalization: str = "clip"
  auto_s_gamma: float = 0.01
  per_layer: str | None = None
  adaptive = None  # no adaptive clipping (the quantile estimate's accounting assumes sampling)

  def __post_init__(self):
    check_mechanism_fields(self)
    if not 0 < self.batch_size <= self.num_examples:
      raise ValueError(f"batch_size must lie in [1, num_examples={self.num_examples}], got "
                       f"batch_size={self.batch_size}")

  @property
  def steps_per_epoch(self) -> int:
    return -(-self.num_examples // self.batch_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPFTRLConfig(FixedBatchConfig):
  """The DP-FTRL mechanism (tree aggregation restarted every epoch): `FixedBatchConfig`'s fields,
  with l2_clip a leaf's sensitivity under replace-with-zero and every tree node's noise std
  noise_multiplier * l2_clip."""

  @property
  def steps_per_tree(self) -> int:
    """T: steps per epoch, one tree each."""
    return self.steps_per_epoch

  @property
  def depth(self) -> int:
    """The most released nodes one example adds to in a tree: ceil(log2(T + 1))."""
    return accounting.tree_depth(self.steps_per_tree)

  def record(self, ledger: accounting.PrivacyLedger, steps: int = 1) -> None:
    """Records the next `steps` steps of this mechanism in `ledger` (which must hold the run's
    earlier steps: a step's tree is its index in the ledger divided by T)."""
    ledger.record_tree(noise_multiplier=self.noise_multiplier,
                       steps_per_tree=self.steps_per_tree, steps=steps)


def _node_noise(key: PRNGKey, level, index, leaves: list) -> list:
  """Standard normal noise of tree node (level, index), one array per leaf; the same values
  whichever step asks for them."""
  node = jax.random.fold_in(jax.random.fold_in(key, level), index)
  keys = jax.random.split(node, len(leaves))
  return [standard_normal(k, x.shape) for k, x in zip(keys, leaves)]


def residual_noise(tree_key: PRNGKey, t, like: Params, std) -> Params:
  """Tree noise of prefix sum t minus that of prefix sum t - 1, times `std` (float32): what
  `add_residual_noise` adds to a sum, alone.

  Summed over steps 1..t, the residuals are the tree's noise on the t-th prefix sum: the nodes
  (l, t // 2^l - 1) for every set bit l of t, each N(0, std^2), independent across nodes.

  Args:
    tree_key: the tree's key (one per epoch; never reused for another tree).
    t: the step within the tree, 1-based (int or traced int32 scalar).
    like: a pytree of arrays whose shapes the noise takes.
    std: the node noise's standard deviation (sigma * C), a positive float.
  """
  zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), like)
  return add_residual_noise(zeros, tree_key, t, l2_clip=std, noise_multiplier=1.0, divisor=1.0)


def add_residual_noise(grad_sum: Params, tree_key: PRNGKey, t, *, l2_clip: float,
                       noise_multiplier: float, divisor: float) -> Params:
  """(grad_sum + the tree residual of step t) / divisor: the noise goes on the clipped sum,
  before the division by the public denominator.

  The residual is the new node of step t (level k = the trailing zero bits of t, index
  t // 2^k - 1) minus the k nodes of t - 1's decomposition below level k, each node
  N(0, (noise_multiplier * l2_clip)^2). The old nodes are subtracted in a loop (none at odd t,
  half the steps); the new one is added by `privatize` (the same key split and draws as
  `_node_noise`), whose noise XLA keeps in one pass on a CPU instead of recomputing it in each
  of the optimizer's fusions."""
  if noise_multiplier == 0:  # nothing to draw
    return jax.tree_util.tree_map(lambda g: g / divisor, grad_sum)
  std = noise_multiplier * l2_clip
  t = jnp.asarray(t, jnp.int32)
  k = jax.lax.population_count((t & -t) - 1)  # trailing zero bits of t
  leaves, treedef = jax.tree_util.tree_flatten(grad_sum)

  def drop_old(level, acc):  # node `level` of t - 1's decomposition (bits below k are all set)
    old = _node_noise(tree_key, level, jnp.right_shift(t - 1, level) - 1, acc)
    return [a - std * z for a, z in zip(acc, old)]

  leaves = jax.lax.fori_loop(0, k, drop_old, leaves)
  new_node = jax.random.fold_in(jax.random.fold_in(tree_key, k), jnp.right_shift(t, k) - 1)
  return privatize(jax.tree_util.tree_unflatten(treedef, leaves), new_node, l2_clip=l2_clip,
                   noise_multiplier=noise_multiplier, expected_batch_size=divisor)


def dp_ftrl_step(params: Params, opt_state: optax.OptState, batch: Batch, key: PRNGKey, step, *,
                 loss_fn: LossFn, optimizer: optax.GradientTransformation, config: DPFTRLConfig):
  """One DP-FTRL step (Kairouz et al., ICML 2021).

  Args:
    params, opt_state: current parameters and optimizer state.
    batch: dict of arrays [batch_size, ...] with "mask": the step's batch of its epoch.
    key: the run's noise key, the same at every step (each epoch's tree folds in its index).
    step: the global step, 0-based (int or traced int32): tree step // T, position step % T + 1.
    loss_fn: per-example loss.
    optimizer: any optax transformation; it receives (residual-noised clipped sum) / batch_size.
    config: the mechanism.

  Returns:
    (params, opt_state, metrics) with metrics as sums: loss_sum, count, clipped, norm_sum.
  """
  tree, pos = jnp.divmod(jnp.asarray(step, jnp.int32), config.steps_per_tree)
  grad_sum, aux = _clipped_sum(loss_fn, params, batch, config)
  with jax.named_scope(NOISE_SCOPE):
    grads = add_residual_noise(grad_sum, jax.random.fold_in(key, tree), pos + 1,
                               l2_clip=config.l2_clip, noise_multiplier=config.noise_multiplier,
                               divisor=config.batch_size)
  with jax.named_scope(OPTIMIZER_SCOPE):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return params, opt_state, _metrics(aux, batch["mask"], config.l2_clip)
