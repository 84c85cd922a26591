import pytest
import tensorflow_datasets as tfds

from trustjax import data


@pytest.mark.parametrize("name,num_classes", [("glue/sst2", 2), ("imdb_reviews", 2),
                                              ("ag_news_subset", 4)])
def test_tfds_text_under_mock_data(name, num_classes):
  with tfds.testing.mock_data(num_examples=12):
    ds = data.load_tfds_text(name, "train", data_dir=None)
  assert len(ds) == 12 and ds.num_classes == num_classes
  assert all(isinstance(t, str) for t in ds.texts)
  assert ds.labels.min() >= 0 and ds.labels.max() < num_classes


def test_missing_data_dir_explains_preparation(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build glue/sst2"):
    data.load_tfds_text("glue/sst2", "train", data_dir=tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="tfds build"):
    data.load_tfds_text("imdb_reviews", "train", data_dir=tmp_path)
  with pytest.raises(ValueError, match="unknown TFDS"):
    data.load_tfds_text("mnist", "train", data_dir=tmp_path)
