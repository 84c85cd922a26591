"""The audit driver end to end on real SNIPS queries (configs/audit_snips.py:runlocal)."""

import json
import subprocess
import sys

import dp_accounting
import numpy as np
import pytest

from tests.conftest import REPO, load_file, override, tiny_bert_checkpoint
from trustjax.attacks import experiments, membership, metrics, shadow


def _config(tmp_path, snips_dir, config="audit_snips.py", arg="runlocal", **kw):
  mod = load_file(f"configs/{config}")
  return override(mod.get_config(arg), results_dir=str(tmp_path),
                  **{"data.data_dir": str(snips_dir), **kw})


def _pld_epsilon(sigma, q, steps, delta):
  acc = dp_accounting.pld.PLDAccountant()
  acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
  return acc.get_epsilon(delta)


def test_audit_runs_resumes_and_relates_leakage_to_epsilon(tmp_path, snips_dir, monkeypatch):
  cfg = _config(tmp_path, snips_dir)
  summary = experiments.run(cfg, show_progress=False)
  work = tmp_path / cfg.run_name
  for f in ("config.json", "summary.json", "report.md", "plots/roc.png", "levels/nondp.npz",
            "levels/eps8.npz"):
    assert (work / f).exists(), f
  nondp, dp = summary["levels"]
  assert (nondp["level"], dp["level"]) == ("nondp", "eps8")
  # the DP level's epsilon is dp_accounting's for the mechanism that ran, and was calibrated to 8
  eps = _pld_epsilon(dp["noise_multiplier"], summary["sampling_rate"], dp["steps"],
                     summary["delta"])
  assert dp["epsilon"] == pytest.approx(eps, rel=1e-3) and 7.5 < eps <= 8.0 + 1e-6
  assert nondp["epsilon"] is None
  # without DP the models fit their members better and the loss reveals membership
  assert nondp["member_accuracy"] > nondp["nonmember_accuracy"]
  assert nondp["loss_auc"] > 0.55
  # RMIA from the saved statistics: the label's probability exp(-loss), every other model a
  # reference, the target's non-members its population
  stats = np.load(work / "levels" / "nondp.npz")
  is_in = shadow.membership_masks(4, stats["loss"].shape[1], seed=cfg.seed)  # the audit's
  rmia = membership.leave_one_out_rmia(np.exp(-stats["loss"].astype(np.float64)), is_in)
  assert nondp["rmia_auc"] == pytest.approx(metrics.roc_auc(is_in.ravel(), rmia.ravel()))
  for row in summary["levels"]:
    assert 0.0 <= row["lira_auc"] <= 1.0 and row["epsilon_lower_bound"] >= 0.0
    assert 0.0 <= row["rmia_auc"] <= 1.0 and row["rmia_epsilon_lower_bound"] >= 0.0
    for k in ("lira_auc", "rmia_auc", "loss_auc"):  # BCa intervals over the pool's examples
      low, high = row[f"{k}_low"], row[f"{k}_high"]
      assert low < row[k] < high and high - low < 0.2
    assert 0.0 <= row["inversion_in"] <= 1.0 and 0.0 <= row["ranked_first_in"] <= 1.0
    assert 0.0 <= row["exposure_in"] <= row["exposure_max_bits"] + 1e-9
  # a DP level's audit bound can never exceed a valid epsilon by much (95% confidence)
  assert dp["epsilon_lower_bound"] <= dp["epsilon"]
  assert dp["rmia_epsilon_lower_bound"] <= dp["epsilon"]
  # the one-run bound: the best of the targets' own, each at confidence 1 - 0.05 / 4
  loss = np.load(work / "levels" / "eps8.npz")["loss"]
  assert dp["one_run_epsilon_lower_bound"] == max(
      metrics.one_run_epsilon_lower_bound(is_in[t], -loss[t], delta=summary["delta"],
                                          confidence=1 - 0.05 / 4) for t in range(4))
  assert 0.0 <= dp["one_run_epsilon_lower_bound"] <= dp["epsilon"]
  assert stats["phi"].shape == (4, 304) and stats["exposure"].shape == (4, 4)
  # train.num_devices = 0: the 4 models over 4 of the tests' 8 CPU devices, one each
  assert [r["devices"] for r in summary["levels"]] == [4, 4]
  assert "| nondp |" in (work / "report.md").read_text()
  assert not list((work / "levels").glob("*.training"))  # no Ctrl-C checkpoint left behind

  # a rerun reuses the saved levels (no training) and reproduces the numbers, the epsilon of a
  # DP level included: from the noise it was trained with (saved), not from a new calibration
  assert float(np.load(work / "levels" / "eps8.npz")["noise_multiplier"]) == dp["noise_multiplier"]
  monkeypatch.setattr(experiments, "train_level", lambda *a, **k: pytest.fail("retrained"))
  monkeypatch.setattr(experiments.accounting, "calibrate_noise_multiplier",
                      lambda **k: 2 * dp["noise_multiplier"])
  again = experiments.run(cfg, show_progress=False)
  assert json.dumps(again["levels"], sort_keys=True) == json.dumps(summary["levels"],
                                                                   sort_keys=True)
  # a run folder from before the model.* fine-tuning fields existed still resumes; dropping a
  # level, changing the devices and the bootstrap are permitted changes; a different model is not
  stored = json.loads((work / "config.json").read_text())
  for k in ("pretrained_path", "frozen", "lora_rank", "lora_alpha"):
    del stored["model"][k]
  (work / "config.json").write_text(json.dumps(stored))
  (only,) = experiments.run(override(cfg, **{"dp.epsilons": (), "train.num_devices": 1,
                                             "audit.bootstrap_resamples": 0}),
                            show_progress=False)["levels"]
  assert only == {k: v for k, v in summary["levels"][0].items()
                  if not k.endswith(("_auc_low", "_auc_high"))}
  with pytest.raises(ValueError, match="train.num_devices must be >= 0"):
    experiments.model_mesh(-1, 4)
  with pytest.raises(ValueError, match="model.embed_dim"):
    experiments.run(override(cfg, **{"model.embed_dim": 32}), show_progress=False)


