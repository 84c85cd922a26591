"""reporting.cached and reporting.start_resumable_run: the parts of a study that resumes."""

import json
import math

import ml_collections
import numpy as np
import pytest

from trustjax import reporting


def _cfg(tmp_path, **kw):
  c = ml_collections.ConfigDict({"results_dir": str(tmp_path), "run_name": "study",
                                 "seeds": (0,), "threshold": 0.5,
                                 "train": {"epochs": 2.0, "lr": 1e-3}})
  c.update(kw)
  return c


def test_cached_computes_once_and_always_returns_the_json_form(tmp_path):
  calls = []

  def compute():
    calls.append(1)
    return {"auc": np.float32(0.75), "per": {"a": np.float64(np.nan), 3: [np.int64(2), 1.5]},
            "arr": np.arange(3), "name": "x"}

  first = reporting.cached(str(tmp_path), "seed_0", compute)
  again = reporting.cached(str(tmp_path), "seed_0", compute)
  assert calls == [1]
  assert first["auc"] == 0.75 and type(first["auc"]) is float
  assert math.isnan(first["per"]["a"]) and first["per"]["3"] == [2, 1.5]
  assert first["arr"] == [0, 1, 2] and first["name"] == "x"
  assert json.dumps(first) == json.dumps(again)
  assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["seed_0.json"]
  def fail():
    raise RuntimeError("stopped")

  with pytest.raises(RuntimeError):  # a part that fails leaves nothing behind
    reporting.cached(str(tmp_path), "seed_1", fail)
  assert not (tmp_path / "parts" / "seed_1.json").exists()


def test_a_resumable_study_refuses_another_config_but_not_more_seeds(tmp_path):
  work = reporting.start_resumable_run(_cfg(tmp_path))
  assert json.loads((tmp_path / "study" / "config.json").read_text())["threshold"] == 0.5
  assert reporting.start_resumable_run(_cfg(tmp_path, seeds=(0, 1))) == work
  # results_dir may change (it is where the folder is found)
  assert reporting.start_resumable_run(_cfg(tmp_path / ".." / tmp_path.name)) is not None
  with pytest.raises(ValueError, match=r"different config \(threshold, train.lr\)"):
    reporting.start_resumable_run(_cfg(tmp_path, threshold=0.4,
                                       train={"epochs": 2.0, "lr": 1e-2}))
  with pytest.raises(ValueError, match=r"different config \(extra\)"):
    reporting.start_resumable_run(_cfg(tmp_path, extra=1))
