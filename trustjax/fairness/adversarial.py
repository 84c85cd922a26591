"""In-processing for group fairness by adversarial learning.

Zhang, Lemoine and Mitchell, "Mitigating Unwanted Biases with Adversarial Learning", AIES 2018:
a predictor (weights W, loss L_P) is trained together with an adversary that tries to recover
each example's group from the predictor's output (demographic parity) or from the output and
the true label (equalized odds), with loss L_A. The adversary descends L_A; the predictor
descends

    dW = grad_W L_P - proj_{grad_W L_A} grad_W L_P - alpha grad_W L_A,

so that no step helps the adversary (the projection removes the component of the predictor's
gradient along the adversary's) and each step hurts it (the last term). Both are updated from
the same forward pass, each with its own optax optimizer.

`fit_adversarial` trains any Flax classifier (one logit: sigmoid and binary cross-entropy; two:
softmax cross-entropy) against any Flax adversary on the predicted probability (default: one
hidden layer of 16 ReLU units), all epochs in one jitted `lax.scan` over shuffled, padded
minibatches (padded rows weigh nothing). The two-player game need not converge: runs can
oscillate or collapse, so check the result's parity and accuracy. The paper's convergence
argument assumes a decaying step size and a growing alpha: both may be schedules of the step
count (e.g. `learning_rate=lambda t: 1e-2 / (1 + t / 100)`, `alpha=lambda t: jnp.sqrt(1.0 + t
/ 100)`); the defaults are constant. The projection is taken over all of the
predictor's weights as one vector (the paper's W), or leaf by leaf (`per_leaf=True`, what
fairlearn's `AdversarialFairnessClassifier` does; the tests compare one step with fairlearn's
PyTorch engine on a model whose leaves are vectors, where the two agree).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from trustjax.fairness import group as group_metrics

CONSTRAINTS = ("demographic_parity", "equalized_odds")


def debias_gradient(grad_p, grad_a, alpha: float, *, per_leaf: bool = False,
                    project: bool = True):
  """Zhang et al.'s predictor update direction: grad_p minus its projection on grad_a minus
  alpha grad_a, for pytrees of the predictor's gradients of L_P (grad_p) and of the adversary's
  loss L_A (grad_a). The projection is over the whole tree as one vector, or per leaf;
  project=False leaves it out (grad_p - alpha grad_a; with alpha 0 the adversary is ignored)."""
  tiny = jnp.finfo(jnp.float32).tiny

  def direction(gp, ga, unit_dot):
    return gp - (unit_dot * ga if project else 0.0) - alpha * ga

  if per_leaf:
    def leaf(gp, ga):
      norm = jnp.sqrt(jnp.sum(ga * ga))
      return direction(gp, ga, jnp.sum(gp * ga) / (norm + tiny) ** 2 * (norm > 0))
    return jax.tree.map(leaf, grad_p, grad_a)
  leaves_p, leaves_a = jax.tree.leaves(grad_p), jax.tree.leaves(grad_a)
  dot = sum(jnp.sum(p * a) for p, a in zip(leaves_p, leaves_a))
  sq = sum(jnp.sum(a * a) for a in leaves_a)
  coef = jnp.where(sq > 0, dot / jnp.where(sq > 0, sq, 1.0), 0.0)
  return jax.tree.map(lambda gp, ga: direction(gp, ga, coef), grad_p, grad_a)


class AdversarialResult(NamedTuple):
  """A predictor trained against an adversary (`fit_adversarial`)."""
  predictor: nn.Module
  adversary: nn.Module
  params: object  # the predictor's params
  adversary_params: object
  groups: np.ndarray  # str [G] the sensitive-feature values, sorted (the adversary's classes)
  constraint: str
  predictor_loss: np.ndarray  # float64 [epochs] mean L_P over each epoch's batches
  adversary_loss: np.ndarray  # float64 [epochs] mean L_A


def _positive_logit_loss(out: jax.Array, y: jax.Array):
  """P(y = 1) and the cross-entropy per row, for one logit (sigmoid) or two (softmax)."""
  if out.ndim == 1 or out.shape[-1] == 1:
    z = out.reshape(out.shape[0])
    return jax.nn.sigmoid(z), optax.sigmoid_binary_cross_entropy(z, y)
  if out.shape[-1] != 2:
    raise ValueError(f"the predictor must output 1 or 2 logits per example, got {out.shape}")
  return (jax.nn.softmax(out)[:, 1],
          optax.softmax_cross_entropy_with_integer_labels(out, y.astype(jnp.int32)))


def _adversary_loss(out: jax.Array, a: jax.Array, num_groups: int):
  """The adversary's cross-entropy per row: one logit for two groups, else one per group."""
  if num_groups == 2:
    return optax.sigmoid_binary_cross_entropy(out.reshape(out.shape[0]), a.astype(out.dtype))
  return optax.softmax_cross_entropy_with_integer_labels(out, a)