@pytest.mark.parametrize("field,value,message", [
    ("train.num_models", 3, "num_models must be even"),
    ("canaries.template", "pin{}x", "secret a word of its own"),
    ("data.tokenizer", "word", "uses 'hash'"),
    ("data.tokenizer", "pretrained", "set model.name='bert'"),
    ("model.name", "bert", "set data.tokenizer='pretrained'"),
    ("model.lora_rank", 4, "adapts a pretrained encoder"),
    ("model.frozen", "embed/nothing", "match no parameter"),
    ("data.pool_size", 10**6, "pool_size"),
    ("audit.bootstrap_resamples", 1, "bootstrap_resamples must be 0"),
    ("canaries.mislabeled", 301, "mislabeled must lie in"),
    ("audit.fprs", (0.01, 2.0), r"fprs must be false-positive rates in \[0, 1\]"),
    ("audit.fprs", (), "fprs must be"),
    ("audit.confidence", 1.0, "confidence must lie in"),
    ("audit.rmia_gamma", 0.0, "rmia_gamma must be positive"),
    ("audit.inversion_restarts", 0, "inversion_restarts must be >= 1"),
    ("train.dp_learning_rate", 0.0, "dp_learning_rate must be positive"),
    ("train.chunk_steps", 0, "chunk_steps must be >= 1"),
])
def test_bad_audit_config_is_named(tmp_path, snips_dir, field, value, message):
  cfg = _config(tmp_path, snips_dir, **{field: value})
  with pytest.raises(ValueError, match=message):
    experiments.AuditSetup(cfg)
  assert not (tmp_path / cfg.run_name).exists()


def test_mislabeled_canaries_get_another_intent_and_are_the_one_run_guesses(tmp_path,
                                                                          snips_dir):
  no_dp = {"dp.epsilons": ()}  # no noise calibration
  plain = experiments.AuditSetup(_config(tmp_path, snips_dir, **no_dp))
  setup = experiments.AuditSetup(_config(tmp_path, snips_dir, **no_dp,
                                         **{"canaries.mislabeled": 100}))
  rows = setup.mislabeled_rows
  assert len(np.unique(rows)) == 100 and not np.isin(rows, setup.canary_rows).any()
  before, after = plain.arrays["label"], setup.arrays["label"]
  # the same pool, queries and canaries; exactly the 100 rows relabeled, each to another intent
  np.testing.assert_array_equal(plain.arrays["tokens"], setup.arrays["tokens"])
  assert (after[rows] != before[rows]).all() and (after[rows] < setup.num_classes).all()
  keep = np.setdiff1d(np.arange(len(before)), rows)
  np.testing.assert_array_equal(after[keep], before[keep])
  np.testing.assert_array_equal(setup.one_run_rows, rows)
  np.testing.assert_array_equal(plain.one_run_rows, np.arange(len(before)))
  # the wrong intents spread over the other classes, none favoured
  shifts = (after[rows] - before[rows]) % setup.num_classes
  assert set(np.unique(shifts)) == set(range(1, setup.num_classes))


