"""Config -> gender bias passed from a teacher language model to distilled students -> a results
folder (`scripts/distill.py`).

The setting of Gupta et al. ("Mitigating Gender Bias in Distilled Language Models via
Counterfactual Role Reversal", Findings of ACL 2022), on the synthetic gendered-profession corpus
(`data.gendered_professions`), whose stereotype is known by construction. Per seed, a teacher
GPT is trained on the corpus, then smaller GPT students:

  scratch            trained on the corpus alone (no teacher)
  kd                 distilled from the teacher (`distillation_loss`: hard labels and soft)
  kd_cda             distilled on the corpus plus its gender-swapped copy
                     (`counterfactual_augment`, Lu et al. 2018)
  kd_perturbed       distilled from the role-reversed teacher (`perturb_teacher`)
  kd_cda_perturbed   both

Each model is measured on prompts that end where the stereotype shows:
- pronoun bias: after "the {job} said that" and "the {job} told us that", the share of "she"
  in P(she) + P(he), per profession; the summary is the mean |share - 0.5| over professions
  and its Pearson correlation with the corpus's P(female) (0 where the shares are constant);
- profession bias: after "{he/she} was hired as the new" and "my {brother/sister ...} was
  hired as the new", the distribution over professions (renormalised over the profession
  words); the summary is the mean total-variation distance between each male prompt and its
  female counterpart;
- quality: the held-out perplexity on the corpus's test split, which carries the stereotype,
  and on its gender-swapped copy, which reverses it; a model without the association scores
  the same on both.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from trustjax import reporting, training
from trustjax.data import build_word_tokenizer, professions as prof_data
from trustjax.fairness.counterfactual import (counterfactual_augment, counterfactual_swap,
                                              distillation_loss, perturb_teacher,
                                              swap_permutation)
from trustjax.models import GPTDecoder, lm_loss, lm_metrics
from trustjax.stats import mean_and_sd

STUDENTS = ("scratch", "kd", "kd_cda", "kd_perturbed", "kd_cda_perturbed")
PRONOUN_PROMPTS = ("the {job} said that", "the {job} told us that")
HIRED_PROMPTS = tuple([("he was hired as the new", "she was hired as the new")]
                      + [(f"my {m} was hired as the new", f"my {f} was hired as the new")
                         for m, f in prof_data.RELATIONS])


def check_common(cfg) -> None:
  """Checks the fields both distillation studies share: students, seeds, data.eval_fraction,
  train.teacher / train.student and distill (before anything trains)."""
  bad = [s for s in cfg.students if s not in STUDENTS]
  if bad or not cfg.students:
    raise ValueError(f"students must list some of {STUDENTS}, got {tuple(cfg.students)}")
  if not cfg.seeds:
    raise ValueError("seeds is empty")
  if not 0.0 < cfg.data.eval_fraction < 1.0:
    raise ValueError(f"data.eval_fraction must lie in (0, 1), got {cfg.data.eval_fraction}")
  for part in ("teacher", "student"):
    t = cfg.train[part]
    if t.epochs <= 0 or t.batch_size <= 0 or t.learning_rate <= 0:
      raise ValueError(f"train.{part}: epochs, batch_size and learning_rate must be positive, "
                       f"got {t.epochs=}, {t.batch_size=}, {t.learning_rate=}")
  if cfg.distill.mode not in ("mean", "max"):
    raise ValueError(f"distill.mode must be 'mean' or 'max', got {cfg.distill.mode!r}")
  if not cfg.distill.temperature > 0 or not 0.0 <= cfg.distill.alpha <= 1.0:
    raise ValueError(f"distill.temperature must be positive and distill.alpha in [0, 1], got "
                     f"{cfg.distill.temperature}, {cfg.distill.alpha}")


def _check(cfg) -> None:
  check_common(cfg)
  if cfg.data.num_sentences < 10:
    raise ValueError(f"data.num_sentences must be at least 10, got {cfg.data.num_sentences}")


def lm_arrays(tokenizer, texts, length: int) -> dict[str, np.ndarray]:
  """One example per sentence: inputs = tokens 0..L-1, targets = tokens 1..L (padding masked)."""
  ids = tokenizer.encode(texts, length + 1)
  return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "target_mask": ids[:, 1:] != 0}


def gpt(m, vocab_size: int, length: int) -> GPTDecoder:
  """A `GPTDecoder` from a config node (embed_dim, num_layers, num_heads, mlp_dim)."""
  return GPTDecoder(vocab_size=vocab_size, max_length=length, embed_dim=m.embed_dim,
                    num_layers=m.num_layers, num_heads=m.num_heads, mlp_dim=m.mlp_dim)


def distill_loss_fn(student, teacher, teacher_params, *, temperature: float, alpha: float,
                    permutation: np.ndarray | None = None, mode: str = "mean"):
  """`loss_fn(params, batch) -> [B]`: each sentence's mean per-token distillation loss; with a
  permutation, the teacher's targets are role-reversed (`perturb_teacher`)."""
  perm = None if permutation is None else jnp.asarray(permutation)

  def loss_fn(params, batch):
    x = batch["inputs"]
    s = student.apply({"params": params}, x)
    t = teacher.apply({"params": teacher_params}, x)
    if perm is not None:
      t = perturb_teacher(t, teacher.apply({"params": teacher_params}, perm[x]), perm,
                          mode=mode)
    loss = distillation_loss(s, jax.lax.stop_gradient(t), labels=batch["targets"],
                             temperature=temperature, alpha=alpha)
    m = batch["target_mask"].astype(jnp.float32)
    return (loss * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)

  return loss_fn