def _optimizer(name: str, learning_rate: float):
  if name == "adam":
    return optax.adam(learning_rate)
  if name == "sgd":
    return optax.sgd(learning_rate)
  raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name=!r}")


def fit_adversarial(predictor: nn.Module, X, y_true, *, sensitive_features,
                    constraint: str = "demographic_parity",
                    alpha: float | Callable = 1.0, adversary: nn.Module | None = None,
                    epochs: int = 50, batch_size: int = 64,
                    learning_rate: float | Callable = 1e-3,
                    optimizer: str = "adam", per_leaf: bool = False, project: bool = True,
                    shuffle: bool = True, seed: int = 0, params=None,
                    adversary_params=None) -> AdversarialResult:
  """Trains `predictor` on (X, y) against an adversary predicting the group.

  Args:
    predictor: a Flax module X -> logits, one per example (sigmoid) or two (softmax).
    X: [n, ...] features. y_true: [n] 0/1 labels.
    sensitive_features: [n] each example's group (two or more; compared as strings).
    constraint: "demographic_parity" (the adversary sees P(y_hat = 1)) or "equalized_odds"
      (it also sees the label y, so what it can learn is the group beyond the label).
    alpha: the weight of the term that pushes the predictor against the adversary; 0 keeps
      only the projection. A float, or a function of the step count (0, 1, ...; a jax
      scalar) for a schedule.
    adversary: a Flax module [n, 1 or 2] -> logits: one for two groups, else one per group;
      default one hidden layer of 16 ReLU units. (fairlearn's default is linear; a logistic
      regression on P(y_hat = 1) cannot see a group whose probabilities differ in spread
      rather than in mean, and in this project's probes it left most of the parity gap
      while its loss sat at chance.)
    epochs, batch_size, learning_rate, optimizer ("adam" or "sgd"): the training schedule,
      the same for both players; learning_rate may be an optax schedule (a function of the
      step count). Each epoch visits every example once, in a new random order
      if `shuffle`; the last batch is padded (padded rows weigh nothing).
    per_leaf: project leaf by leaf (fairlearn's choice) instead of over all weights.
    project: False drops the projection (an ablation; with alpha 0 the predictor trains as it
      would alone, with the same optimizer and batches: a baseline).
    seed: the initialisation and shuffling key.
    params, adversary_params: optional initial parameters instead of fresh ones.

  Returns:
    An `AdversarialResult`; `adversarial_probabilities` gives P(y_hat = 1).

  References:
    Zhang, Lemoine and Mitchell, "Mitigating Unwanted Biases with Adversarial Learning",
    AIES 2018.
  """
  if constraint not in CONSTRAINTS:
    raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {constraint=!r}")
  if not callable(alpha) and not alpha >= 0:
    raise ValueError(f"alpha must be >= 0 (or a schedule), got {alpha=}")
  if epochs < 1 or batch_size < 1 or not (callable(learning_rate) or learning_rate > 0):
    raise ValueError(f"epochs, batch_size and learning_rate must be positive, got {epochs=}, "
                     f"{batch_size=}, {learning_rate=}")
  X = np.asarray(X, np.float32)
  y, names, ids = group_metrics.labelled_groups(X, y_true, sensitive_features)
  if len(names) < 2:
    raise ValueError(f"the adversary needs at least two groups, got {list(names)}")
  n, num_groups = len(y), len(names)
  batch_size = min(batch_size, n)
  num_batches = -(-n // batch_size)
  if adversary is None:
    adversary = nn.Sequential([nn.Dense(16), nn.relu,
                               nn.Dense(1 if num_groups == 2 else num_groups)])
  pass_y = constraint == "equalized_odds"
  key_p, key_a, key_order = jax.random.split(jax.random.PRNGKey(seed), 3)
  if params is None:
    params = predictor.init(key_p, jnp.asarray(X[:1]))["params"]
  if adversary_params is None:
    adversary_params = adversary.init(key_a, jnp.zeros((1, 2 if pass_y else 1)))["params"]
  opt_p, opt_a = _optimizer(optimizer, learning_rate), _optimizer(optimizer, learning_rate)

  def losses(params_p, params_a, xb, yb, ab, wb):
    p, lp = _positive_logit_loss(predictor.apply({"params": params_p}, xb).astype(jnp.float32),
                                 yb)
    inputs = jnp.stack([p, yb], axis=1) if pass_y else p[:, None]
    la = _adversary_loss(adversary.apply({"params": params_a}, inputs).astype(jnp.float32), ab,
                         num_groups)
    total = wb.sum()
    return (wb * lp).sum() / total, (wb * la).sum() / total

  @jax.jit
  def train(params_p, params_a, X, y, a):
    def step(carry, idx):
      params_p, params_a, state_p, state_a, count = carry
      w = (idx >= 0).astype(jnp.float32)
      rows = jnp.maximum(idx, 0)
      xb, yb, ab = X[rows], y[rows], a[rows]
      lp_fn = lambda pp: losses(pp, params_a, xb, yb, ab, w)[0]
      la_fn = lambda pp, pa: losses(pp, pa, xb, yb, ab, w)[1]
      lp, grad_p = jax.value_and_grad(lp_fn)(params_p)
      la, (grad_a_pred, grad_a_adv) = jax.value_and_grad(la_fn, argnums=(0, 1))(params_p,
                                                                               params_a)
      weight = alpha(count) if callable(alpha) else alpha
      direction = debias_gradient(grad_p, grad_a_pred, weight, per_leaf=per_leaf,
                                  project=project)
      up, state_p = opt_p.update(direction, state_p, params_p)
      ua, state_a = opt_a.update(grad_a_adv, state_a, params_a)
      return ((optax.apply_updates(params_p, up), optax.apply_updates(params_a, ua), state_p,
               state_a, count + 1), (lp, la))

    def epoch(carry, key):
      order = jax.random.permutation(key, n) if shuffle else jnp.arange(n)
      idx = jnp.concatenate([order, -jnp.ones(num_batches * batch_size - n, order.dtype)])
      carry, (lp, la) = jax.lax.scan(step, carry, idx.reshape(num_batches, batch_size))
      return carry, (lp.mean(), la.mean())

    carry = (params_p, params_a, opt_p.init(params_p), opt_a.init(params_a), jnp.int32(0))
    (params_p, params_a, *_), (lp, la) = jax.lax.scan(epoch, carry,
                                                      jax.random.split(key_order, epochs))
    return params_p, params_a, lp, la

  params, adversary_params, lp, la = train(params, adversary_params, jnp.asarray(X),
                                           jnp.asarray(y, jnp.float32),
                                           jnp.asarray(ids, jnp.int32))
  return AdversarialResult(predictor, adversary, params, adversary_params, names, constraint,
                           np.asarray(lp, np.float64), np.asarray(la, np.float64))


def adversarial_probabilities(result: AdversarialResult, X) -> np.ndarray:
  """P(y_hat = 1) of the trained predictor for each example: float64 [n]."""
  out = result.predictor.apply({"params": result.params}, jnp.asarray(X, jnp.float32))
  p, _ = _positive_logit_loss(out.astype(jnp.float32), jnp.zeros(out.shape[0]))
  return np.asarray(p, np.float64)
