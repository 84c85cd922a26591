import numpy as np
import pytest

from trustjax import data


def test_word_tokenizer_round_trip(tmp_path):
  texts = ["Play the Beatles, please!", "play jazz", "the weather in Paris"]
  tok = data.build_word_tokenizer(texts)
  path = tmp_path / "tok.json"
  tok.save(path)
  loaded = data.Tokenizer.load(path)
  assert loaded == tok
  probe = texts + ["unseen words here", ""]
  np.testing.assert_array_equal(loaded.encode(probe, 6), tok.encode(probe, 6))
  enc = tok.encode(["play zebra"], 4)
  assert enc.dtype == np.int32 and enc.shape == (1, 4)
  assert enc[0, 1] == tok.oov_id and enc[0, 2] == tok.pad_id
  assert tok.decode(tok.encode(["play the beatles"], 5)[0]) == "play the beatles"


def test_vocabulary_order_and_limits():
  tok = data.build_word_tokenizer(["b a a c c c", "a c"], max_vocab=4, min_freq=1)
  assert tok.vocab == ("<pad>", "<oov>", "c", "a")  # by frequency, truncated
  tok2 = data.build_word_tokenizer(["b a a c c c", "a c"], min_freq=2)
  assert "b" not in tok2.vocab


def test_char_and_hash_tokenizers(tmp_path):
  ch = data.build_char_tokenizer(["abc", "abd"])
  np.testing.assert_array_equal(ch.encode(["abz"], 4)[0, 2], ch.oov_id)
  hashed = data.build_hash_tokenizer(97)
  again = data.Tokenizer.from_json(hashed.to_json())
  ids = hashed.encode(["the same words", "the same"], 5)
  np.testing.assert_array_equal(ids, again.encode(["the same words", "the same"], 5))
  assert ids[0, 0] == ids[1, 0] and ids.max() < hashed.vocab_size and ids[0, 0] >= 2
  with pytest.raises(ValueError, match="cannot decode"):
    hashed.decode(ids[0])


def test_bad_input():
  with pytest.raises(ValueError, match="empty corpus"):
    data.build_word_tokenizer([])
  with pytest.raises(ValueError, match="max_length"):
    data.build_hash_tokenizer(8).encode(["a"], 0)
