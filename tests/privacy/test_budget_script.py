"""scripts/privacy_budget.py: the budget before a run (against dp_accounting through the library's
own calls) and the budgets of finished runs read back from their checkpoints' ledgers."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, load_file
from tests.privacy.helpers import checkpoint_with_ledger
from trustjax import training
from trustjax.experiments import default_delta
from trustjax.privacy import accounting, sampling
from trustjax.privacy.dp_mf import bsr_coefficients, choose_amplified_bands


def _script(*args, cwd=REPO):
  """The script in a fresh process, as a user runs it."""
  return subprocess.run([sys.executable, str(REPO / "scripts" / "privacy_budget.py"), *args],
                        capture_output=True, text=True, cwd=cwd, timeout=600)


budget = load_file("scripts/privacy_budget.py")


def _main(capsys, *args):
  """The script's main in this process (no interpreter start-up): (exit status, stdout, stderr)."""
  try:
    budget.main(list(args))
    code = 0
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


def _rows(out):
  return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
          if line.startswith("| ") and not line.startswith("| epochs") and
          not line.startswith("| run ")]


def test_budget_before_a_run_with_a_noise_multiplier_and_a_plot(tmp_path):
  plot = tmp_path / "eps.png"
  proc = _script("--examples", "1000", "--batch-size", "50", "--epochs", "3",
                 "--noise-multiplier", "1.3", "--points", "3", "--plot", str(plot))
  assert proc.returncode == 0, proc.stderr[-2000:]
  q, steps, delta = 0.05, 60, default_delta(1000)  # 1e-4: the driver's default
  assert delta == 1e-4 and "delta = 0.0001" in proc.stdout
  rows = _rows(proc.stdout)
  assert [int(r[1]) for r in rows] == [20, 40, 60]
  for r in rows:
    for col, acc in ((2, "pld"), (3, "rdp")):
      want = accounting.epsilon(noise_multiplier=1.3, sampling_rate=q, steps=int(r[1]),
                                delta=delta, accountant=acc)
      assert float(r[col]) == pytest.approx(want, rel=1e-3), (r, acc)
  max_b = sampling.default_max_batch_size(1000, q, steps)
  assert f"static batch size {max_b} (the driver's default on one device)" in proc.stdout
  assert plot.stat().st_size > 0


def test_budget_before_a_run_calibrates_as_the_driver_does(capsys):
  code, out, _ = _main(capsys, "--examples", "1000", "--batch-size", "100", "--epochs", "2",
                       "--target-epsilon", "4", "--delta", "1e-5", "--points", "1")
  assert code == 0
  sigma = accounting.calibrate_noise_multiplier(target_epsilon=4, sampling_rate=0.1, steps=20,
                                                delta=1e-5)
  assert f"noise multiplier {sigma:.6g}: the smallest" in out
  (row,) = _rows(out)
  assert row[1] == "20" and float(row[2]) <= 4.0
  assert float(row[2]) == pytest.approx(accounting.epsilon(
      noise_multiplier=sigma, sampling_rate=0.1, steps=20, delta=1e-5), rel=1e-3)


def test_dp_ftrl_budget_counts_trees_as_the_driver_does(capsys):
  """1000 examples in batches of 300: T = 4 steps per tree; 2.5 epochs = 10 steps in 3 trees."""
  code, out, _ = _main(capsys, "--examples", "1000", "--batch-size", "300", "--epochs", "2.5",
                       "--target-epsilon", "4", "--delta", "1e-5", "--points", "2",
                       "--mechanism", "dp_ftrl")
  assert code == 0, out
  sigma = accounting.calibrate_dp_ftrl_noise_multiplier(target_epsilon=4, steps_per_tree=4,
                                                        trees=3, delta=1e-5)
  assert f"noise multiplier {sigma:.6g} per tree node" in out
  assert "4 steps per epoch and tree (depth 3)" in out and "10 steps in 3 trees" in out
  rows = _rows(out)
  assert [r[1] for r in rows] == ["5", "10"]
  for r, trees in zip(rows, (2, 3)):
    for col, acc in ((2, "pld"), (3, "rdp")):
      want = accounting.dp_ftrl_epsilon(noise_multiplier=sigma, steps_per_tree=4, trees=trees,
                                        delta=1e-5, accountant=acc)
      assert float(r[col]) == pytest.approx(want, rel=1e-3), (r, acc)
  assert float(rows[-1][2]) <= 4.0 < float(rows[-1][3])  # calibrated on PLD; RDP is looser


