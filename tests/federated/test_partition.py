import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from trustjax.federated import ClientStore, bucket_capacities, partition


def _covers(parts, n):
  allidx = np.concatenate(parts)
  return len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))


def _labels(n=4000, k=7, seed=0):
  return np.random.default_rng(seed).choice(k, size=n, p=np.arange(1, k + 1) / (k * (k + 1) / 2))


def test_iid_and_quantity_skew_cover_each_example_once_and_are_seeded():
  p1 = partition.iid(1003, 10, seed=3)
  assert _covers(p1, 1003) and {len(p) for p in p1} == {100, 101}
  assert all(np.array_equal(a, b) for a, b in zip(p1, partition.iid(1003, 10, seed=3)))
  q = partition.quantity_skew(1000, 50, beta=0.5, seed=1)
  assert _covers(q, 1000) and min(len(p) for p in q) >= 1


def test_size_spread_falls_as_beta_grows():
  spreads = [np.mean([partition.size_spread(partition.quantity_skew(5000, 100, beta=b, seed=s))
                      for s in range(3)]) for b in (0.1, 1.0, 10.0, 100.0)]
  assert all(a > b for a, b in zip(spreads, spreads[1:])), spreads
  # Dir(beta) proportions have CV sqrt((K-1)/(K beta + 1)) ~ 1/sqrt(beta): check at beta=1.
  assert spreads[1] == pytest.approx(np.sqrt(99 / 101), rel=0.2)


def test_label_divergence_falls_as_alpha_grows():
  y = _labels()
  divs = []
  for alpha in (0.1, 1.0, 10.0, 100.0):
    parts = partition.dirichlet_label(y, 40, alpha=alpha, seed=0)
    assert _covers(parts, len(y))
    assert {len(p) for p in parts} == {100}
    divs.append(partition.label_divergence(y, parts))
  assert all(a > b for a, b in zip(divs, divs[1:])), divs
  iid = partition.label_divergence(y, partition.iid(len(y), 40))  # sampling noise of 100 draws
  assert divs[0] > 0.5 and divs[-1] < 2 * iid  # Dir(100 p) adds its own small spread


def test_kmeans_matches_scikit_learn_on_separated_blobs():
  rng = np.random.default_rng(0)
  centers = rng.normal(scale=10, size=(5, 8))
  truth = rng.integers(5, size=1000)
  x = centers[truth] + rng.normal(size=(1000, 8))
  ours = partition.kmeans(x, 5, seed=0)
  theirs = KMeans(5, n_init=10, random_state=0).fit_predict(x)
  assert adjusted_rand_score(theirs, ours) == pytest.approx(1.0)
  parts = partition.feature_clusters(x, 20, num_clusters=5, alpha=0.1, seed=0)
  assert _covers(parts, 1000)
  # With small alpha each client sees few clusters.
  assert partition.label_divergence(truth, parts) > 0.4


def test_natural_partition_groups_by_id():
  ids = np.array([5, 3, 5, 9, 3, 3])
  parts, names = partition.natural(ids)
  assert names.tolist() == [3, 5, 9]
  assert [p.tolist() for p in parts] == [[1, 4, 5], [0, 2], [3]]
  parts, names = partition.natural(ids, min_examples=2)
  assert names.tolist() == [3, 5]


@pytest.mark.parametrize("call, match", [
    (lambda: partition.dirichlet_label(np.zeros(10, int), 2, alpha=0.0), "alpha must be > 0"),
    (lambda: partition.dirichlet_label(np.zeros(10, int), 2, alpha=-1), "alpha"),
    (lambda: partition.quantity_skew(10, 2, beta=0), "beta must be > 0"),
    (lambda: partition.iid(5, 6), "more clients than examples"),
    (lambda: partition.feature_clusters(np.zeros((3, 2)), 2, num_clusters=2, alpha=0),
     "alpha must be > 0"),
    (lambda: ClientStore({"x": np.zeros(4)}, [np.array([0, 1]), np.array([], int)]),
     "empty"),
])
def test_bad_input_names_the_value(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_client_store_pads_into_size_buckets():
  x = np.arange(100, dtype=np.float32)
  parts = [np.arange(0, 3), np.arange(3, 10), np.arange(10, 100)]
  store = ClientStore({"x": x}, parts, min_capacity=4)
  assert store.capacities == bucket_capacities(90, min_capacity=4) == (4, 8, 16, 32, 64, 128)
  small = store.gather(np.array([0, 1]))
  assert small.capacity == 8 and small.counts.tolist() == [3, 7]
  assert small.examples["x"][0].tolist() == [0, 1, 2, 0, 0, 0, 0, 0]
  assert small.examples["x"][1, :7].tolist() == list(range(3, 10))
  big = store.gather(np.array([2, 0]))
  assert big.capacity == 128 and big.examples["x"][0, :90].tolist() == list(range(10, 100))
  assert store.num_examples == 100
