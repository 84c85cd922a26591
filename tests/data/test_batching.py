import numpy as np
import pytest

from trustjax import data


def test_padded_batches_cover_every_row_once():
  arrays = {"x": np.arange(23), "y": np.arange(23) * 2}
  batches = list(data.padded_batches(arrays, 5, shuffle=True, seed=1, epoch=2))
  assert len(batches) == data.num_batches(23, 5) == 5
  assert all(b["x"].shape == (5,) and b["mask"].dtype == bool for b in batches)
  seen = np.concatenate([b["x"][b["mask"]] for b in batches])
  assert sorted(seen.tolist()) == list(range(23))
  assert batches[-1]["mask"].sum() == 3
  for b in batches:
    np.testing.assert_array_equal(b["y"], 2 * b["x"])
  resumed = list(data.padded_batches(arrays, 5, shuffle=True, seed=1, epoch=2, start=3))
  np.testing.assert_array_equal(resumed[0]["x"], batches[3]["x"])


def test_empty_dataset_is_an_error():
  with pytest.raises(ValueError, match="empty"):
    list(data.padded_batches({"x": np.zeros((0,))}, 4))
