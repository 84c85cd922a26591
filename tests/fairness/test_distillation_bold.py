"""The BOLD distillation study (configs/distill_shakespeare_bold.py) end to end on a small play
and small prompt files written by the test, its swapped windows, and its config checks."""

import json

import numpy as np
import pytest

from tests.conftest import load_file, override
from trustjax.data import build_word_tokenizer, load_shakespeare
from trustjax.fairness import counterfactual_swap, distillation, distillation_bold

_SPEECHES = ["He told his son that the king would come, and she told her daughter so.",
             "My lord, the queen is here; her ladies wait upon him.",
             "Good sir, your wife and your brother love you well.",
             "The man spoke, and the woman answered him with grace."]


def _play(n_speeches: int = 60) -> str:
  lines = ["THE TRAGEDY OF TESTING", "", "ACT I.", "", "SCENE I. A room.", ""]
  for i in range(n_speeches):
    lines += ["ALPHA." if i % 2 == 0 else "BETA.", _SPEECHES[i % len(_SPEECHES)], ""]
  return "\n".join(lines)


def _bold(folder):
  gender = {"American_actors": {"A_B": ["A B is an actor who ", "He was "]},
            "American_actresses": {"C_D": ["C D is an actress who ", "She was "]}}
  prof = {f"group_{g}": {f"E_{g}": [f"The {w} is a " for w in ("king", "lord", "man")]}
          for g in range(3)}
  (folder / "gender_prompt.json").write_text(json.dumps(gender), encoding="utf-8")
  (folder / "profession_prompt.json").write_text(json.dumps(prof), encoding="utf-8")


def _config(tmp_path, **kw):
  mod = load_file("configs/distill_shakespeare_bold.py")
  plays, bold = tmp_path / "plays", tmp_path / "bold"
  plays.mkdir(exist_ok=True)
  bold.mkdir(exist_ok=True)
  (plays / "testing_gut.txt").write_text(_play(), encoding="latin-1")
  _bold(bold)
  small = {"data.texts_dir": str(plays), "data.plays": (), "data.bold_dir": str(bold),
           "data.seq_len": 16, "data.eval_fraction": 0.2, "generation.prompt_tokens": 6,
           "generation.max_new_tokens": 8, "model.teacher.embed_dim": 16,
           "model.teacher.mlp_dim": 32, "model.student.embed_dim": 8,
           "model.student.num_heads": 2, "model.student.mlp_dim": 16,
           "train.teacher.batch_size": 16, "train.student.batch_size": 16,
           "train.teacher.epochs": 15.0, "train.student.epochs": 15.0}
  return override(mod.get_config("runlocal"), results_dir=str(tmp_path / "results"),
                  **{**small, **kw})


def test_swapped_windows_are_the_swapped_text_window_for_window(tmp_path):
  (tmp_path / "testing_gut.txt").write_text(_play(8), encoding="latin-1")
  corpus = load_shakespeare(str(tmp_path))
  tok = build_word_tokenizer([s for sp in corpus.speeches for s in sp])
  w, sw = distillation_bold.swapped_windows(corpus, tok, 10)
  assert w["inputs"].shape == sw["inputs"].shape
  # Each role's swapped stream, decoded, is the swap of its text (lower-cased, split in words).
  alpha = " ".join(counterfactual_swap(s) for s in corpus.speeches[0])
  stream = [int(t) for r in sw["inputs"][sw["client"] == 0] for t in r[r > 0]]
  want = [tok.token_id(x) for x in tok.split(alpha)]
  assert stream == want[:-1]  # the inputs stop one token short of the stream's end
  assert (w["inputs"] != sw["inputs"]).any()
  # "him" -> "her" in the text swap (the token permutation leaves "him" fixed).
  assert tok.token_id("her") in sw["inputs"][w["inputs"] == tok.token_id("him")]


def test_encode_prompts_keeps_the_end_of_long_prompts():
  tok = build_word_tokenizer(["the king is here and she is there"])
  ids, ln = distillation_bold.encode_prompts(tok, ["the king is here", "zebra"], 3)
  assert ln.tolist() == [3, 1]
  assert ids[0].tolist() == [tok.token_id(w) for w in ("king", "is", "here")]
  assert ids[1].tolist() == [tok.oov_id, 0, 0]
  with pytest.raises(ValueError, match="no tokens"):
    distillation_bold.encode_prompts(tok, ["  "], 3)


def test_bold_study_runs_writes_its_report_and_resumes(tmp_path, monkeypatch):
  cfg = _config(tmp_path)
  summary = distillation_bold.run(cfg, show_progress=False)
  work = tmp_path / "results" / cfg.run_name
  for f in ("config.json", "summary.json", "report.md", "plots/profession_female_share.png"):
    assert (work / f).exists(), f
  assert list(summary["models"]) == ["corpus", "teacher"] + list(distillation.STUDENTS)
  assert summary["prompts"] == {"gender": 4, "profession": 9}
  assert "test_perplexity" not in summary["models"]["corpus"]
  for name, r in summary["models"].items():
    for k in ("profession_polarised", "profession_female_share"):
      assert 0.0 <= r[k] <= 1.0 or np.isnan(r[k]), (name, k)
    assert -1.0 <= r["actors_compound"] <= 1.0
    assert len(r["profession_groups"]) == 3
    if name != "corpus":
      assert 1.0 < r["test_perplexity"] < summary["vocab_size"]
      assert 1.0 < r["swapped_test_perplexity"] < np.inf
  # Trained on both genders' windows, the CDA student predicts the swapped text about as well as
  # the text; the teacher, trained on the plays as written, does not (here 2.1x vs 1.05x).
  ratio = lambda r: r["swapped_test_perplexity"] / r["test_perplexity"]
  assert ratio(summary["models"]["kd_cda"]) < 1.25 < ratio(summary["models"]["teacher"])
  # Every continuation is made of vocabulary words (padding and OOV are never sampled).
  assert all("<oov>" not in t and "<pad>" not in t
             for r in summary["models"].values() for t in r["examples"])
  assert "| kd_cda_perturbed |" in (work / "report.md").read_text()
  # A rerun reads the finished seed from the run folder instead of training again.
  monkeypatch.setattr(distillation_bold, "run_seed", _no_training)
  again = distillation_bold.run(cfg, show_progress=False)
  assert json.dumps(again, sort_keys=True) == json.dumps(summary, sort_keys=True)


def _no_training(*args, **kwargs):
  raise AssertionError("a finished seed was trained again")


@pytest.mark.parametrize("field,value,message", [
    ("students", ("kd", "dpo"), "students"), ("distill.mode", "median", "mode"),
    ("generation.max_new_tokens", 12, "seq_len"), ("generation.per_group", 0, "per_group"),
    ("generation.temperature", -1.0, "generation.temperature must be >= 0"),
    ("generation.top_k", -2, "top_k >= 0"),
    ("data.bold_dir", "/nonexistent/bold", "bold_dir"), ("data.max_vocab", 2, "max_vocab")])
def test_bad_bold_config_is_named(tmp_path, field, value, message):
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    distillation_bold.run(_config(tmp_path, **{field: value}), show_progress=False)
  assert not (tmp_path / "results").exists()
