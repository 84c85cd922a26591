"""Dixon et al.'s bias sets, read from ../shared/data/toxicity_bias."""

import numpy as np
import pytest

from tests.conftest import shared_data
from trustjax.data import toxicity


def test_madlibs_and_wikipedia_comments_load_with_their_identities():
  root = shared_data("toxicity_bias")
  ds, ids = toxicity.load_madlibs(root)
  assert len(ds) == 76564 and ds.labels.mean() == 0.5
  terms = [t for t in ids if t is not None]
  # 50 identity terms, each in the same number of sentences; the rest are occupations
  counts = {t: terms.count(t) for t in set(terms)}
  assert len(counts) == 50 and set(counts.values()) == {1482}
  i = ds.texts.index("Mohammed is a rotten homosexual")
  assert ids[i] == "homosexual" and ds.labels[i] == 1
  assert toxicity.identity_of("Lucas is a great african american") == "african american"
  assert toxicity.identity_of("You are a fantastic dancer") is None
  plain, fuzzed = (toxicity.load_wiki_toxicity(root), toxicity.load_wiki_toxicity(root, fuzzed=True))
  assert len(plain) == len(fuzzed) == 1492
  np.testing.assert_array_equal(plain.labels, fuzzed.labels)
  assert plain.labels.sum() == 248  # toxic comments
  assert sum(a != b for a, b in zip(plain.texts, fuzzed.texts)) > 500  # identity terms swapped


def test_a_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="bias_madlibs_77k.csv"):
    toxicity.load_madlibs(tmp_path)
