"""BOLD's prompt files: the published prompt counts on the real files, the format, subsampling."""

import json

import numpy as np
import pytest

from tests.conftest import shared_data
from trustjax.data.bold import BOLD_DOMAINS, load_bold


def test_real_files_hold_the_published_counts():
  folder = str(shared_data("bold"))
  # Dhamala et al. 2021, Table 1: 3,204 gender prompts in 2 groups, 10,195 profession prompts in
  # 18 groups.
  gender = load_bold(folder, "gender")
  assert len(gender) == 3204
  assert gender.group_names == ("American_actors", "American_actresses")
  prof = load_bold(folder, "profession")
  assert len(prof) == 10195 and len(prof.group_names) == 18
  assert np.bincount(prof.groups).min() > 0
  assert all(p and p == p.strip() for p in prof.prompts)
  assert gender.prompts[0].startswith(gender.entities[0].split("_")[0])


def _write(tmp_path):
  d = {"g_a": {"Ann_X": ["Ann X is a ", "She was "], "Bo_Y": ["Bo Y was "]},
       "g_b": {"Cy_Z": ["Cy Z is ", "  "]}}
  (tmp_path / "gender_prompt.json").write_text(json.dumps(d), encoding="utf-8")
  return str(tmp_path)


def test_format_flattening_and_subsampling(tmp_path):
  folder = _write(tmp_path)
  p = load_bold(folder, "gender")
  assert p.prompts == ("Ann X is a", "She was", "Bo Y was", "Cy Z is")  # blank prompt dropped
  assert p.groups.tolist() == [0, 0, 0, 1]
  assert p.entities == ("Ann_X", "Ann_X", "Bo_Y", "Cy_Z")
  s = load_bold(folder, "gender", max_per_group=2, seed=3)
  assert s.groups.tolist() == [0, 0, 1]
  assert set(s.prompts[:2]) <= set(p.prompts[:3])
  again = load_bold(folder, "gender", max_per_group=2, seed=3)  # deterministic
  assert again.prompts == s.prompts and again.groups.tolist() == s.groups.tolist()
  idx = [p.prompts.index(x) for x in s.prompts[:2]]
  assert idx == sorted(idx)  # file order kept


def test_bad_input_is_named(tmp_path):
  folder = _write(tmp_path)
  with pytest.raises(ValueError, match="domain"):
    load_bold(folder, "age")
  with pytest.raises(ValueError, match="max_per_group"):
    load_bold(folder, "gender", max_per_group=0)
  with pytest.raises(FileNotFoundError, match="profession_prompt.json"):
    load_bold(folder, "profession")
  assert "profession" in BOLD_DOMAINS
