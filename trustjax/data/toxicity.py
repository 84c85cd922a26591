"""Dixon et al.'s identity-term bias sets: the templated "madlibs" sentences and the Wikipedia
talk-page comments with a toxicity label (plain and "fuzzed", identity terms swapped at random).

Reference: Dixon, Li, Sorensen, Thain and Vasserman, "Measuring and Mitigating Unintended Bias in
Text Classification", AIES 2018. Files: conversationai/unintended-ml-bias-analysis,
archive/unintended_ml_bias/eval_datasets (`bias_madlibs_77k.csv`,
`toxicity_nonfuzzed_testset.csv`, `toxicity_fuzzed_testset.csv`).
"""

from __future__ import annotations

import csv
import os

import numpy as np

from trustjax.data.corpus import TextDataset

LABELS = ("not_toxic", "toxic")

# The identity terms the madlibs templates fill in (Dixon et al. 2018), two-word terms first so
# that "african american" is not read as "american".
IDENTITY_TERMS = (
    "african american", "middle eastern", "middle aged",
    "lesbian", "gay", "bisexual", "transgender", "trans", "queer", "lgbt", "lgbtq", "homosexual",
    "straight", "heterosexual", "male", "female", "nonbinary", "african", "black", "white",
    "european", "hispanic", "latino", "latina", "latinx", "mexican", "canadian", "american",
    "asian", "indian", "chinese", "japanese", "christian", "muslim", "jewish", "buddhist",
    "catholic", "protestant", "sikh", "taoist", "old", "older", "young", "younger", "teenage",
    "millenial", "elderly", "blind", "deaf", "paralyzed")


def _path(data_dir, name: str) -> str:
  path = os.path.join(os.fspath(data_dir), name)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{name} not found in {data_dir} (a copy of Dixon et al.'s "
                            "eval_datasets folder is expected)")
  return path


def identity_of(text: str) -> str | None:
  """The identity term a madlibs sentence ends with, or None (e.g. "You are a fantastic
  dancer")."""
  words = text.lower().split()
  for term in IDENTITY_TERMS:
    k = term.count(" ") + 1
    if words[-k:] == term.split():
      return term
  return None


def load_madlibs(data_dir) -> tuple[TextDataset, list]:
  """The 76,564 templated sentences (label toxic = BAD) and each one's identity term (or None)."""
  with open(_path(data_dir, "bias_madlibs_77k.csv"), encoding="utf-8", newline="") as f:
    rows = list(csv.DictReader(f))
  bad = {"BAD": 1, "NOT_BAD": 0}
  try:
    labels = np.array([bad[r["Label"]] for r in rows], np.int32)
  except KeyError as e:
    raise ValueError(f"unexpected madlibs label {e}; expected BAD or NOT_BAD") from None
  texts = [r["Text"] for r in rows]
  return TextDataset(texts=texts, labels=labels, label_names=LABELS), [identity_of(t)
                                                                        for t in texts]


def load_wiki_toxicity(data_dir, *, fuzzed: bool = False) -> TextDataset:
  """The 1,492 Wikipedia talk-page comments with a toxic label (`fuzzed`: the copy whose identity
  terms were replaced by others at random)."""
  name = f"toxicity_{'fuzzed' if fuzzed else 'nonfuzzed'}_testset.csv"
  with open(_path(data_dir, name), encoding="utf-8", newline="") as f:
    rows = list(csv.DictReader(f))
  labels = np.array([r["toxic"].strip().lower() == "true" for r in rows], np.int32)
  return TextDataset(texts=[r["comment"] for r in rows], labels=labels, label_names=LABELS)
