import numpy as np
import pytest

from trustjax import data


def test_seeded_and_deterministic():
  a = data.synthetic_nlu(3000, num_devices=100, seed=3)
  b = data.synthetic_nlu(3000, num_devices=100, seed=3)
  c = data.synthetic_nlu(3000, num_devices=100, seed=4)
  assert a.texts == b.texts and np.array_equal(a.device_ids, b.device_ids)
  assert a.texts != c.texts


def test_structure_activity_and_slots():
  ds = data.synthetic_nlu(20000, num_devices=500, seed=0)
  assert len(ds) == 20000 and ds.num_classes == 30
  counts = np.bincount(ds.device_ids, minlength=500)
  assert counts.min() >= 1
  # Heavy tail: the most active 5% of devices produce far more than 5% of utterances.
  top = np.sort(counts)[::-1][:25].sum() / counts.sum()
  assert top > 0.25, top
  assert np.all(np.diff(ds.timestamps) >= 0) and ds.timestamps.max() < 30 * 86400
  assert len(np.unique(ds.labels)) == 30
  for text, spans in zip(ds.texts[:500], ds.slots[:500]):
    for name, start, end in spans:
      assert text[start:end] in data.synthetic.SLOT_VALUES[name]


def test_bad_input():
  with pytest.raises(ValueError, match="num_devices"):
    data.synthetic_nlu(10, num_devices=11)
  with pytest.raises(ValueError, match="num_examples"):
    data.synthetic_nlu(0)
