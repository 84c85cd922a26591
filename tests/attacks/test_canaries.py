"""Canary helpers and exposure against its definition."""

import math

import numpy as np
import pytest

from trustjax.attacks import canaries
from trustjax.data import TextDataset


def test_exposure_rank_form():
  ref = np.arange(1.0, 1024.0)  # 1023 other candidates, |R| = 1024
  assert canaries.exposure(0.5, ref) == pytest.approx(10.0)  # ranked first: log2 |R|
  assert canaries.exposure(2000.0, ref) == pytest.approx(0.0)  # ranked last
  assert canaries.exposure(3.5, ref) == pytest.approx(10 - math.log2(4))  # three below it
  assert canaries.exposure(3.0, ref) == pytest.approx(10 - math.log2(4))  # a tie ranks after
  rng = np.random.default_rng(0)
  for _ in range(20):
    r, s = rng.normal(size=99), rng.normal()
    rank = 1 + sum(v <= s for v in r)
    assert canaries.exposure(s, r) == pytest.approx(math.log2(100) - math.log2(rank))
  with pytest.raises(ValueError, match="empty"):
    canaries.exposure(1.0, [])


def test_secrets_and_templates():
  s = canaries.make_secrets(50, digits=3, seed=1)
  assert len(set(s)) == 50 and all(len(x) == 3 and x.isdigit() for x in s)
  assert s == canaries.make_secrets(50, digits=3, seed=1)
  assert canaries.all_secrets(2)[:3] == ["00", "01", "02"] and len(canaries.all_secrets(3)) == 1000
  assert canaries.fill("pin {} now", ["12"]) == ["pin 12 now"]
  with pytest.raises(ValueError, match="num must lie"):
    canaries.make_secrets(11, digits=1)
  with pytest.raises(ValueError, match="exactly one"):
    canaries.fill("no slot", ["1"])


def test_insert_canaries_appends_repeated_copies():
  ds = TextDataset(texts=["a", "b", "c"], labels=np.array([0, 1, 0]), label_names=("x", "y"),
                   device_ids=np.array([5, 6, 7]))
  out, rows = canaries.insert_canaries(ds, ["s1", "s2"], [1, 0], repeats=3)
  assert len(out) == 9 and rows.shape == (2, 3)
  assert [out.texts[i] for i in rows[0]] == ["s1"] * 3
  assert [out.texts[i] for i in rows[1]] == ["s2"] * 3
  assert out.labels[rows[0]].tolist() == [1, 1, 1] and out.labels[rows[1]].tolist() == [0, 0, 0]
  assert out.device_ids[rows].tolist() == [[-1] * 3] * 2 and list(out.texts[:3]) == ["a", "b", "c"]
  with pytest.raises(ValueError, match="labels must lie"):
    canaries.insert_canaries(ds, ["s"], [2])
  with pytest.raises(ValueError, match="repeats"):
    canaries.insert_canaries(ds, ["s"], [1], repeats=0)