def test_auc_intervals_resample_examples_with_their_scores_under_every_model():
  """The audit's AUC intervals against a float64 loop on the same resamples: each resample
  repeats whole columns (an example under all 4 models), non-finite LiRA scores left out."""
  from sklearn.metrics import roc_auc_score  # pylint: disable=import-outside-toplevel
  from tests.test_stats import reference_interval  # pylint: disable=import-outside-toplevel
  from trustjax import stats  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  is_in = rng.random((4, 40)) < 0.5
  lira = rng.normal(0.8 * is_in, 1.0)
  lira[0, 3] = np.inf  # LiRA's score is not finite where a shadow set was degenerate
  loss = np.round(rng.normal(0.3 * is_in, 1.0), 1)
  got = experiments.auc_intervals(is_in, {"lira": lira, "loss": loss}, 300, 0.95, seed=7)
  weights = np.asarray(stats.bootstrap_weights(7, 40, 300))

  def auc_of_columns(scores, cols):
    y, s = is_in[:, cols].ravel(), scores[:, cols].ravel()
    return roc_auc_score(y[np.isfinite(s)], s[np.isfinite(s)])

  for name, scores in (("lira", lira), ("loss", loss)):
    _, low, high, _ = reference_interval(lambda cols, sc=scores: auc_of_columns(sc, cols),
                                         weights, 0.95, "bca")
    assert got[f"{name}_auc_low"] == pytest.approx(low, abs=2e-6)
    assert got[f"{name}_auc_high"] == pytest.approx(high, abs=2e-6)
  assert experiments.auc_intervals(is_in, {"lira": lira}, 0, 0.95) == {}


def test_audit_script_prints_the_table(tmp_path, snips_dir):
  out = subprocess.run(
      [sys.executable, "scripts/audit.py", "--config", "configs/audit_snips.py:runlocal",
       f"--config.results_dir={tmp_path}", f"--config.data.data_dir={snips_dir}",
       "--config.dp.epsilons=()", "--config.train.epochs=2"],
      cwd=REPO, capture_output=True, text=True, check=True)
  assert "| nondp | none |" in out.stdout
  assert (tmp_path / "audit_snips_runlocal" / "report.md").exists()


def test_audit_of_lora_fine_tuning_shares_the_frozen_encoder(tmp_path, snips_dir):
  """configs/audit_snips_bert.py:lora,runlocal on a small random-weight BERT checkpoint."""
  ckpt = tiny_bert_checkpoint(tmp_path / "ckpt")  # hidden 32, 2 layers, MiniLM's WordPiece
  cfg = _config(tmp_path, snips_dir, "audit_snips_bert.py", "lora,runlocal",
                **{"model.pretrained_path": ckpt, "dp.nondp": False})  # eps8 only
  setup = experiments.AuditSetup(cfg)
  # only the LoRA adapters (query and value: 32x8 and 8x32 each, 2 layers) and the head
  # (32 x 7 intents + 7) are stacked over models; the checkpoint's weights are one copy
  assert setup.trainable_parameters == 2 * 2 * (32 * 8 + 8 * 32) + 32 * 7 + 7
  assert setup.fixed["encoder"]["layer_0"]["attention"]["query"]["kernel"].shape == (32, 4, 8)
  # every candidate secret in the template, encoded as the pool encodes its canaries
  assert setup.space_tokens.shape == (1000, cfg.data.max_length)
  np.testing.assert_array_equal(setup.space_tokens[setup.secret_index], setup.canary_tokens)
  summary = experiments.run(cfg, show_progress=False)
  (dp,) = summary["levels"]
  eps = _pld_epsilon(dp["noise_multiplier"], summary["sampling_rate"], dp["steps"],
                     summary["delta"])
  assert dp["epsilon"] == pytest.approx(eps, rel=1e-3) and 7.5 < eps <= 8.0 + 1e-6
  assert summary["secret_space"] == 1000 and summary["trainable_parameters"] == 2279
  assert 0.0 <= dp["lira_auc"] <= 1.0 and 0.0 <= dp["loss_auc"] <= 1.0
  assert 0.0 <= dp["exposure_in"] <= dp["exposure_max_bits"] == pytest.approx(np.log2(1000))
  assert dp["inversion_in"] is None and dp["inversion_out"] is None  # WordPiece: not run
  work = tmp_path / cfg.run_name
  assert "inversion_hit" not in np.load(work / "levels" / "eps8.npz").files
  report = (work / "report.md").read_text()
  assert "LoRA rank 8" in report and "2,279 trained parameters" in report and "| n/a |" in report
  with pytest.raises(ValueError, match="takes more than data.max_length=6"):
    experiments.AuditSetup(override(cfg, **{"data.max_length": 6}))
  # the other modes: the head alone (a linear probe), and every parameter (as many as Hugging
  # Face counts in the checkpoint, and the head)
  from transformers import BertModel  # pylint: disable=import-outside-toplevel
  hf = BertModel.from_pretrained(ckpt, add_pooling_layer=False)  # the checkpoint has none
  for mode, count in (("head", 231), ("full", hf.num_parameters() + 231)):
    other = _config(tmp_path, snips_dir, "audit_snips_bert.py", f"{mode},runlocal",
                    **{"model.pretrained_path": ckpt, "dp.epsilons": ()})  # no calibration
    assert experiments.AuditSetup(other).trainable_parameters == count, mode
