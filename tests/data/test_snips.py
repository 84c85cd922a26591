import numpy as np
import pytest

from trustjax import data


def test_loads_real_snips(snips_dir):
  train = data.load_snips(snips_dir, "train")
  val = data.load_snips(snips_dir, "validate")
  assert train.label_names == data.SNIPS_INTENTS
  assert len(val) == 700 and np.all(np.bincount(val.labels) == 100)
  counts = np.bincount(train.labels, minlength=7)
  assert len(train) == counts.sum() and counts.min() > 1900  # about 2,000 per intent
  # PlayMusic's training file is not valid UTF-8; it must still load, every query of it.
  assert counts[data.SNIPS_INTENTS.index("PlayMusic")] > 1900
  # The first GetWeather training query, reassembled from its segments, with its slot spans.
  i = int(np.argmax(train.labels == data.SNIPS_INTENTS.index("GetWeather")))
  assert train.texts[i] == ("What will the weather be this year in Horseshoe Lake State Fish "
                            "and Wildlife Area?")
  assert [(n, train.texts[i][a:b]) for n, a, b in train.slots[i]] == [
      ("timeRange", "this year"), ("geographic_poi", "Horseshoe Lake State Fish and Wildlife Area")]
  for text, spans in zip(train.texts[:2000], train.slots[:2000]):
    for _, start, end in spans:
      assert 0 <= start < end and text[start:end].strip()


def test_missing_folder_says_what_to_do(tmp_path):
  with pytest.raises(FileNotFoundError, match="nlu-benchmark"):
    data.load_snips(tmp_path / "nope")
  (tmp_path / "AddToPlaylist").mkdir()
  with pytest.raises(FileNotFoundError, match="SNIPS file missing"):
    data.load_snips(tmp_path)