def test_dp_mf_budget_is_the_release_of_the_first_t_steps(capsys):
  """1000 examples in batches of 300: k = 4 steps per epoch, 2.5 epochs = 10 steps, 4 bands
  (min(k, 64)) of the momentum-0.9 workload; each row's epsilon is that of the first t rows."""
  code, out, _ = _main(capsys, "--examples", "1000", "--batch-size", "300", "--epochs", "2.5",
                       "--target-epsilon", "2", "--delta", "1e-5", "--points", "2",
                       "--mechanism", "dp_mf", "--momentum", "0.9")
  assert code == 0, out
  c = bsr_coefficients(4, 0.9)
  sigma = accounting.calibrate_mf_noise_multiplier(target_epsilon=2, coefficients=c, steps=10,
                                                   separation=4, delta=1e-5)
  assert f"noise multiplier {sigma:.6g} per row of C G" in out
  assert "4 steps per epoch, 2.5 epochs = 10 steps, 4 bands, workload momentum 0.9" in out
  assert f"sensitivity {accounting.mf_sensitivity(c, 10, 4):.4g} clip norms" in out
  rows = _rows(out)
  assert [r[1] for r in rows] == ["5", "10"]
  for r, steps in zip(rows, (5, 10)):
    for col, acc in ((2, "pld"), (3, "rdp")):
      want = accounting.mf_epsilon(noise_multiplier=sigma, coefficients=c, steps=steps,
                                   separation=4, delta=1e-5, accountant=acc)
      assert float(r[col]) == pytest.approx(want, rel=1e-3), (r, acc)
  assert float(rows[0][2]) < float(rows[-1][2]) <= 2.0 < float(rows[-1][3])
  code, _, err = _main(capsys, "--examples", "1000", "--batch-size", "300", "--epochs", "1",
                       "--noise-multiplier", "1", "--mechanism", "dp_mf", "--bands", "-2")
  assert code == 2 and "--bands must be >= 0" in err


