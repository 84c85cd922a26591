"""Model inversion of canaries from a text classifier (ModIvA).

Reference: Parikh, Dupuy and Gupta, "Canary Extraction in Natural Language Understanding Models",
ACL 2022: an attacker with the model's weights, the canary's non-secret tokens and its label
recovers the secret tokens by gradient descent on a continuous relaxation of the token choice
(Gumbel-softmax over candidate tokens), then reads off the most likely token at each position.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from trustjax.types import Params


@functools.partial(jax.jit, static_argnames=("apply_fn", "steps", "learning_rate", "temperature"))
def _invert(apply_fn, params, base, pos, cand, label, keys, *, steps, learning_rate, temperature):
  """Each restart (vmapped over `keys`): Adam on the relaxed logits z [k, K], then the argmax
  guess and its loss. Compiled once per (apply_fn, shapes, settings)."""

  def relaxed_loss(z, key):
    g = -jnp.log(-jnp.log(jax.random.uniform(key, z.shape, minval=1e-9, maxval=1.0)))
    probs = jax.nn.softmax((z + g) / temperature, axis=-1)
    tokens = base + 0  # a fresh array object the interceptor can recognise
    interceptor, seen = _soft_embedding_interceptor(tokens, pos, probs, cand)
    with nn.intercept_methods(interceptor):
      logits = apply_fn(params, tokens)
    if not seen:
      raise ValueError("no nn.Embed received the token ids: invert_canary needs a model whose "
                       "tokens enter through nn.Embed")
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), label)[0]

  def hard_loss(guess):
    tokens = base.at[0, pos].set(guess)
    return optax.softmax_cross_entropy_with_integer_labels(
        apply_fn(params, tokens).astype(jnp.float32), label)[0]

  opt = optax.adam(learning_rate)

  def run(key):
    k0, key = jax.random.split(key)
    z = 0.01 * jax.random.normal(k0, (pos.shape[0], cand.shape[0]))

    def body(carry, t):
      z, s = carry
      g = jax.grad(relaxed_loss)(z, jax.random.fold_in(key, t))
      u, s = opt.update(g, s, z)
      return (optax.apply_updates(z, u), s), None

    (z, _), _ = jax.lax.scan(body, (z, opt.init(z)), jnp.arange(steps))
    guess = cand[jnp.argmax(z, axis=-1)]
    return guess, hard_loss(guess)

  return jax.vmap(run)(keys)


class Inversion(NamedTuple):
  tokens: np.ndarray  # int32 [length]: the template with the recovered tokens filled in
  guess: np.ndarray  # int32 [k]: the recovered token id at each unknown position
  loss: float  # the model's loss of `label` on `tokens`
  restart_losses: np.ndarray  # float [restarts]: the same for each restart's decoded guess


def _soft_embedding_interceptor(tokens, positions, probs, cand):
  """Replaces, in the one nn.Embed call that receives `tokens`, the rows at `positions` by the
  probability-weighted mix of the candidate tokens' embeddings."""
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if (context.method_name == "__call__" and isinstance(context.module, nn.Embed) and args
        and args[0] is tokens):
      table = jnp.asarray(context.module.embedding, y.dtype)
      soft = probs.astype(y.dtype) @ table[cand]  # [k, dim]
      y = y.at[0, positions].set(soft)
      seen.append(True)
    return y

  return interceptor, seen


def invert_canary(apply_fn: Callable[[Params, jax.Array], jax.Array], params: Params,
                  template: Sequence[int], unknown_positions: Sequence[int], label: int, *,
                  candidates: Sequence[int], steps: int = 300, learning_rate: float = 0.1,
                  temperature: float = 1.0, restarts: int = 8, seed: int = 0) -> Inversion:
  """Recovers the tokens at `unknown_positions` of a canary from a classifier (ModIvA).

  Works on any Flax model whose token ids enter through an `nn.Embed`: the token embedding is
  intercepted (`nn.intercept_methods`), nothing in the model is rewritten.

  Args:
    apply_fn: `apply_fn(params, tokens [1, length]) -> logits [1, classes]`, e.g.
      `lambda p, t: model.apply({"params": p}, t)`.
      Pass the same function object on every call to reuse the compiled attack.
    params: the target model's parameters.
    template: int [length] the canary's token ids; the ids at `unknown_positions` are ignored.
    unknown_positions: the k positions to recover.
    label: the canary's label (known to the attacker).
    candidates: int [K] the token ids the secret may use (e.g. the digits' ids), shared by all
      positions.
    steps: Adam steps on the relaxed token logits.
    learning_rate: Adam's rate.
    temperature: Gumbel-softmax temperature.
    restarts: independent runs (vmapped); the decoded guess with the lowest loss wins.
    seed: PRNG seed of the initial logits and the Gumbel noise.

  Returns:
    `Inversion`: the recovered tokens, the guess, its loss, and each restart's loss.
  """
  template = np.asarray(template, np.int32)
  pos = np.asarray(unknown_positions, np.int32)
  cand = jnp.asarray(np.asarray(candidates, np.int32))
  if template.ndim != 1 or not pos.size or pos.min() < 0 or pos.max() >= template.size:
    raise ValueError(f"unknown_positions {pos.tolist()} must index the template of length "
                     f"{template.size}")
  if len(set(pos.tolist())) != pos.size:
    raise ValueError(f"unknown_positions repeat: {pos.tolist()}")
  if cand.ndim != 1 or cand.size < 2:
    raise ValueError(f"candidates must be a list of at least 2 token ids, got {cand.shape}")
  if steps < 1 or restarts < 1 or not temperature > 0 or not learning_rate > 0:
    raise ValueError(f"need steps >= 1, restarts >= 1, temperature > 0 and learning_rate > 0; "
                     f"got {steps=}, {restarts=}, {temperature=}, {learning_rate=}")
  base = template.copy()
  base[pos] = int(candidates[0])  # any real token: padding would be masked out
  keys = jax.random.split(jax.random.key(seed), restarts)
  guesses, losses = _invert(apply_fn, params, jnp.asarray(base)[None], jnp.asarray(pos), cand,
                            jnp.asarray([label]), keys, steps=steps, learning_rate=learning_rate,
                            temperature=temperature)
  guesses, losses = np.asarray(guesses), np.asarray(losses)
  best = int(np.argmin(losses))
  out = template.copy()
  out[pos] = guesses[best]
  return Inversion(tokens=out, guess=guesses[best], loss=float(losses[best]),
                   restart_losses=losses)
