"""The identity-bias driver end to end on Dixon et al.'s real sets (configs/bias_toxicity.py)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, load_file, override, shared_data
from trustjax.data import toxicity
from trustjax.fairness import experiments, group


def _config(tmp_path, **kw):
  mod = load_file("configs/bias_toxicity.py")
  return override(mod.get_config("runlocal"), results_dir=str(tmp_path),
                  **{"data.data_dir": str(shared_data("toxicity_bias")), **kw})


def test_bias_metrics_recomputed_from_the_scores():
  rng = np.random.default_rng(0)
  ds, ids = toxicity.load_madlibs(shared_data("toxicity_bias"))
  y = ds.labels
  # a scorer biased against one identity: "gay" adds to every score
  s = rng.normal(size=len(y)) + 1.0 * y + 2.0 * np.array([i == "gay" for i in ids])
  m = experiments.bias_metrics(y, s, ids, threshold=0.5, p=-5.0)
  gay = np.array([i == "gay" for i in ids])
  assert m["per_identity"]["gay"]["bpsn_auc"] == pytest.approx(group.bpsn_auc(y, s, gay))
  assert m["per_identity"]["gay"]["bpsn_auc"] < 0.4 < 0.6 < m["per_identity"]["jewish"]["bpsn_auc"]
  assert min(v["bpsn_auc"] for v in m["per_identity"].values()) == m["per_identity"]["gay"][
      "bpsn_auc"]
  assert len(m["per_identity"]) == 50
  has = np.array([i is not None for i in ids])
  assert m["demographic_parity_difference"] == pytest.approx(group.demographic_parity_difference(
      y[has], (s[has] > 0.5).astype(int), sensitive_features=np.array(ids, object)[has]))


def test_postprocessing_on_a_biased_scorer_closes_the_gaps_on_the_held_out_half():
  rng = np.random.default_rng(0)
  ds, ids = toxicity.load_madlibs(shared_data("toxicity_bias"))
  y = ds.labels
  gay = np.array([i == "gay" for i in ids])
  s = 1 / (1 + np.exp(-(rng.normal(size=len(y)) + 1.5 * y - 0.75 + 2.0 * gay)))
  fit = experiments.fit_half(ids, y)
  terms = experiments._terms(ids)  # pylint: disable=protected-access
  for t in ("gay", "old"):  # each (term, label) cell halved, rounding down
    for label in (0, 1):
      cell = (terms == t) & (y == label)
      assert fit[cell].sum() == cell.sum() // 2
  assert not fit[terms == ""].any()
  m = experiments.postprocess_metrics(y, s, ids, 0.5, ("demographic_parity", "equalized_odds"))
  held = (terms != "") & ~fit
  pred = (s[held] > 0.5).astype(int)
  assert m["heldout_equalized_odds_difference"] == pytest.approx(
      group.equalized_odds_difference(y[held], pred, sensitive_features=terms[held]), abs=1e-6)
  assert m["heldout_accuracy"] == pytest.approx(np.mean(pred == y[held]), abs=1e-6)
  # "gay" raises every score: the plain threshold's gaps are large; per-term thresholds fitted
  # on the other half bring them to sampling noise on this half, for some accuracy.
  assert m["heldout_demographic_parity_difference"] > 0.3
  assert m["heldout_equalized_odds_difference"] > 0.3
  assert m["demographic_parity_demographic_parity_difference"] < 0.15
  assert m["equalized_odds_equalized_odds_difference"] < 0.15
  assert 0.5 < m["equalized_odds_accuracy"] < m["heldout_accuracy"] + 0.02


def test_bias_study_runs_writes_its_report_and_resumes(tmp_path, monkeypatch):
  # (the sensitivity on 2 sentences per term and label: APS has its own tests, and over all
  # 76,564 sentences it took about half of this test's time)
  cfg = _config(tmp_path, aps_per_identity=2)
  summary = experiments.run(cfg, show_progress=False)
  work = tmp_path / cfg.run_name
  for f in ("config.json", "summary.json", "report.md", "plots/bias_aucs.png"):
    assert (work / f).exists(), f
  assert set(summary["train_sets"]) == {"nonfuzzed", "fuzzed"}
  for r in summary["train_sets"].values():
    assert r["train_examples"] == 1492 and len(r["per_identity"]) == 50
    assert 0.0 <= r["mean_bpsn_auc"] <= 1.0 and 0.0 <= r["overall_auc"] <= 1.0
  assert "| nonfuzzed |" in (work / "report.md").read_text()
  # Post-processing (the config asks for demographic parity and equalized odds): the held-out
  # half's rows are in the summary and the report, and each constraint narrows its own gap.
  assert summary["postprocess"] == ["demographic_parity", "equalized_odds"]
  assert summary["postprocess_fit_examples"] + summary["postprocess_heldout_examples"] == sum(
      i is not None for i in toxicity.load_madlibs(shared_data("toxicity_bias"))[1])
  for r in summary["train_sets"].values():
    for c in ("demographic_parity", "equalized_odds"):
      assert r[f"{c}_{c}_difference"] < r[f"heldout_{c}_difference"]
  assert "| nonfuzzed | equalized_odds |" in (work / "report.md").read_text()
  assert (work / "plots" / "postprocessing.png").exists()
  rates = summary["train_sets"]["fuzzed"]["postprocess_rates"]
  assert len(rates["groups"]) == 50 and set(rates) == {"groups", "heldout", "demographic_parity",
                                                         "equalized_odds"}
  eo = summary["train_sets"]["fuzzed"]["equalized_odds_equalized_odds_difference"]
  assert max(np.ptp(rates["equalized_odds"]["tpr"]), np.ptp(rates["equalized_odds"]["fpr"])) == (
      pytest.approx(eo, abs=1e-6))  # one seed: the mean rates are that seed's
  # A rerun reads every finished (training set, seed) from the run folder; more seeds train only
  # the new ones; another config is refused.
  trained = []
  real = experiments.train_and_score
  monkeypatch.setattr(experiments, "train_and_score",
                      lambda c, a, i, seed, **kw: trained.append(seed) or real(c, a, i, seed, **kw))
  again = experiments.run(cfg, show_progress=False)
  assert trained == [] and json.dumps(again, sort_keys=True) == json.dumps(summary, sort_keys=True)
  more = experiments.run(override(cfg, seeds=(0, 1)), show_progress=False)
  assert trained == [1, 1]  # one new seed per training set
  for name, r in more["train_sets"].items():
    assert r["overall_auc_sd"] > 0.0
    assert r["overall_auc"] != summary["train_sets"][name]["overall_auc"]
  with pytest.raises(ValueError, match="different config.*threshold"):
    experiments.run(override(cfg, threshold=0.4), show_progress=False)


@pytest.mark.parametrize("field,value,message", [
    ("data.train_sets", ("raw",), "train_sets"), ("seeds", (), "seeds"),
    ("threshold", 1.5, "threshold"), ("data.data_dir", "", "data_dir"),
    ("model.name", "bert", "model.name"), ("data.max_train", -1, "max_train must be >= 0"),
    ("data.eval_per_identity", -2, "eval_per_identity must be >= 0"),
    ("aps_per_identity", -1, "aps_per_identity must be >= 0"),
    ("train.learning_rate", 0.0, "train.learning_rate must be positive"),
    ("postprocess", ("parity",), "postprocess must list"),
    ("data.eval_per_identity", 1, "postprocess, inprocess and adversarial halve"),
    ("inprocess", ("demographic_parity",), "needs model.name='minilm'"),
    ("inprocess_eps", 0.0, "inprocess_eps, inprocess_l2, inprocess_min_group and"),
    ("inprocess_min_group", 0, "inprocess_eps, inprocess_l2, inprocess_min_group and"),
    ("inprocess_learner", "svm", "inprocess_learner must be"),
    ("inprocess_grid_limits", (0.5, 0.0), "inprocess_grid_limits must be positive"),
    ("adversarial", ("parity",), "adversarial must list"),
    ("adversarial", ("equalized_odds",), "adversarial trains on sentence embeddings"),
    ("adversarial_epochs", 0, "adversarial_alpha must be >= 0 and adversarial_epochs")])
def test_bad_bias_config_is_named(tmp_path, field, value, message):
  with pytest.raises(ValueError, match=message):
    experiments.run(_config(tmp_path, **{field: value}), show_progress=False)
  assert not (tmp_path / "bias_toxicity_runlocal").exists()


def test_bias_script_prints_the_table(tmp_path):
  out = subprocess.run(
      [sys.executable, "scripts/bias.py", "--config", "configs/bias_toxicity.py:runlocal",
       f"--config.results_dir={tmp_path}",
       f"--config.data.data_dir={shared_data('toxicity_bias')}", "--config.train.epochs=1",
       "--config.data.train_sets=('fuzzed',)", "--config.aps_per_identity=2"],
      cwd=REPO, capture_output=True, text=True, check=True)
  assert "| fuzzed |" in out.stdout
  assert "| fuzzed | equalized_odds |" in out.stdout  # the post-processing table too
  assert "+-" not in out.stdout  # one seed: no spread to show


def test_summary_table_shows_the_spread_only_over_several_seeds():
  keys = ("overall_auc", "mean_subgroup_auc", "mean_bpsn_auc", "mean_bnsp_auc",
          "demographic_parity_difference", "equalized_odds_difference", "aps")
  r = {**{k: 0.5 for k in keys}, **{f"{k}_sd": 0.125 for k in keys}}
  one = experiments.summary_table({"train_sets": {"a": r}, "seeds": [3]})
  assert "| a | 0.500 | 0.500 |" in one and "+-" not in one
  two = experiments.summary_table({"train_sets": {"a": r}, "seeds": [3, 4]})
  assert "| a | 0.500 +- 0.125 | 0.500 +- 0.125 |" in two
  assert "-" == experiments.reporting.mean_sd_cell({}, "aps", 2)


def test_protected_positions_mark_each_sentences_identity_words():
  from trustjax.data import build_word_tokenizer  # pylint: disable=import-outside-toplevel

  texts = ["i am a gay person", "being african american is great", "hello there"]
  tok = build_word_tokenizer(texts)
  tokens = tok.encode(texts, 8)
  term_ids = {t: [tok.token_id(w) for w in t.split()] for t in ("gay", "african american")}
  got = experiments.protected_positions(tokens, ["gay", "african american", None], term_ids)
  want = np.zeros((3, 8), bool)
  want[0, 3] = True
  want[1, 1:3] = True
  np.testing.assert_array_equal(got, want)


def test_bias_metrics_average_the_sensitivity_per_identity():
  y = np.array([0, 1, 0, 1, 0, 1])
  s = np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.7])
  ids = ["gay", "gay", "old", "old", None, None]
  aps = np.array([1.0, 3.0, 0.5, 0.5, 9.0, 9.0])
  m = experiments.bias_metrics(y, s, ids, threshold=0.5, p=-5.0, aps=aps)
  assert m["per_identity"]["gay"]["aps"] == pytest.approx(2.0)
  assert m["per_identity"]["old"]["aps"] == pytest.approx(0.5)
  assert m["aps"] == pytest.approx(1.25)  # sentences without a term are left out


def test_minilm_inputs_mark_the_identity_terms_word_pieces(tmp_path):
  cfg = _config(tmp_path, **{"model.name": "minilm"})
  texts = ["i am a gay person", "being african american is great", "hello there"]
  identities = ["gay", "african american", None]
  inputs = experiments.study_inputs(cfg, texts, identities, np.arange(3))
  assert inputs.eval_inputs.shape == (3, 384)  # frozen sentence embeddings
  np.testing.assert_allclose(np.linalg.norm(inputs.eval_inputs, axis=1), 1.0, rtol=1e-5)
  # [CLS] i am a gay person [SEP]; [CLS] being african american is great [SEP]
  assert np.flatnonzero(inputs.aps_protected[0]).tolist() == [4]
  assert np.flatnonzero(inputs.aps_protected[1]).tolist() == [2, 3]
  assert not inputs.aps_protected[2].any()
  np.testing.assert_allclose(inputs.encode_train(texts[:1]), inputs.eval_inputs[:1], rtol=1e-5,
                             atol=1e-6)


def test_comment_groups_keep_terms_with_both_labels():
  texts = (["the gay man is awful"] * 6 + ["a gay friend"] * 6 + ["african american art"] * 7
           + ["an american toxic rant"] * 2 + ["old news"] * 3 + ["nothing here"] * 4)
  labels = np.array([1] * 6 + [0] * 6 + [0] * 7 + [1] * 2 + [0] * 3 + [1] * 4)
  assert experiments.mentioned_terms(["African American and gay, not americans"]) == [
      ["african american", "gay"]]  # two-word terms first; whole words only
  g = experiments.comment_groups(texts, labels, 2)
  # "gay" has 6 and 6; "african american" and "american" lack toxic or non-toxic comments, and
  # "old" lacks toxic ones, so they form "other identity" (which has both labels).
  assert g.tolist() == (["gay"] * 12 + ["other identity"] * 12 + ["none"] * 4)
  g = experiments.comment_groups(texts[:12] + texts[-7:],
                                 np.concatenate([labels[:12], labels[-7:]]), 2)
  assert g.tolist() == ["gay"] * 12 + ["none"] * 7  # "other identity" (non-toxic only) joins none


def test_per_identity_sample_keeps_both_labels_of_every_term():
  ds, ids = toxicity.load_madlibs(shared_data("toxicity_bias"))
  idx = experiments.per_identity_sample(ids, ds.labels, 3)
  terms = [ids[i] for i in idx]
  assert len(idx) == 51 * 6 and np.all(np.diff(idx) > 0)
  for t in set(terms):
    sel = [i for i in idx if ids[i] == t]
    assert sorted(ds.labels[sel].tolist()) == [0, 0, 0, 1, 1, 1]
  np.testing.assert_array_equal(idx, experiments.per_identity_sample(ids, ds.labels, 3))
  np.testing.assert_array_equal(experiments.per_identity_sample(ids, ds.labels, 0),
                                np.arange(len(ids)))


def test_minilm_bias_study_runs_on_a_sample(tmp_path):
  cfg = _config(tmp_path, **{"model.name": "minilm", "model.mlp_dim": 16,
                             "data.train_sets": ("nonfuzzed",), "data.max_train": 80,
                             "data.eval_per_identity": 2, "aps_per_identity": 1,
                             "inprocess": ("demographic_parity", "equalized_odds"),
                             "inprocess_grid_limits": (1.0,),
                             "adversarial": ("equalized_odds",), "adversarial_epochs": 2})
  summary = experiments.run(cfg, show_progress=False)
  r = summary["train_sets"]["nonfuzzed"]
  assert list(r["adversarial"]) == ["no adversary (same training)", "adversarial, equalized_odds"]
  assert all(0.0 <= v["accuracy"] <= 1.0 and v["adversary_loss"] > 0
             for v in r["adversarial"].values())
  # In-processing on the training comments' embeddings: every rule is measured on the madlibs
  # held-out half, and each reduction meets its constraint on the comments.
  rules = r["inprocess"]
  assert list(rules) == ["unconstrained", "+ demographic_parity thresholds",
                         "+ equalized_odds thresholds", "decorrelated embeddings",
                         "exponentiated gradient, demographic_parity",
                         "exponentiated gradient, equalized_odds",
                         "grid search, demographic_parity", "grid search, equalized_odds"]
  assert sum(r["inprocess_groups"].values()) == 80
  for c in ("demographic_parity", "equalized_odds"):
    eg = rules[f"exponentiated gradient, {c}"]
    assert eg["train_violation"] <= 1e-9 and eg["classifiers"] >= 1
    assert 0.0 <= eg["accuracy"] <= 1.0
    gs = rules[f"grid search, {c}"]
    basis = (len(r["inprocess_groups"]) - 1) * (2 if c == "equalized_odds" else 1)
    assert len(gs["grid_train_errors"]) == 2 * basis + 1  # 0 and +-1 on each basis cell
    assert gs["train_error"] == gs["grid_train_errors"][gs["grid_point"]]
  report = (tmp_path / cfg.run_name / "report.md").read_text()
  assert "| exponentiated gradient, equalized_odds |" in report
  assert "| grid search, equalized_odds |" in report and "plots/grid_search.png" in report
  assert "## Adversarial debiasing" in report and "| adversarial, equalized_odds |" in report
  assert (tmp_path / cfg.run_name / "plots" / "grid_search.png").stat().st_size > 0
  assert summary["eval_examples"] == 51 * 4 and summary["aps_examples"] == 51 * 2
  assert r["train_examples"] == 80 and len(r["per_identity"]) == 50
  assert all(np.isfinite(v["aps"]) and v["aps"] >= 0 for v in r["per_identity"].values())
  assert 0.0 <= r["overall_auc"] <= 1.0 and np.isfinite(r["aps"])


def _synthetic_features():
  """The comments' group shifts the features and the toxic rate, and the madlibs-like sentences
  carry their term in the features too: (train_x, train_y, groups, x, y, identities)."""
  rng = np.random.default_rng(0)
  groups = rng.choice(np.array(["gay", "jewish", "none"]), 400)
  train_y = (rng.random(400) < np.where(groups == "gay", 0.6, 0.15)).astype(int)
  shift = lambda g: np.select([g == "gay", g == "jewish"], [1.5, -0.5], 0.0)[:, None]
  train_x = (rng.normal(size=(400, 8)) + shift(groups) + train_y[:, None]).astype(np.float32)
  ids = [t for t in ("gay", "jewish", "old") for _ in range(40)]
  y = np.tile(np.repeat([0, 1], 20), 3)
  x = (rng.normal(size=(120, 8)) + shift(np.array(ids)) + y[:, None]).astype(np.float32)
  return train_x, train_y, groups, x, y, ids


@pytest.mark.parametrize("learner", ["logistic_regression", "mlp"])
def test_inprocess_metrics_with_either_learner(tmp_path, learner):
  """Synthetic features (`_synthetic_features`)."""
  train_x, train_y, groups, x, y, ids = _synthetic_features()
  cfg = override(_config(tmp_path), inprocess=("demographic_parity", "equalized_odds"),
                 inprocess_learner=learner, inprocess_steps=100, inprocess_grid_limits=(2.0, 0.5),
                 **{"model.mlp_dim": 8})
  out = experiments.inprocess_metrics(train_x, train_y, groups, x, y, ids, cfg)
  assert list(out) == ["unconstrained", "+ demographic_parity thresholds",
                       "+ equalized_odds thresholds", "decorrelated embeddings",
                       "exponentiated gradient, demographic_parity",
                       "exponentiated gradient, equalized_odds",
                       "grid search, demographic_parity", "grid search, equalized_odds"]
  for c in ("demographic_parity", "equalized_odds"):
    assert out[f"exponentiated gradient, {c}"]["train_violation"] <= 1e-9
    gs = out[f"grid search, {c}"]
    # 0 and +-limit on each of 2 (demographic parity) or 4 basis cells, at two limits
    points = 1 + 2 * 2 * (4 if c == "equalized_odds" else 2)
    assert len(gs["grid_train_errors"]) == points and 0 <= gs["grid_point"] < points
    assert 0.0 <= gs["accuracy"] <= 1.0
    assert gs["train_violation"] == pytest.approx(gs["train_largest_moment"] - 0.01, abs=1e-12)
  # The grid holds lambda = 0, so the selected point's (error + largest moment) / 2 is at most the
  # unconstrained model's on the training comments (its rates measured by a float64 loop).
  learner_fn, _ = experiments.inprocess_learner(cfg)
  plain = np.asarray(learner_fn.predict(learner_fn.fit(
      train_x, train_y.astype(np.float32), np.ones(400, np.float32)), train_x), np.float64)
  gap = max(abs(plain[groups == v].mean() - plain.mean()) for v in set(groups))
  gs = out["grid search, demographic_parity"]
  assert (gs["train_error"] + gs["train_largest_moment"]
          <= np.mean(plain != train_y) + gap + 1e-9)
  # The term shifts the features, so the unconstrained model's selection rates differ by term;
  # the reduction for demographic parity narrows that gap on the held-out sentences.
  assert (out["exponentiated gradient, demographic_parity"]["demographic_parity_difference"]
          < out["unconstrained"]["demographic_parity_difference"])


def test_adversarial_metrics_on_synthetic_features(tmp_path):
  """Synthetic features (`_synthetic_features`): the adversary for demographic parity narrows
  the held-out parity gap against the same training without it (two seeds, means), and its
  loss ends higher."""
  train_x, train_y, groups, x, y, ids = _synthetic_features()
  cfg = override(_config(tmp_path), adversarial=("demographic_parity", "equalized_odds"),
                 adversarial_epochs=30, seeds=(0, 1), inprocess_learner="mlp",
                 **{"model.mlp_dim": 8, "train.learning_rate": 3e-3})
  out = experiments.adversarial_metrics(train_x, train_y, groups, x, y, ids, cfg)
  assert list(out) == ["no adversary (same training)", "adversarial, demographic_parity",
                       "adversarial, equalized_odds"]
  plain, fair = out["no adversary (same training)"], out["adversarial, demographic_parity"]
  assert fair["demographic_parity_difference"] < 0.5 * plain["demographic_parity_difference"]
  assert fair["adversary_loss"] > plain["adversary_loss"]
  assert plain["accuracy_sd"] >= 0 and set(plain) >= {"train_error", "train_error_sd"}
  table = experiments.adversarial_table({"seeds": [0, 1],
                                         "train_sets": {"nonfuzzed": {"adversarial": out}}})
  assert "| nonfuzzed | adversarial, equalized_odds |" in table and " +- " in table