def train_model(model, loss_fn, arrays, t, length: int, seed: int, show_progress: bool):
  """Adam on `loss_fn` per the config node `t` (epochs, batch_size, learning_rate)."""
  return training.fit_adam_epochs(model, loss_fn, arrays, jnp.zeros((1, length), jnp.int32),
                                  learning_rate=t.learning_rate, batch_size=t.batch_size,
                                  epochs=t.epochs, seed=seed, show_progress=show_progress)


def train_models(cfg, vocab_size: int, length: int, arrays: dict, cda_arrays: dict,
                 permutation: np.ndarray, seed: int, show_progress: bool) -> dict:
  """The teacher (on `arrays`) and each of `cfg.students`: {name: (model, params)}. Students
  named "*cda*" train on `cda_arrays`, "*perturbed" distil from the role-reversed teacher."""
  teacher = gpt(cfg.model.teacher, vocab_size, length)
  student = gpt(cfg.model.student, vocab_size, length)
  t_params = train_model(teacher, lm_loss(teacher), arrays, cfg.train.teacher, length, seed,
                         show_progress)
  models = {"teacher": (teacher, t_params)}
  for name in cfg.students:
    if name == "scratch":
      loss = lm_loss(student)
    else:
      loss = distill_loss_fn(student, teacher, t_params, temperature=cfg.distill.temperature,
                             alpha=cfg.distill.alpha,
                             permutation=permutation if "perturbed" in name else None,
                             mode=cfg.distill.mode)
    data = cda_arrays if "cda" in name else arrays
    models[name] = (student, train_model(student, loss, data, cfg.train.student, length,
                                         seed + 1000, show_progress))
  return models


def param_counts(models: dict, students) -> dict[str, int]:
  """The teacher's and the (shared-architecture) students' parameter counts."""
  count = lambda params: int(sum(x.size for x in jax.tree.leaves(params)))
  return {"teacher_params": count(models["teacher"][1]),
          "student_params": count(models[students[0]][1])}


def perplexities(model, params, test: dict, swapped_test: dict) -> dict[str, float]:
  """Held-out perplexity on the test windows and on their gender-swapped copies."""
  step = training.make_eval_step(lm_metrics(model))
  return {"test_perplexity": float(np.exp(training.evaluate(step, params, test, 512)["loss"])),
          "swapped_test_perplexity": float(np.exp(
              training.evaluate(step, params, swapped_test, 512)["loss"]))}


def next_token_probs(model, params, tokenizer, prompts, length: int) -> np.ndarray:
  """P(next token) after each prompt's last word: float [len(prompts), vocab]."""
  ids = tokenizer.encode(prompts, length)
  last = (ids != 0).sum(1) - 1
  logits = model.apply({"params": params}, jnp.asarray(ids))
  return np.asarray(jax.nn.softmax(logits[jnp.arange(len(prompts)), jnp.asarray(last)], -1),
                    np.float64)


