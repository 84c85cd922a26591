"""Word- and character-level tokenizers, saved with a run and loaded back identically.

A third kind, "hash", maps each word to one of `num_buckets` ids by a fixed hash (the hashing
trick of Weinberger et al., ICML 2009). Its vocabulary does not depend on any data, so it is the
tokenizer for DP training: a vocabulary built from the private training set is itself a release
of that set that no accountant covers.

All kinds map text to fixed-length int32 arrays `[n, max_length]` padded with `pad_id` (0). Ids 0 and 1
are reserved for padding and out-of-vocabulary tokens; the vocabulary is built from training text
only, so held-out words map to OOV exactly as they would at deployment.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import zlib
from typing import Iterable, Sequence

import numpy as np

PAD = "<pad>"
OOV = "<oov>"
_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def word_split(text: str) -> list[str]:
  """Lower-cases and splits into words and single punctuation marks."""
  return _WORD_RE.findall(text.lower())


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A vocabulary plus a splitting rule.

  Attributes:
    kind: "word" (lower-cased words and punctuation), "char" (raw characters) or "hash" (words
      hashed into `num_buckets` ids; data-independent).
    vocab: tuple of tokens; index = id. vocab[0] is PAD, vocab[1] is OOV. For "hash" only these two.
    num_buckets: number of hash buckets (kind "hash" only).
  """

  kind: str
  vocab: tuple[str, ...] = (PAD, OOV)
  num_buckets: int = 0

  def __post_init__(self):
    if self.kind not in ("word", "char", "hash"):
      raise ValueError(f"kind must be 'word', 'char' or 'hash', got {self.kind=}")
    if (self.kind == "hash") != (self.num_buckets > 0):
      raise ValueError(f"num_buckets must be > 0 exactly for kind 'hash', got {self.num_buckets=}")
    if tuple(self.vocab[:2]) != (PAD, OOV):
      raise ValueError(f"vocab must start with {PAD!r}, {OOV!r}; got {self.vocab[:2]}")
    object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.vocab)})

  pad_id = 0
  oov_id = 1

  @property
  def vocab_size(self) -> int:
    return len(self.vocab) + self.num_buckets

  def split(self, text: str) -> list[str]:
    return list(text) if self.kind == "char" else word_split(text)

  def token_id(self, token: str) -> int:
    if self.kind == "hash":
      return 2 + zlib.crc32(token.encode("utf-8")) % self.num_buckets
    return self._index.get(token, self.oov_id)  # pytype: disable=attribute-error

  def encode(self, texts: Sequence[str], max_length: int) -> np.ndarray:
    """Returns int32 ids `[len(texts), max_length]`, truncated and right-padded."""
    if max_length <= 0:
      raise ValueError(f"max_length must be positive, got {max_length=}")
    out = np.zeros((len(texts), max_length), np.int32)
    for row, text in enumerate(texts):
      ids = [self.token_id(t) for t in self.split(text)[:max_length]]
      out[row, : len(ids)] = ids
    return out

  def decode(self, ids: Iterable[int]) -> str:
    if self.kind == "hash":
      raise ValueError("a hashing tokenizer cannot decode: hashing is not invertible")
    toks = [self.vocab[i] for i in ids if i != self.pad_id]
    return (" " if self.kind == "word" else "").join(toks)

  def to_json(self) -> str:
    return json.dumps({"kind": self.kind, "vocab": list(self.vocab),
                       "num_buckets": self.num_buckets})

  @classmethod
  def from_json(cls, s: str) -> "Tokenizer":
    d = json.loads(s)
    return cls(kind=d["kind"], vocab=tuple(d["vocab"]), num_buckets=d.get("num_buckets", 0))

  def save(self, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
      f.write(self.to_json())

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Tokenizer":
    with open(path, encoding="utf-8") as f:
      return cls.from_json(f.read())


def _build(kind: str, texts: Iterable[str], max_vocab: int | None, min_freq: int) -> Tokenizer:
  if min_freq < 1:
    raise ValueError(f"min_freq must be >= 1, got {min_freq=}")
  if max_vocab is not None and max_vocab < 3:
    raise ValueError(f"max_vocab must be >= 3 (pad, oov and one token), got {max_vocab=}")
  counts: collections.Counter[str] = collections.Counter()
  n = 0
  for text in texts:
    counts.update(word_split(text) if kind == "word" else list(text))
    n += 1
  if n == 0:
    raise ValueError("cannot build a vocabulary from an empty corpus")
  # Most frequent first; ties broken alphabetically so the vocabulary is deterministic.
  items = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
  if max_vocab is not None:
    items = items[: max_vocab - 2]
  return Tokenizer(kind=kind, vocab=(PAD, OOV, *items))


def build_word_tokenizer(texts: Iterable[str], *, max_vocab: int | None = None,
                         min_freq: int = 1) -> Tokenizer:
  """Builds a word-level vocabulary from training texts."""
  return _build("word", texts, max_vocab, min_freq)


def build_char_tokenizer(texts: Iterable[str], *, max_vocab: int | None = None,
                         min_freq: int = 1) -> Tokenizer:
  """Builds a character-level vocabulary from training texts."""
  return _build("char", texts, max_vocab, min_freq)


def build_hash_tokenizer(num_buckets: int) -> Tokenizer:
  """A data-independent word tokenizer with `num_buckets` hash ids (plus pad and OOV)."""
  if num_buckets < 1:
    raise ValueError(f"num_buckets must be >= 1, got {num_buckets=}")
  return Tokenizer(kind="hash", num_buckets=num_buckets)
