"""WEAT, SEAT and CEAT against float64 loops and an exact permutation test."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from trustjax import fairness


def _cos(u, v):
  return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


def _s(w, A, B):
  return np.mean([_cos(w, a) for a in A]) - np.mean([_cos(w, b) for b in B])


def _sets(seed, nx=8, ny=8, na=6, nb=7, dim=16, shift=0.6):
  """X leans towards A and Y towards B by `shift` along a shared direction."""
  rng = np.random.default_rng(seed)
  d = rng.normal(size=dim)
  X = rng.normal(size=(nx, dim)) + shift * d
  Y = rng.normal(size=(ny, dim)) - shift * d
  A = rng.normal(size=(na, dim)) + d
  B = rng.normal(size=(nb, dim)) - d
  return X, Y, A, B


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weat_effect_size_matches_a_float64_loop(seed):
  X, Y, A, B = _sets(seed)
  sx = [_s(x, A, B) for x in X]
  sy = [_s(y, A, B) for y in Y]
  ref = (np.mean(sx) - np.mean(sy)) / np.std(sx + sy, ddof=1)
  assert fairness.weat_effect_size(X, Y, A, B) == pytest.approx(ref, rel=1e-4)
  assert ref > 0.5  # the construction's bias is there
  assert fairness.weat_effect_size(Y, X, A, B) == pytest.approx(-ref, rel=1e-4)
  d, var = fairness.weat_effect_and_variance(X, Y, A, B)
  assert d == pytest.approx(ref, rel=1e-4) and var == pytest.approx(np.var(sx + sy, ddof=1),
                                                                     rel=1e-4)


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_weat_p_value_matches_the_exact_permutation_test(shift):
  X, Y, A, B = _sets(4, nx=5, ny=5, shift=shift)
  s = np.array([_s(w, A, B) for w in np.concatenate([X, Y])])
  observed = s[:5].sum() - s[5:].sum()
  splits = list(itertools.combinations(range(10), 5))
  exact = np.mean([s[list(c)].sum() - np.delete(s, list(c)).sum() >= observed - 1e-9
                   for c in splits])
  n = 20000
  got = fairness.weat_p_value(X, Y, A, B, rng=1, num_permutations=n)
  assert abs(got - exact) < 4 * np.sqrt(exact * (1 - exact) / n) + 2 / n
  assert fairness.weat_p_value(X, Y, A, B, rng=1, num_permutations=n) == got  # seeded


def test_seat_is_weat_on_templated_sentences():
  rng = np.random.default_rng(0)
  table = {}

  def encode(texts):  # a fixed random vector per sentence (a stand-in sentence encoder)
    return np.stack([table.setdefault(t, rng.normal(size=8)) for t in texts])

  X, Y, A, B = ["he", "him"], ["she", "her"], ["career", "office"], ["home", "family"]
  templates = ("This is {}.", "{} is here.")
  d, p = fairness.seat(encode, X, Y, A, B, templates=templates, num_permutations=500)
  emb = lambda ws: encode([t.format(w) for w in ws for t in templates])
  assert d == pytest.approx(fairness.weat_effect_size(emb(X), emb(Y), emb(A), emb(B)), rel=1e-5)
  assert 0 < p <= 1
  with pytest.raises(ValueError, match="exactly one"):
    fairness.seat(encode, X, Y, A, B, templates=("no slot",))


def test_ceat_is_dersimonian_laird_random_effects():
  rng = np.random.default_rng(0)
  e = rng.normal(0.5, 0.3, size=40)
  v = rng.uniform(0.005, 0.03, size=40)  # the spread of e (0.3) exceeds these: tau2 > 0
  w = 1 / v
  fixed = (w * e).sum() / w.sum()
  q = (w * (e - fixed) ** 2).sum()
  tau2 = max(0.0, (q - 39) / (w.sum() - (w ** 2).sum() / w.sum()))
  ws = 1 / (v + tau2)
  ces = (ws * e).sum() / ws.sum()
  se = np.sqrt(1 / ws.sum())
  got = fairness.ceat(e, v)
  assert got.effect_size == pytest.approx(ces, rel=1e-5)
  assert got.tau2 == pytest.approx(tau2, rel=1e-4) and tau2 > 0
  assert got.standard_error == pytest.approx(se, rel=1e-5)
  assert got.p_value == pytest.approx(2 * stats.norm.sf(abs(ces / se)), rel=1e-3)
  # identical effects: no heterogeneity, the combined effect is that effect
  same = fairness.ceat(np.full(5, 0.7), np.full(5, 0.1))
  assert same.tau2 == 0.0 and same.effect_size == pytest.approx(0.7)
  with pytest.raises(ValueError, match="positive"):
    fairness.ceat([0.1, 0.2], [0.1, 0.0])


def test_bad_sets_are_named():
  with pytest.raises(ValueError, match="same embedding size"):
    fairness.weat_effect_size(np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 4)), np.ones((2, 3)))
  with pytest.raises(ValueError, match="embedding array"):
    fairness.weat_effect_size(jnp.ones(3), np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 3)))
