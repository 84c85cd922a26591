import numpy as np
import pytest
import scipy.stats

from trustjax.federated import selection


def test_uniform_selection_frequencies_match_chi_square():
  counts = np.arange(1, 21)
  hits = np.zeros(20)
  rounds = 4000
  for r in range(rounds):
    s = selection.uniform(0, r, counts, 5)
    assert len(set(s.ids.tolist())) == 5
    assert s.weights.sum() == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(s.weights, counts[s.ids] / counts[s.ids].sum(), rtol=1e-6)
    hits[s.ids] += 1
  expected = np.full(20, rounds * 5 / 20)
  assert scipy.stats.chisquare(hits, expected).pvalue > 1e-3


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_by_activity_frequencies_and_unbiased_weights(power):
  rng = np.random.default_rng(0)
  counts = rng.integers(1, 200, size=30)
  deltas = rng.normal(size=30)
  p = selection.activity_probabilities(counts, power)
  hits = np.zeros(30)
  estimates = []
  rounds = 6000
  for r in range(rounds):
    s = selection.by_activity(1, r, counts, 8, power=power)
    np.add.at(hits, s.ids, 1)
    estimates.append(np.sum(s.weights * deltas[s.ids]))
  assert scipy.stats.chisquare(hits, rounds * 8 * p).pvalue > 1e-3
  target = np.sum(counts / counts.sum() * deltas)  # full-participation average
  est = np.asarray(estimates)
  assert abs(est.mean() - target) < 4 * est.std() / np.sqrt(rounds)


def test_selection_is_reproducible_and_validates():
  counts = np.full(10, 5)
  a, b = selection.uniform(3, 7, counts, 4), selection.uniform(3, 7, counts, 4)
  assert np.array_equal(a.ids, b.ids)
  with pytest.raises(ValueError, match="more clients per round than clients"):
    selection.uniform(0, 0, counts, 11)
  with pytest.raises(ValueError, match="empty clients"):
    selection.by_activity(0, 0, np.array([3, 0]), 1)
  with pytest.raises(ValueError, match="selection must be one of"):
    selection.select("best", 0, 0, counts, 1)
