import numpy as np
import pytest

from trustjax import data


def _dataset():
  labels = np.repeat(np.arange(3), [40, 7, 13]).astype(np.int32)
  texts = [f"text {i}" for i in range(len(labels))]
  return data.TextDataset(texts=texts, labels=labels, label_names=("a", "b", "c"),
                          device_ids=np.arange(len(labels), dtype=np.int32))


def test_downsample_keeps_a_seeded_fraction_of_the_named_classes_and_the_rest_in_order():
  ds = _dataset()
  small = ds.downsample(["a", 2], 0.25, seed=1)
  assert np.bincount(small.labels).tolist() == [10, 7, 3]  # round(0.25 * 13) = 3
  # every kept row is the original (texts and metadata move together), in the original order
  kept = [int(t.split()[1]) for t in small.texts]
  assert kept == sorted(kept) and small.device_ids.tolist() == kept
  assert [i for i in kept if ds.labels[i] == 1] == list(range(40, 47))
  again, other = ds.downsample(["a", 2], 0.25, seed=1), ds.downsample(["a", 2], 0.25, seed=2)
  assert again.texts == small.texts and other.texts != small.texts
  assert np.bincount(ds.downsample([1], 0.01, seed=0).labels).tolist() == [40, 1, 13]  # >= 1
  assert ds.downsample([0], 1.0, seed=0).texts == ds.texts
  assert ds.class_ids(["c", 0]) == [2, 0]


@pytest.mark.parametrize("classes,fraction,message", [
    (["a"], 0.0, r"fraction must lie in \(0, 1\], got 0.0"),
    (["a"], 1.5, r"fraction must lie in \(0, 1\], got 1.5"),
    (["z"], 0.5, r"unknown class 'z'; the classes are \['a', 'b', 'c'\]"),
    ([3], 0.5, r"class id 3 must lie in \[0, 3\)"),
    (["a", 0], 0.5, "classes must be distinct"),
])
def test_downsample_bad_input(classes, fraction, message):
  with pytest.raises(ValueError, match=message):
    _dataset().downsample(classes, fraction, seed=0)