def test_amplified_mf_budget_chooses_bands_and_accounts_as_the_driver_does(capsys):
  """1000 examples, expected batch 50, 3 epochs = 60 steps; --bands 0 picks b as the driver
  does; each row's epsilon is DP-SGD's at sigma / ||c|| over ceil(t / b) steps, from
  dp_accounting through the library."""
  code, out, _ = _main(capsys, "--examples", "1000", "--batch-size", "50", "--epochs", "3",
                       "--target-epsilon", "1", "--delta", "1e-5", "--points", "2",
                       "--mechanism", "amplified_mf", "--momentum", "0.9")
  assert code == 0, out
  b = choose_amplified_bands(target_epsilon=1, batch_size=50, num_examples=1000, steps=60,
                             delta=1e-5, momentum=0.9)
  c, q = bsr_coefficients(b, 0.9), b * 50 / 1000
  sigma = accounting.calibrate_amplified_mf_noise_multiplier(
      target_epsilon=1, sampling_rate=q, coefficients=c, steps=60, delta=1e-5)
  assert f"1000 examples in {b} random groups, expected batch 50 (q = {q:.6g}" in out
  assert f"at most {-(-60 // b)} per example" in out
  assert f"noise multiplier {sigma:.6g} per row of C G" in out
  rows = _rows(out)
  assert [r[1] for r in rows] == ["30", "60"]
  for r, steps in zip(rows, (30, 60)):
    want = accounting.epsilon(noise_multiplier=sigma / np.linalg.norm(c), sampling_rate=q,
                              steps=-(-steps // b), delta=1e-5)
    assert float(r[2]) == pytest.approx(want, rel=1e-3), r
  for args, message in ((["--bands", "21"], "at most 20"),
                        (["--federated", "--bands", "2"], "centralized runs only")):
    code, _, err = _main(capsys, "--examples", "1000", "--batch-size", "50", "--epochs", "1",
                         "--noise-multiplier", "1", "--mechanism", "amplified_mf", *args)
    assert code == 2 and message in err, err


def test_federated_budget_uses_the_federated_drivers_delta_and_units(capsys):
  """--federated: users and cohorts, and scripts/federated.py's default delta 1 / N^1.1 (what
  trustjax.federated.experiments.run_strategy sets when fl.dp.delta is 0)."""
  code, out, _ = _main(capsys, "--examples", "2000", "--batch-size", "200", "--epochs", "6",
                       "--noise-multiplier", "0.8", "--points", "1", "--federated")
  assert code == 0, out
  delta = 1.0 / 2000 ** 1.1
  assert "Poisson-sampled DP-FedAvg: 2000 users, expected cohort 200 (q = 0.1)" in out
  assert f"delta = {delta:g} (the federated driver's default: 1 / N^1.1" in out
  (row,) = _rows(out)
  assert float(row[2]) == pytest.approx(accounting.epsilon(
      noise_multiplier=0.8, sampling_rate=0.1, steps=60, delta=delta), rel=1e-3)
  code, out, _ = _main(capsys, "--examples", "2000", "--batch-size", "200", "--epochs", "6",
                       "--noise-multiplier", "3.73", "--points", "1", "--federated",
                       "--mechanism", "dp_mf", "--momentum", "0.9")
  assert code == 0 and "neighbours: one user's data replaced with a zero update" in out


@pytest.mark.parametrize("args,message", [
    (["--examples", "10", "--batch-size", "50", "--epochs", "1", "--noise-multiplier", "1"],
     "--batch-size=50 must be <= --examples=10"),
    (["--examples", "100", "--batch-size", "10", "--epochs", "1"], "exactly one of"),
    (["--examples", "100", "--batch-size", "10", "--epochs", "1", "--noise-multiplier", "1",
      "--delta", "2"], "delta must lie in (0, 1)"),
    (["--batch-size", "10"], "give --examples, --batch-size and --epochs"),
])
def test_bad_budget_input_is_named(capsys, args, message):
  code, _, err = _main(capsys, *args)
  assert code == 2 and message in err, err[-2000:]


def test_budgets_of_finished_runs_are_read_from_their_ledgers(tmp_path, capsys):
  """A training run (delta in its summary), a federated run with a DP strategy and a non-DP one
  (deltas per strategy), replayed at their own deltas and at one given on the command line."""
  dp = accounting.PrivacyLedger()
  dp.record(noise_multiplier=1.1, sampling_rate=0.02, steps=50, overflow_probability=1e-9)
  dp.record(noise_multiplier=0.8, sampling_rate=0.02, steps=10)
  checkpoint_with_ledger(tmp_path / "train_run" / "checkpoints", dp)
  (tmp_path / "train_run" / "summary.json").write_text(json.dumps({"delta": 1e-5}))
  fed = accounting.PrivacyLedger()
  fed.record(noise_multiplier=1.0, sampling_rate=0.1, steps=30)
  checkpoint_with_ledger(tmp_path / "fl_run" / "dp_fedavg" / "checkpoints", fed)
  checkpoint_with_ledger(tmp_path / "fl_run" / "fedavg" / "checkpoints", accounting.PrivacyLedger())
  (tmp_path / "fl_run" / "summary.json").write_text(json.dumps({"strategies": [
      {"strategy": "dp_fedavg", "delta": 1e-3}, {"strategy": "fedavg"}]}))
  ftrl = accounting.PrivacyLedger()
  ftrl.record_tree(noise_multiplier=3.0, steps_per_tree=27, steps=100)
  checkpoint_with_ledger(tmp_path / "ftrl_run" / "checkpoints", ftrl)
  (tmp_path / "ftrl_run" / "summary.json").write_text(json.dumps({"delta": 1e-5}))
  mf = accounting.PrivacyLedger()
  mf.record_mf(noise_multiplier=9.0, coefficients=bsr_coefficients(27), steps_per_epoch=27,
               steps=162)
  checkpoint_with_ledger(tmp_path / "mf_run" / "checkpoints", mf)
  (tmp_path / "mf_run" / "summary.json").write_text(json.dumps({"delta": 1e-5}))
  amf = accounting.PrivacyLedger()
  amf.record_amplified_mf(noise_multiplier=7.0, sampling_rate=0.15,
                          coefficients=bsr_coefficients(4, 0.9), steps=162)
  checkpoint_with_ledger(tmp_path / "amf_run" / "checkpoints", amf)
  (tmp_path / "amf_run" / "summary.json").write_text(json.dumps({"delta": 1e-5}))
  assert list(training.read_ledgers(str(tmp_path))) == [
      "amf_run", "fl_run/dp_fedavg", "fl_run/fedavg", "ftrl_run", "mf_run", "train_run"]

  proc = _script("--run", str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = {r[0]: r for r in _rows(proc.stdout)}
  assert set(rows) == {"amf_run", "fl_run/dp_fedavg", "ftrl_run", "mf_run", "train_run"}
  assert "No private steps recorded (not DP): fl_run/fedavg" in proc.stdout
  assert rows["ftrl_run"][3] == "none (DP-FTRL, 27 steps per tree)"
  assert rows["mf_run"][3] == "none (DP-MF, 27 bands, 27 steps per epoch)"
  assert rows["amf_run"][3] == "0.15 in each of 4 groups (amplified DP-MF)"
  for run, ledger, delta in (("train_run", dp, 1e-5), ("fl_run/dp_fedavg", fed, 1e-3),
                             ("ftrl_run", ftrl, 1e-5), ("mf_run", mf, 1e-5),
                             ("amf_run", amf, 1e-5)):
    r = rows[run]
    assert int(r[1]) == ledger.steps and float(r[4]) == delta
    assert float(r[5]) == pytest.approx(ledger.epsilon(delta), rel=1e-3)
    assert float(r[6]) == pytest.approx(ledger.epsilon(delta, "rdp"), rel=1e-3)
    assert float(r[7]) == pytest.approx(ledger.report(delta)["delta_total"], rel=1e-5)
  assert rows["train_run"][2] == "0.8, 1.1" and float(rows["train_run"][7]) > 1e-5

  code, out, _ = _main(capsys, "--run", str(tmp_path / "train_run"), "--delta", "1e-7")
  (r,) = _rows(out)
  assert code == 0 and r[0] == "." and float(r[5]) == pytest.approx(dp.epsilon(1e-7), rel=1e-3)
  assert re.search(r"epsilon \(PLD\)", out)

  code, _, err = _main(capsys, "--run", str(tmp_path / "fl_run" / "fedavg"))
  assert code == 2 and "recorded no private steps" in err
  code, _, err = _main(capsys, "--run", str(tmp_path / "nowhere"))
  assert code == 2 and "no run folder" in err


def test_canary_bounds_of_finished_and_planned_runs(tmp_path, capsys):
  """--canaries: per run and insertion count, the group epsilon and the exposure bounds of
  `experiments.canary_bounds` (itself tested against quadrature and linear programs); amplified
  MF runs get one copy only; before a run, the plan's."""
  from trustjax.experiments import canary_bounds  # pylint: disable=import-outside-toplevel
  dp = accounting.PrivacyLedger()
  dp.record(noise_multiplier=1.1, sampling_rate=0.02, steps=50, overflow_probability=1e-9)
  amf = accounting.PrivacyLedger()
  amf.record_amplified_mf(noise_multiplier=7.0, sampling_rate=0.15,
                          coefficients=bsr_coefficients(4, 0.9), steps=16)
  for name, ledger in (("sgd", dp), ("amf", amf)):
    checkpoint_with_ledger(tmp_path / name / "checkpoints", ledger)
    (tmp_path / name / "summary.json").write_text(json.dumps({"delta": 1e-5}))
  code, out, _ = _main(capsys, "--run", str(tmp_path), "--canaries", "2,1", "--references", "999")
  assert code == 0 and "Canaries among 999 other candidates (exposure at most 9.97 bits" in out
  rows = [[c.strip() for c in line.strip("|").split("|")]
          for line in out.split("Canaries among")[1].splitlines()
          if re.match(r"\| (sgd|amf) \| \d+ \|", line)]
  want = canary_bounds(dp, (1, 2), 1e-5, 999)
  assert [r[:2] for r in rows] == [["amf", "1"], ["amf", "2"], ["sgd", "1"], ["sgd", "2"]]
  for r in rows[2:]:
    k = f"x{r[1]}"
    assert float(r[2]) == pytest.approx(want["canary_group_epsilon"][k], rel=1e-3)
    assert float(r[3]) == pytest.approx(want["canary_exposure_bound"][k], abs=1e-3)
    assert float(r[4]) == pytest.approx(want["canary_rank_one_bound"][k], rel=5e-3)  # 3 digits
  assert rows[1][2] == "none (amplified MF: one copy only)"
  # Before a run: the plan's whole-run ledger (DP-MF here, built by the script from the printed
  # noise multiplier) gives the same bounds.
  code, out, _ = _main(capsys, "--examples", "1000", "--batch-size", "100", "--epochs", "2",
                       "--noise-multiplier", "3.0", "--mechanism", "dp_mf", "--bands", "4",
                       "--delta", "1e-5", "--canaries", "1,2", "--references", "999")
  plan = accounting.PrivacyLedger()
  plan.record_mf(noise_multiplier=3.0, coefficients=bsr_coefficients(4), steps_per_epoch=10,
                 steps=20)
  want = canary_bounds(plan, (1, 2), 1e-5, 999)
  rows = [[c.strip() for c in line.strip("|").split("|")]
          for line in out.split("Canaries among")[1].splitlines() if line.startswith("| this plan")]
  assert code == 0 and [r[1] for r in rows] == ["1", "2"]
  for r in rows:
    assert float(r[2]) == pytest.approx(want["canary_group_epsilon"][f"x{r[1]}"], rel=1e-3)
    assert float(r[3]) == pytest.approx(want["canary_exposure_bound"][f"x{r[1]}"], abs=1e-3)
  for args, message in [(("--canaries", "1,4"), "--canaries needs --references"),
                        (("--canaries", "0,4", "--references", "9"), "insertion counts >= 1")]:
    code, _, err = _main(capsys, "--run", str(tmp_path), *args)
    assert code == 2 and message in err
