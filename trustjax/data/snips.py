"""Loader for the SNIPS NLU benchmark (7 voice-assistant intents with slot spans, CC0).

Reads the folder `2017-06-custom-intent-engines` of github.com/sonos/nlu-benchmark (or any copy with
one sub-folder per intent holding `train_<Intent>_full.json` and `validate_<Intent>.json`).
Each file is `{"<Intent>": [{"data": [{"text": ..., "entity": ...}, ...]}, ...]}`; an utterance is
the concatenation of its segments' texts and each segment with an `entity` is a slot span.

Reference: Coucke et al., "Snips Voice Platform: an embedded Spoken Language Understanding system
for private-by-design voice interfaces", 2018 (arXiv:1805.10190).
"""

from __future__ import annotations

import json
import os

import numpy as np

from trustjax.data.corpus import TextDataset

SNIPS_INTENTS = ("AddToPlaylist", "BookRestaurant", "GetWeather", "PlayMusic", "RateBook",
                 "SearchCreativeWork", "SearchScreeningEvent")
_FILES = {"train": "train_{}_full.json", "validate": "validate_{}.json"}


def _read_json(path: str):
  """Reads JSON that is UTF-8, falling back to Latin-1 (one SNIPS file has a Latin-1 byte)."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError:
    text = raw.decode("latin-1")
  return json.loads(text)


def load_snips(data_dir: str | os.PathLike, split: str = "train") -> TextDataset:
  """Loads one split of SNIPS.

  Args:
    data_dir: folder with one sub-folder per intent.
    split: "train" (about 2,000 queries per intent) or "validate" (100 per intent).

  Returns:
    A TextDataset with labels in the order of SNIPS_INTENTS and slot spans.

  Raises:
    FileNotFoundError: if the folder or an intent file is missing, saying what is expected.
  """
  if split not in _FILES:
    raise ValueError(f"split must be one of {sorted(_FILES)}, got {split=}")
  data_dir = os.fspath(data_dir)
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(
        f"SNIPS folder not found: {data_dir=}. Clone github.com/sonos/nlu-benchmark and point "
        "data_dir at its 2017-06-custom-intent-engines folder.")
  texts, labels, slots = [], [], []
  for label, intent in enumerate(SNIPS_INTENTS):
    path = os.path.join(data_dir, intent, _FILES[split].format(intent))
    if not os.path.isfile(path):
      raise FileNotFoundError(f"SNIPS file missing: {path} (expected one folder per intent: "
                              f"{', '.join(SNIPS_INTENTS)})")
    for utterance in _read_json(path)[intent]:
      parts, spans, pos = [], [], 0
      for seg in utterance["data"]:
        if "entity" in seg:
          spans.append((seg["entity"], pos, pos + len(seg["text"])))
        parts.append(seg["text"])
        pos += len(seg["text"])
      texts.append("".join(parts).strip())
      labels.append(label)
      slots.append(spans)
  return TextDataset(texts=texts, labels=np.asarray(labels, np.int32), label_names=SNIPS_INTENTS,
                     slots=slots)