def bias_measures(model, params, tokenizer, length: int, jobs: dict[str, float]) -> dict:
  """Pronoun and profession bias of a language model on the corpus's prompts."""
  names = list(jobs)
  he, she = tokenizer.token_id("he"), tokenizer.token_id("she")
  share = np.zeros(len(names))
  for tmpl in PRONOUN_PROMPTS:
    p = next_token_probs(model, params, tokenizer, [tmpl.format(job=n) for n in names], length)
    share += p[:, she] / (p[:, she] + p[:, he]) / len(PRONOUN_PROMPTS)
  job_ids = np.array([tokenizer.token_id(n) for n in names])
  male = next_token_probs(model, params, tokenizer, [m for m, _ in HIRED_PROMPTS], length)
  female = next_token_probs(model, params, tokenizer, [f for _, f in HIRED_PROMPTS], length)
  pm = male[:, job_ids] / male[:, job_ids].sum(1, keepdims=True)
  pf = female[:, job_ids] / female[:, job_ids].sum(1, keepdims=True)
  skew = np.array([jobs[n] for n in names])
  # Pearson correlation; 0 where the shares are constant (a model without the association).
  corr = float(np.corrcoef(share, skew)[0, 1]) if share.std() > 1e-9 else 0.0
  return {"pronoun_gap": float(np.abs(share - 0.5).mean()),
          "pronoun_skew_corr": corr,
          "profession_tv": float((0.5 * np.abs(pm - pf).sum(1)).mean()),
          "profession_mass": float(0.5 * (male[:, job_ids].sum(1).mean()
                                          + female[:, job_ids].sum(1).mean())),
          "she_share": {n: float(s) for n, s in zip(names, share)}}


def run_seed(cfg, seed: int, *, show_progress: bool = True) -> dict:
  """Trains the teacher and every student for one seed; returns each model's measures."""
  corpus, _ = prof_data.gendered_professions(cfg.data.num_sentences, seed=seed)
  train, test = corpus.split(cfg.data.eval_fraction, seed)
  augmented = counterfactual_augment(train)
  tok = build_word_tokenizer(list(augmented.texts))
  length = cfg.data.max_length
  arrays = lm_arrays(tok, train.texts, length)
  cda_arrays = lm_arrays(tok, augmented.texts, length)
  test_arrays = lm_arrays(tok, test.texts, length)
  swapped_test = lm_arrays(tok, [counterfactual_swap(t) for t in test.texts], length)
  perm = swap_permutation(tok.token_id, tok.vocab_size)
  models = train_models(cfg, tok.vocab_size, length, arrays, cda_arrays, perm, seed,
                        show_progress)
  out = {}
  for name, (model, params) in models.items():
    out[name] = {**bias_measures(model, params, tok, length, prof_data.PROFESSIONS),
                 **perplexities(model, params, test_arrays, swapped_test)}
  out["_meta"] = {"train_sentences": len(train), "cda_sentences": len(augmented),
                  "test_sentences": len(test), "vocab_size": tok.vocab_size,
                  **param_counts(models, cfg.students)}
  return out


SUMMARY_KEYS = ("pronoun_gap", "pronoun_skew_corr", "profession_tv", "profession_mass",
                "test_perplexity", "swapped_test_perplexity")


