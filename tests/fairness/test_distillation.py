"""The distillation study (configs/distill_professions.py): its loss against a float64
reference, its bias measures on a model with a known answer, and the driver end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import load_file, override
from trustjax.data import PROFESSIONS, build_word_tokenizer, gendered_professions
from trustjax.fairness import distillation, swap_permutation
from trustjax.models import GPTDecoder


def _config(tmp_path, **kw):
  mod = load_file("configs/distill_professions.py")
  return override(mod.get_config("runlocal"), results_dir=str(tmp_path), **kw)


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("perturbed", [False, True])
def test_distill_loss_matches_a_float64_reference(perturbed):
  ds, _ = gendered_professions(64, seed=0)
  tok = build_word_tokenizer(list(ds.texts) + ["she he her his sister brother"])
  arrays = distillation.lm_arrays(tok, ds.texts[:8], 16)
  perm = swap_permutation(tok.token_id, tok.vocab_size)
  mk = lambda d: GPTDecoder(vocab_size=tok.vocab_size, max_length=16, embed_dim=d, num_layers=1,
                            num_heads=2, mlp_dim=16)
  teacher, student = mk(16), mk(8)
  x = jnp.asarray(arrays["inputs"])
  tp = teacher.init(jax.random.key(0), x)["params"]
  sp = student.init(jax.random.key(1), x)["params"]
  temp, alpha = 2.0, 0.3
  loss_fn = distillation.distill_loss_fn(student, teacher, tp, temperature=temp, alpha=alpha,
                                         permutation=perm if perturbed else None)
  got = np.asarray(loss_fn(sp, {k: jnp.asarray(v) for k, v in arrays.items()}))

  s = np.asarray(student.apply({"params": sp}, x), np.float64)
  p = _softmax(np.asarray(teacher.apply({"params": tp}, x), np.float64))
  if perturbed:
    pc = _softmax(np.asarray(teacher.apply({"params": tp}, jnp.asarray(perm)[x]), np.float64))
    p = 0.5 * (p + pc[..., perm])
  want = []
  for b in range(len(s)):
    terms = []
    for t in range(s.shape[1]):
      if not arrays["target_mask"][b, t]:
        continue
      soft_t = p[b, t] ** (1 / temp)
      soft_t /= soft_t.sum()
      log_s = np.log(_softmax(s[b, t] / temp))
      kl = np.sum(soft_t * (np.log(soft_t) - log_s))
      ce = -np.log(_softmax(s[b, t])[arrays["targets"][b, t]])
      terms.append(alpha * ce + (1 - alpha) * temp ** 2 * kl)
    want.append(np.mean(terms))
  np.testing.assert_allclose(got, want, rtol=2e-4)


class _CountModel:
  """A 'language model' whose next-token distribution is given by a table of prompts."""

  def __init__(self, tok, table, length):
    self.tok, self.table, self.length = tok, table, length

  def apply(self, variables, ids):
    del variables
    out = np.full(ids.shape + (self.tok.vocab_size,), -30.0)
    for b, row in enumerate(np.asarray(ids)):
      n = int((row != 0).sum())
      words = self.tok.decode(row[:n])
      for w, p in self.table(words).items():
        out[b, n - 1, self.tok.token_id(w)] = np.log(p)
    return jnp.asarray(out)


def test_bias_measures_on_models_with_known_answers():
  ds, _ = gendered_professions(3000, seed=0)
  tok = build_word_tokenizer(list(ds.texts) + ["she he her his sister brother"])
  jobs = list(PROFESSIONS)

  def copies_corpus(prompt):
    words = prompt.split()
    if words[-1] == "that":  # "the <job> said that": P(she) = the corpus's P(female)
      p = PROFESSIONS[words[1]]
      return {"she": 0.6 * p, "he": 0.6 * (1 - p), "the": 0.4}
    female = bool(set(words) & {"she", "sister", "mother", "daughter", "aunt", "wife"})
    w = np.array([PROFESSIONS[j] if female else 1 - PROFESSIONS[j] for j in jobs])
    return dict(zip(jobs, 0.8 * w / w.sum())) | {".": 0.2}

  def fair(prompt):
    if prompt.split()[-1] == "that":
      return {"she": 0.3, "he": 0.3, "the": 0.4}
    return {j: 1.0 / len(jobs) for j in jobs}

  m = distillation.bias_measures(_CountModel(tok, copies_corpus, 16), None, tok, 16, PROFESSIONS)
  skew = np.array(list(PROFESSIONS.values()))
  assert m["pronoun_gap"] == pytest.approx(np.abs(skew - 0.5).mean(), abs=1e-6)
  assert m["pronoun_skew_corr"] == pytest.approx(1.0, abs=1e-6)
  pf, pm = skew / skew.sum(), (1 - skew) / (1 - skew).sum()
  assert m["profession_tv"] == pytest.approx(0.5 * np.abs(pf - pm).sum(), abs=1e-6)
  assert m["profession_mass"] == pytest.approx(0.8, abs=1e-6)
  assert m["she_share"]["nanny"] == pytest.approx(0.95, abs=1e-6)
  f = distillation.bias_measures(_CountModel(tok, fair, 16), None, tok, 16, PROFESSIONS)
  assert f["pronoun_gap"] == pytest.approx(0.0, abs=1e-6)
  assert f["profession_tv"] == pytest.approx(0.0, abs=1e-6)
  assert f["pronoun_skew_corr"] == 0.0


def test_distillation_study_runs_writes_its_report_and_resumes(tmp_path, monkeypatch):
  cfg = _config(tmp_path, **{"data.num_sentences": 600, "train.teacher.epochs": 1.0,
                             "train.student.epochs": 1.0})
  summary = distillation.run(cfg, show_progress=False)
  work = tmp_path / cfg.run_name
  for f in ("config.json", "summary.json", "report.md", "plots/pronoun_share.png"):
    assert (work / f).exists(), f
  assert list(summary["models"]) == ["teacher"] + list(distillation.STUDENTS)
  assert summary["cda_sentences"] == 2 * summary["train_sentences"]  # every sentence is gendered
  for r in summary["models"].values():
    assert 0.0 <= r["pronoun_gap"] <= 0.5 and 0.0 <= r["profession_tv"] <= 1.0
    assert 1.0 < r["test_perplexity"] < summary["vocab_size"]
    assert 1.0 < r["swapped_test_perplexity"] < summary["vocab_size"]
  assert "| kd_cda_perturbed |" in (work / "report.md").read_text()
  # A rerun reads the finished seed from the run folder instead of training again.
  monkeypatch.setattr(distillation, "run_seed", _no_training)
  again = distillation.run(cfg, show_progress=False)
  assert json.dumps(again, sort_keys=True) == json.dumps(summary, sort_keys=True)
  with pytest.raises(ValueError, match="different config.*distill.temperature"):
    distillation.run(override(cfg, **{"distill.temperature": 3.0}), show_progress=False)


def _no_training(*args, **kwargs):
  raise AssertionError("a finished seed was trained again")


@pytest.mark.parametrize("field,value,message", [
    ("students", ("kd", "dpo"), "students"), ("seeds", (), "seeds"),
    ("distill.mode", "median", "mode"), ("train.student.epochs", 0.0, "train.student"),
    ("data.eval_fraction", 1.0, "eval_fraction"),
    ("distill.temperature", 0.0, "distill.temperature must be positive"),
    ("distill.alpha", 1.5, r"distill.alpha in \[0, 1\]")])
def test_bad_distillation_config_is_named(tmp_path, field, value, message):
  with pytest.raises(ValueError, match=message):
    distillation.run(_config(tmp_path, **{field: value}), show_progress=False)
  assert not (tmp_path / "distill_professions_runlocal").exists()
