import numpy as np
import pytest
import scipy.stats

from trustjax import privacy


def test_poisson_inclusion_and_sizes():
  n, q, steps = 200, 0.1, 3000
  counts = np.zeros(n)
  sizes = []
  for pb in privacy.poisson_batches(7, n, q, max_batch_size=64, num_steps=steps):
    assert pb.indices.shape == (64,) and pb.mask.shape == (64,)
    real = pb.indices[pb.mask]
    assert len(np.unique(real)) == len(real) == pb.size
    counts[real] += 1
    sizes.append(pb.size)
  # Each example is included independently with probability q: counts ~ Binomial(steps, q).
  assert scipy.stats.chisquare(counts).pvalue > 1e-3
  assert abs(counts.mean() / steps - q) < 0.005
  # The batch size is Binomial(n, q): chi-square over bins of the size.
  edges = np.array([-1, 14, 17, 19, 21, 23, 26, n])
  cdf = scipy.stats.binom(n, q).cdf(edges)
  observed = np.histogram(sizes, bins=edges + 0.5)[0]
  assert scipy.stats.chisquare(observed, steps * np.diff(cdf)).pvalue > 1e-3
  np.testing.assert_allclose(np.var(sizes), n * q * (1 - q), rtol=0.1)


def test_pure_function_of_seed_and_step():
  a = privacy.poisson_batch(3, 17, 1000, 0.05, 96)
  b = list(privacy.poisson_batches(3, 1000, 0.05, 96, start_step=17, num_steps=1))[0]
  np.testing.assert_array_equal(a.indices, b.indices)
  assert not np.array_equal(a.indices, privacy.poisson_batch(3, 18, 1000, 0.05, 96).indices)


def test_overflow_is_truncated_and_counted():
  pb = privacy.poisson_batch(0, 0, 1000, 0.5, 100)
  assert pb.size == 100 and pb.mask.all() and pb.overflow > 300
  p = privacy.overflow_probability(1000, 0.5, 100)
  assert p == pytest.approx(1.0)
  b = privacy.default_max_batch_size(10000, 0.01, 1000)
  assert b % 8 == 0 and b > 100
  assert 1000 * privacy.overflow_probability(10000, 0.01, b) <= 1e-12
  assert 1000 * privacy.overflow_probability(10000, 0.01, b - 8) > 1e-12 * 1e-3


def test_bad_input():
  with pytest.raises(ValueError, match="sampling_rate"):
    privacy.poisson_batch(0, 0, 10, 1.5, 4)
  with pytest.raises(ValueError, match="num_examples"):
    privacy.poisson_batch(0, 0, 0, 0.5, 4)
  with pytest.raises(ValueError, match="max_batch_size"):
    privacy.poisson_batch(0, 0, 10, 0.5, 0)
