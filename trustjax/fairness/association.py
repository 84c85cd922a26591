"""Intrinsic bias: association tests on embeddings (WEAT, SEAT) and their meta-analysis (CEAT).

The permutation test and the random-effects meta-analysis are vectorised in jnp and jitted.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import stats as jstats


def _unit(v: jax.Array) -> jax.Array:
  v = jnp.asarray(v, jnp.float32)
  return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _check_sets(**sets) -> None:
  dims = set()
  for name, v in sets.items():
    shape = np.shape(v)
    if len(shape) != 2 or shape[0] < 1:
      raise ValueError(f"{name} must be an embedding array [n >= 1, dim], got shape {shape}")
    dims.add(shape[1])
  if len(dims) != 1:
    raise ValueError(f"all sets need the same embedding size, got {sorted(dims)}")


def association(W: jax.Array, A: jax.Array, B: jax.Array) -> jax.Array:
  """s(w, A, B) = mean_a cos(w, a) - mean_b cos(w, b) for each row w of `W: [n, dim]`."""
  w, a, b = _unit(W), _unit(A), _unit(B)
  return (w @ a.T).mean(-1) - (w @ b.T).mean(-1)


def weat_effect_size(X, Y, A, B) -> float:
  """The WEAT effect size of Caliskan, Bryson and Narayanan, "Semantics derived automatically from
  language corpora contain human-like biases", Science 2017:

    d = (mean_{x in X} s(x, A, B) - mean_{y in Y} s(y, A, B)) / std_{w in X u Y} s(w, A, B),

  with the sample standard deviation (ddof 1). X, Y: target embeddings [n, dim] (e.g. male and
  female names); A, B: attribute embeddings (e.g. career and family words). Positive d: X is
  closer to A (and Y to B) than the other way round.
  """
  _check_sets(X=X, Y=Y, A=A, B=B)
  sx, sy = association(X, A, B), association(Y, A, B)
  both = jnp.concatenate([sx, sy])
  return float((sx.mean() - sy.mean()) / jnp.std(both, ddof=1))


@functools.partial(jax.jit, static_argnames=("nx", "num_permutations"))
def _permutation_stats(s_all, key, nx: int, num_permutations: int):
  def one(k):
    perm = jax.random.permutation(k, s_all.shape[0])
    return s_all[perm[:nx]].sum() - s_all[perm[nx:]].sum()

  return jax.vmap(one)(jax.random.split(key, num_permutations))


def weat_p_value(X, Y, A, B, *, rng: jax.Array | int = 0, num_permutations: int = 10000) -> float:
  """One-sided permutation p-value of WEAT's statistic sum_x s(x, A, B) - sum_y s(y, A, B)
  (Caliskan et al. 2017): the chance that a random equal-size re-split of X u Y gives a
  statistic at least as large. Estimated from `num_permutations` random re-splits (jitted,
  vmapped) as (1 + #{>=}) / (1 + num_permutations), which never reports 0.
  """
  _check_sets(X=X, Y=Y, A=A, B=B)
  if num_permutations < 1:
    raise ValueError(f"num_permutations must be positive, got {num_permutations=}")
  key = jax.random.key(rng) if isinstance(rng, int) else rng
  sx, sy = association(X, A, B), association(Y, A, B)
  observed = sx.sum() - sy.sum()
  perm = _permutation_stats(jnp.concatenate([sx, sy]), key, int(sx.shape[0]), num_permutations)
  # a small tolerance so that re-splits equal to the observed one count despite float rounding
  hits = (perm >= observed - 1e-6 * (1.0 + jnp.abs(observed))).sum()
  return float((1 + hits) / (1 + num_permutations))


def seat(encode: Callable[[Sequence[str]], jax.Array], X: Sequence[str], Y: Sequence[str],
         A: Sequence[str], B: Sequence[str], *,
         templates: Sequence[str] = ("This is {}.", "That is {}.", "Here is {}.", "{} is here."),
         rng: jax.Array | int = 0, num_permutations: int = 10000) -> tuple[float, float]:
  """SEAT (May et al., "On Measuring Social Biases in Sentence Encoders", NAACL 2019): WEAT on
  sentence encodings, each word placed in semantically bleached templates.

  Args:
    encode: texts -> embeddings [n, dim], e.g. a sentence encoder's mean-pooled output.
    X, Y, A, B: the target and attribute words.
    templates: sentences with one "{}" each.

  Returns:
    (effect size, one-sided permutation p-value).
  """
  for t in templates:
    if t.count("{}") != 1:
      raise ValueError(f"every template needs exactly one '{{}}', got {t!r}")
  emb = lambda words: jnp.asarray(encode([t.format(w) for w in words for t in templates]))
  ex, ey, ea, eb = emb(X), emb(Y), emb(A), emb(B)
  return (weat_effect_size(ex, ey, ea, eb),
          weat_p_value(ex, ey, ea, eb, rng=rng, num_permutations=num_permutations))


class CEATResult(NamedTuple):
  effect_size: float  # the combined effect size (random effects)
  standard_error: float  # its standard error, sqrt(1 / sum of the weights)
  tau2: float  # the between-sample variance (DerSimonian-Laird)
  p_value: float  # two-sided, from effect_size / standard_error under N(0, 1)


def weat_effect_and_variance(X, Y, A, B) -> tuple[float, float]:
  """One sample's WEAT effect size and its in-sample variance, the variance of s(w, A, B) over
  w in X u Y (ddof 1), the inputs CEAT combines."""
  _check_sets(X=X, Y=Y, A=A, B=B)
  both = jnp.concatenate([association(X, A, B), association(Y, A, B)])
  return weat_effect_size(X, Y, A, B), float(jnp.var(both, ddof=1))


@jax.jit
def _random_effects(e, v):
  w = 1.0 / v
  fixed = (w * e).sum() / w.sum()
  q = (w * (e - fixed) ** 2).sum()
  c = w.sum() - (w * w).sum() / w.sum()
  tau2 = jnp.maximum(0.0, (q - (e.shape[0] - 1)) / c)
  ws = 1.0 / (v + tau2)
  ces = (ws * e).sum() / ws.sum()
  se = jnp.sqrt(1.0 / ws.sum())
  return ces, se, tau2, 2.0 * jstats.norm.sf(jnp.abs(ces / se))


def ceat(effect_sizes, variances) -> CEATResult:
  """The combined effect size of CEAT (Guo and Caliskan, "Detecting Emergent Intersectional
  Biases: Contextualized Word Embeddings Contain a Distribution of Human-like Biases", AIES 2021):
  a random-effects meta-analysis (DerSimonian and Laird, 1986) of WEAT effect sizes measured on
  many samples of contextual embeddings, each with its in-sample variance
  (`weat_effect_and_variance`).
  """
  e = jnp.asarray(effect_sizes, jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
  v = jnp.asarray(variances, e.dtype)
  if e.ndim != 1 or e.shape != v.shape or e.shape[0] < 2:
    raise ValueError(f"need matching 1-D effect sizes and variances (at least 2), got "
                     f"{e.shape} and {v.shape}")
  if not bool(jnp.all(v > 0)):
    raise ValueError("variances must be positive")
  ces, se, tau2, p = _random_effects(e, v)
  return CEATResult(float(ces), float(se), float(tau2), float(p))


# Target and attribute words of three of Caliskan et al.'s (2017) tests (their Table 1 stimuli).
WEAT_TESTS = {
    "weat6_names_career_family": (
        ("John", "Paul", "Mike", "Kevin", "Steve", "Greg", "Jeff", "Bill"),
        ("Amy", "Joan", "Lisa", "Sarah", "Diana", "Kate", "Ann", "Donna"),
        ("executive", "management", "professional", "corporation", "salary", "office",
         "business", "career"),
        ("home", "parents", "children", "family", "cousins", "marriage", "wedding", "relatives")),
    "weat7_math_arts_gender": (
        ("math", "algebra", "geometry", "calculus", "equations", "computation", "numbers",
         "addition"),
        ("poetry", "art", "dance", "literature", "novel", "symphony", "drama", "sculpture"),
        ("male", "man", "boy", "brother", "he", "him", "his", "son"),
        ("female", "woman", "girl", "sister", "she", "her", "hers", "daughter")),
    "weat8_science_arts_gender": (
        ("science", "technology", "physics", "chemistry", "Einstein", "NASA", "experiment",
         "astronomy"),
        ("poetry", "art", "Shakespeare", "dance", "literature", "novel", "symphony", "drama"),
        ("brother", "father", "uncle", "grandfather", "son", "he", "his", "him"),
        ("sister", "mother", "aunt", "grandmother", "daughter", "she", "hers", "her")),
}