def _plot(summary: dict, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  skew = prof_data.PROFESSIONS
  names = list(skew)
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--", label="copies the corpus")
  ax.axhline(0.5, color="0.4", lw=1, ls=":", label="fair")
  for i, (model, r) in enumerate(summary["models"].items()):
    ax.plot([skew[n] for n in names], [r["she_share"][n] for n in names], "o", ms=4,
            color=f"C{i}", label=model, alpha=0.8)
  ax.set_xlabel("P(female subject) in the training corpus")
  ax.set_ylabel('P(she) / (P(he) + P(she)) after "the <job> said that"')
  ax.set_xlim(-0.02, 1.02)
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper left")
  reporting.save_figure(fig, path)


def run(cfg: ml_collections.ConfigDict, *, show_progress: bool = True) -> dict:
  """Trains and measures per `cfg`; writes results/<run_name>/. Returns the summary."""
  _check(cfg)
  workdir = reporting.start_resumable_run(cfg)
  runs = [reporting.cached(workdir, f"seed_{seed}",
                           lambda seed=seed: run_seed(cfg, seed, show_progress=show_progress))
          for seed in cfg.seeds]
  models = {}
  for name in ["teacher"] + list(cfg.students):
    rs = [r[name] for r in runs]
    agg = mean_and_sd(rs, SUMMARY_KEYS)
    agg["she_share"] = {n: float(np.mean([r["she_share"][n] for r in rs]))
                        for n in rs[0]["she_share"]}
    models[name] = agg
  summary = {"models": models, "seeds": list(cfg.seeds), **runs[0]["_meta"],
             "backend": jax.default_backend()}
  reporting.write_json(os.path.join(workdir, "summary.json"), summary)
  _plot(summary, os.path.join(workdir, "plots", "pronoun_share.png"))
  with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
    f.write(report(cfg, summary))
  return summary


def summary_table(summary: dict) -> str:
  cols = ["model", "pronoun gap", "corr. with corpus", "profession TV", "test perplexity",
          "swapped test perplexity"]
  rows = [[name] + [reporting.mean_sd_cell(r, k, len(summary["seeds"])) for k in (
      "pronoun_gap", "pronoun_skew_corr", "profession_tv", "test_perplexity",
      "swapped_test_perplexity")]
          for name, r in summary["models"].items()]
  return reporting.markdown_table(cols, rows)


def report(cfg, summary: dict) -> str:
  names = list(summary["models"])
  jobs = list(prof_data.PROFESSIONS)
  rows = [[j, prof_data.PROFESSIONS[j]] + [summary["models"][n]["she_share"][j] for n in names]
          for j in sorted(jobs, key=prof_data.PROFESSIONS.get)]
  return "\n".join([
      f"# Bias through distillation {cfg.run_name}", "",
      f"Command: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`", "",
      f"{summary['train_sentences']} training sentences ({summary['cda_sentences']} with the "
      f"swapped copies), {summary['test_sentences']} test sentences, vocabulary "
      f"{summary['vocab_size']}; teacher {summary['teacher_params']} parameters, students "
      f"{summary['student_params']}; {reporting.seeds_note(summary['seeds'])}. "
      f"Pronoun gap: mean |P(she) share - 0.5| over {len(jobs)} professions (0 is fair, the "
      f"corpus itself has {np.abs(np.array(list(prof_data.PROFESSIONS.values())) - 0.5).mean():.3f}); "
      "profession TV: mean total-variation distance between the profession distributions after "
      "matched male and female prompts (0 is fair).", "",
      summary_table(summary), "",
      "## P(she) share per profession" + reporting.over_seeds(summary["seeds"]), "",
      reporting.markdown_table(["profession", "corpus P(female)"] + names, rows), "",
      "![pronoun share](plots/pronoun_share.png)", ""])


def default_config() -> ml_collections.ConfigDict:
  """Every field the distillation study reads; configs/distill_*.py start from this."""
  c = ml_collections.ConfigDict()
  c.seeds = (0, 1, 2)
  c.results_dir = "results"
  c.run_name = "distill"
  c.students = STUDENTS
  c.data = ml_collections.ConfigDict()
  c.data.num_sentences = 20000
  c.data.eval_fraction = 0.1
  c.data.max_length = 16  # tokens per sentence (the longest sentence has 10 words)
  c.model = ml_collections.ConfigDict()
  c.model.teacher = ml_collections.ConfigDict(
      {"embed_dim": 64, "num_layers": 2, "num_heads": 4, "mlp_dim": 256})
  c.model.student = ml_collections.ConfigDict(
      {"embed_dim": 32, "num_layers": 1, "num_heads": 2, "mlp_dim": 64})
  c.train = ml_collections.ConfigDict()
  c.train.teacher = ml_collections.ConfigDict(
      {"epochs": 4.0, "batch_size": 128, "learning_rate": 3e-3})
  c.train.student = ml_collections.ConfigDict(
      {"epochs": 4.0, "batch_size": 128, "learning_rate": 3e-3})
  c.distill = ml_collections.ConfigDict()
  c.distill.temperature = 2.0
  c.distill.alpha = 0.5  # hard-label weight (DESIGN's convention)
  c.distill.mode = "mean"  # perturb_teacher's mode: mean | max
  return c
