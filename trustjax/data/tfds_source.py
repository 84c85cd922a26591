"""Text-classification sets through `tfds.data_source` (array_record; TensorFlow not needed).

Users prepare the data once with TFDS on a machine that has it (`tfds build glue/sst2` or
`tfds.data_source(name, download=True)`), then point `data_dir` at that folder.
"""

from __future__ import annotations

import importlib
import os

import numpy as np

from trustjax.data.corpus import TextDataset

# name -> (text feature(s), label feature, module that registers the builder without TensorFlow)
TEXT_DATASETS = {
    "glue/sst2": (("sentence",), "label", "tensorflow_datasets.text.glue"),
    "imdb_reviews": (("text",), "label", None),
    "ag_news_subset": (("title", "description"), "label", None),
}


def _as_str(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def load_tfds_text(name: str, split: str, *, data_dir: str | os.PathLike | None,
                   label_names: tuple[str, ...] | None = None,
                   max_examples: int | None = None) -> TextDataset:
  """Loads a TFDS text-classification split into memory.

  Args:
    name: one of TEXT_DATASETS ("glue/sst2", "imdb_reviews", "ag_news_subset").
    split: a TFDS split string ("train", "validation", "test", "train[:10%]").
    data_dir: the folder holding prepared TFDS data. None is only allowed under
      `tfds.testing.mock_data`.
    label_names: class names; default: read from the builder's info.
    max_examples: keep the first `max_examples` rows.
  """
  import tensorflow_datasets as tfds  # Imported lazily: a heavy import.

  if name not in TEXT_DATASETS:
    raise ValueError(f"unknown TFDS text dataset {name=}; supported: {sorted(TEXT_DATASETS)}")
  text_keys, label_key, module = TEXT_DATASETS[name]
  if module:
    importlib.import_module(module)
  how = (f"Prepare it once with `tfds build {name} --data_dir DIR --file_format array_record` (needs TensorFlow and network "
         "on that machine) or copy a prepared TFDS folder to DIR, then pass data_dir=DIR.")
  if data_dir is not None and not os.path.isdir(data_dir):
    raise FileNotFoundError(f"TFDS data_dir does not exist: {data_dir=}. {how}")
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises several types for "not prepared".
    raise FileNotFoundError(f"no prepared TFDS data for {name!r} in {data_dir=}: {e}. {how}") from e
  n = len(source) if max_examples is None else min(len(source), max_examples)
  if n == 0:
    raise ValueError(f"TFDS split {name}:{split} is empty")
  texts, labels = [], np.empty(n, np.int32)
  for i in range(n):
    row = source[i]
    texts.append(" ".join(_as_str(row[k]) for k in text_keys))
    labels[i] = int(row[label_key])
  if label_names is None:
    builder = tfds.builder(name, data_dir=data_dir)
    label_names = tuple(builder.info.features[label_key].names)
  return TextDataset(texts=texts, labels=labels, label_names=tuple(label_names))
