"""The privacy budget of DP-SGD, DP-FTRL, DP-MF or amplified DP-MF before a run, or of finished
runs from their ledgers.

  python scripts/privacy_budget.py --examples 13084 --batch-size 256 --epochs 3 --noise-multiplier 1.1
  python scripts/privacy_budget.py --examples 13084 --batch-size 256 --epochs 3 --target-epsilon 8
  python scripts/privacy_budget.py --examples 13084 --batch-size 256 --epochs 3 --target-epsilon 8 --mechanism dp_ftrl
  python scripts/privacy_budget.py --examples 13784 --batch-size 512 --epochs 6 --target-epsilon 1 --mechanism dp_mf --momentum 0.9
  python scripts/privacy_budget.py --examples 13784 --batch-size 512 --epochs 6 --target-epsilon 1 --mechanism amplified_mf --momentum 0.9
  python scripts/privacy_budget.py --run results/dp_intents [--delta 1e-6]
  python scripts/privacy_budget.py --run results/dp_shakespeare_canaries --canaries 1,4,16 --references 9985
  python scripts/privacy_budget.py --examples 48783 --batch-size 512 --epochs 3 --target-epsilon 8 --delta 1e-5 --canaries 1,4 --references 9985

Before a run (`--examples`, `--batch-size`, `--epochs`, as `scripts/train.py` counts them: sampling
rate q = batch / examples, steps = round(epochs / q)): epsilon with the PLD and the RDP accountant
after `--points` evenly spaced fractions of the run, for a given noise multiplier or for the
smallest one that reaches `--target-epsilon` (calibrated as the training driver does), plus the
extra delta from truncating Poisson batches at the static batch size (the driver's default size
unless `--max-batch-size`). `--plot` draws epsilon against epochs. `--federated` plans user-level
DP as `scripts/federated.py` runs it (DP-FedAvg, or its DP-FTRL and DP-MF rounds): examples are
users, the batch is the clients per round, and the default delta is that driver's 1 / N^1.1.
`--mechanism dp_ftrl`: DP-FTRL as
the driver runs it (fixed batches, T = ceil(examples / batch) steps per epoch and tree, steps =
round(epochs * T), a partial epoch counted as a whole tree; no sampling, so no truncation term).
`--mechanism dp_mf`: DP-MF as the driver runs it (the data in one fixed order, k = ceil(examples /
batch) steps per epoch, `--bands` b (0: min(k, 64)), the banded square root of the workload of
SGD with `--momentum`; epsilon after t steps is that of the release's first t rows).
`--mechanism amplified_mf`: amplified DP-MF as the driver runs it (cyclic Poisson sampling over
`--bands` b random groups at q = b * batch / examples within a group, as many steps as DP-SGD;
`--bands 0` picks b as the driver does, for `--target-epsilon`; DP-SGD's epsilon at sigma / ||c||
over the steps one example can be in; centralized only).

After runs (`--run`, a run folder or a folder of runs): every ledger saved with a run's latest
checkpoint (DP-SGD runs, DP-FedAvg strategies), replayed at `--delta` (default: the delta in the
run's summary.json), so a budget can be read at another delta or with the other accountant
without rerunning anything.

`--canaries 1,4,16 --references R`, before a run or after: per run (or for the plan) and count
r, the epsilon of the group of r copies of one example (tight for DP-SGD's Poisson sampling,
Ganesh 2024; r times the sensitivity for DP-MF and DP-FTRL; none for amplified DP-MF) and what it
allows the exposure of a canary inserted r times to be among R other candidates
(`experiments.canary_bounds`).

The same functions as the drivers: `privacy.accounting` (dp_accounting underneath),
`privacy.sampling` and `training.read_ledgers`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from trustjax import reporting, training  # pylint: disable=g-import-not-at-top,wrong-import-position
from trustjax.attacks import canaries  # pylint: disable=wrong-import-position
from trustjax.experiments import canary_bounds, default_delta  # pylint: disable=wrong-import-position
from trustjax.privacy import accounting, sampling  # pylint: disable=wrong-import-position
from trustjax.privacy.dp_mf import (  # pylint: disable=wrong-import-position
    amplified_bands, bsr_coefficients, resolve_bands)


def _fmt(x: float) -> str:
  return "inf" if math.isinf(x) else f"{x:.4g}"


def before_a_run(args) -> str:
  n, b = args.examples, args.batch_size
  if n is None or b is None or args.epochs is None:
    raise ValueError("give --examples, --batch-size and --epochs (or --run)")
  if n < 1 or b < 1 or not args.epochs > 0:
    raise ValueError(f"--examples and --batch-size must be >= 1 and --epochs > 0, got "
                     f"examples={n}, batch_size={b}, epochs={args.epochs}")
  if b > n:
    raise ValueError(f"--batch-size={b} must be <= --examples={n}")
  if (args.noise_multiplier is None) == (args.target_epsilon is None):
    raise ValueError("give exactly one of --noise-multiplier and --target-epsilon")
  if args.points < 1:
    raise ValueError(f"--points must be >= 1, got {args.points}")
  if args.mechanism == "dp_ftrl":
    return _dp_ftrl_before_a_run(args)
  if args.mechanism == "dp_mf":
    return _dp_mf_before_a_run(args)
  if args.mechanism == "amplified_mf":
    return _amplified_mf_before_a_run(args)
  q = b / n
  steps = max(1, round(args.epochs / q))
  delta, delta_note = _delta(args, n)
  accounting.validate(sampling_rate=q)
  lines = [f"Poisson-sampled {'DP-FedAvg' if args.federated else 'DP-SGD'}: {n} "
           f"{_unit(args)}, expected {'cohort' if args.federated else 'batch'} {b} (q = {q:.6g}), "
           f"{args.epochs:g} epochs = {steps} steps, delta = {delta:g}{delta_note}"]
  sigma = _noise_multiplier(args, lines, lambda eps: accounting.calibrate_noise_multiplier(
      target_epsilon=eps, sampling_rate=q, steps=steps, delta=delta,
      accountant=args.accountant), "", f"{steps} steps")
  points = _points(steps, args.points)
  eps = {a: accounting.epsilon_curve(noise_multiplier=sigma, sampling_rate=q, steps=points,
                                     delta=delta, accountant=a) for a in accounting.ACCOUNTANTS}
  max_b = args.max_batch_size or sampling.default_max_batch_size(n, q, steps)
  ledger = accounting.PrivacyLedger()
  ledger.record(noise_multiplier=sigma, sampling_rate=q, steps=steps,
                overflow_probability=sampling.overflow_probability(n, q, max_b))
  lines.append(_truncation(args, ledger, max_b, delta, eps[args.accountant][-1]))
  return _with_table(args, lines, points, q, eps, f"sigma {sigma:.4g}, q {q:.4g}, delta {delta:g}",
                     ledger, delta)


def _truncation(args, ledger: accounting.PrivacyLedger, max_b: int, delta: float,
                final: float) -> str:
  """The line on the static batch size: its per-step overflow bound (in the ledger of the whole
  run) and the total delta at the final epsilon."""
  return (f"static batch size {max_b}" + ("" if args.max_batch_size else
                                          " (the driver's default on one device)")
          + f": overflow probability {ledger.entries[0].overflow_probability:.3g} per step, "
          f"so the total delta is {delta + ledger.truncation_delta(final):.6g} at the final "
          f"{args.accountant.upper()} epsilon")


def _unit(args) -> str:
  return "users" if args.federated else "examples"


def _zero_neighbour(args) -> str:
  """DP-FTRL's and DP-MF's neighbouring relation, in the planned run's units."""
  return ("one user's data replaced with a zero update" if args.federated else
          "one example replaced with a zero example")


def _delta(args, n: int) -> tuple[float, str]:
  """(--delta, or the driver's default for n examples or, with --federated, n users, checked; a
  note on which)."""
  if args.delta is not None:
    delta, note = args.delta, ""
  elif args.federated:  # scripts/federated.py's default
    delta, note = 1.0 / n ** 1.1, " (the federated driver's default: 1 / N^1.1 for N users)"
  else:
    delta, note = default_delta(n), (" (the training driver's default: the largest power of ten "
                                     "below 1/N)")
  accounting.validate(delta=delta)
  return delta, note


def _noise_multiplier(args, lines: list[str], calibrate, unit: str, horizon: str) -> float:
  """--noise-multiplier (checked), or `calibrate(--target-epsilon)`; says which in `lines`
  (`unit` after "noise multiplier <sigma>", `horizon`: what the calibration covers)."""
  sigma = args.noise_multiplier
  if sigma is None:
    sigma = calibrate(args.target_epsilon)
    lines.append(f"noise multiplier {sigma:.6g}{unit}: the smallest (to 0.1%) whose "
                 f"{args.accountant.upper()} epsilon is <= {args.target_epsilon:g} after "
                 f"{horizon}")
  else:
    accounting.validate(noise_multiplier=sigma)
    lines.append(f"noise multiplier {sigma:g}{unit}")
  return sigma


def _points(steps: int, count: int) -> list[int]:
  """`count` evenly spaced step counts ending at `steps`."""
  return sorted({max(1, round(steps * (i + 1) / count)) for i in range(count)})


def _with_table(args, lines: list[str], points, steps_to_epochs: float, eps: dict,
                title: str, ledger: accounting.PrivacyLedger, delta: float) -> str:
  """`lines`, then the table of epsilon (PLD, RDP) at each step count in `points`, the plot of it
  when `--plot` asks, and with `--canaries` what the whole run's `ledger` allows a canary."""
  rows = [[f"{t * steps_to_epochs:.4g}", t, _fmt(e_pld), _fmt(e_rdp)]
          for t, e_pld, e_rdp in zip(points, eps["pld"], eps["rdp"])]
  table = reporting.markdown_table(["epochs", "steps", "epsilon (PLD)", "epsilon (RDP)"], rows)
  if args.plot:
    _plot(points, steps_to_epochs, eps, args.plot, title)
    lines.append(f"plot: {args.plot}")
  return "\n".join(lines + ["", table]) + (
      _canary_table(args, [("this plan", ledger, delta)]) if args.canaries else "")


def _dp_ftrl_before_a_run(args) -> str:
  n, b = args.examples, args.batch_size
  spt = -(-n // b)
  steps = max(1, round(args.epochs * spt))
  trees = lambda t: -(-t // spt)
  delta, delta_note = _delta(args, n)
  lines = [f"DP-FTRL (tree aggregation, no sampling): {n} {_unit(args)}, batches of {b}, "
           f"{spt} steps per epoch and tree (depth {accounting.tree_depth(spt)}), "
           f"{args.epochs:g} epochs = {steps} steps in {trees(steps)} trees, delta = {delta:g}"
           f"{delta_note}; neighbours: " + _zero_neighbour(args)]
  sigma = _noise_multiplier(args, lines, lambda eps: accounting.calibrate_dp_ftrl_noise_multiplier(
      target_epsilon=eps, steps_per_tree=spt, trees=trees(steps), delta=delta,
      accountant=args.accountant), " per tree node", f"{trees(steps)} trees")
  points = _points(steps, args.points)
  eps = {a: [accounting.dp_ftrl_epsilon(noise_multiplier=sigma, steps_per_tree=spt,
                                        trees=trees(t), delta=delta, accountant=a)
             for t in points] for a in accounting.ACCOUNTANTS}
  ledger = accounting.PrivacyLedger()
  ledger.record_tree(noise_multiplier=sigma, steps_per_tree=spt, steps=steps)
  return _with_table(args, lines, points, 1.0 / spt, eps,
                     f"DP-FTRL, sigma {sigma:.4g}, T {spt}, delta {delta:g}", ledger, delta)


def _dp_mf_before_a_run(args) -> str:
  n, b = args.examples, args.batch_size
  k = -(-n // b)
  steps = max(1, round(args.epochs * k))
  coefficients = bsr_coefficients(resolve_bands(args.bands, k, "--bands"), args.momentum)
  delta, delta_note = _delta(args, n)
  sens = accounting.mf_sensitivity(coefficients, steps, k)
  lines = [f"DP-MF (banded square root, no sampling): {n} {_unit(args)} in one fixed order, "
           f"batches of {b}, {k} steps per epoch, {args.epochs:g} epochs = {steps} steps, "
           f"{len(coefficients)} bands, workload momentum {args.momentum:g}, sensitivity "
           f"{sens:.4g} clip norms over the run, delta = {delta:g}{delta_note}; neighbours: "
           + _zero_neighbour(args)]
  sigma = _noise_multiplier(args, lines, lambda eps: accounting.calibrate_mf_noise_multiplier(
      target_epsilon=eps, coefficients=coefficients, steps=steps, separation=k, delta=delta,
      accountant=args.accountant), " per row of C G", f"{steps} steps")
  points = _points(steps, args.points)
  eps = {a: [accounting.mf_epsilon(noise_multiplier=sigma, coefficients=coefficients, steps=t,
                                   separation=k, delta=delta, accountant=a) for t in points]
         for a in accounting.ACCOUNTANTS}
  ledger = accounting.PrivacyLedger()
  ledger.record_mf(noise_multiplier=sigma, coefficients=coefficients, steps_per_epoch=k,
                   steps=steps)
  return _with_table(args, lines, points, 1.0 / k, eps, f"DP-MF, sigma {sigma:.4g}, "
                     f"{len(coefficients)} bands, delta {delta:g}", ledger, delta)


def _amplified_mf_before_a_run(args) -> str:
  n, b = args.examples, args.batch_size
  if args.federated:
    raise ValueError("--mechanism amplified_mf plans centralized runs only: the federated "
                     "driver has no cyclic Poisson cohorts")
  steps = max(1, round(args.epochs * n / b))
  delta, delta_note = _delta(args, n)
  bands = amplified_bands(args.bands, batch_size=b, num_examples=n, steps=steps, delta=delta,
                          momentum=args.momentum, target_epsilon=args.target_epsilon,
                          name="--bands")
  q = bands * b / n
  coefficients = bsr_coefficients(bands, args.momentum)
  lines = [f"amplified DP-MF (banded square root, cyclic Poisson sampling): {n} examples in "
           f"{bands} random groups, expected batch {b} (q = {q:.6g} within a group), "
           f"{args.epochs:g} epochs = {steps} steps, at most {-(-steps // bands)} per example, "
           f"workload momentum {args.momentum:g}, column norm "
           f"{math.sqrt(float(coefficients @ coefficients)):.4g}, delta = {delta:g}{delta_note}"
           + ("; bands chosen for the least prefix-sum error" if args.bands == 0 else "")
           + "; neighbours: one example added or removed"]
  sigma = _noise_multiplier(
      args, lines, lambda eps: accounting.calibrate_amplified_mf_noise_multiplier(
          target_epsilon=eps, sampling_rate=q, coefficients=coefficients, steps=steps,
          delta=delta, accountant=args.accountant), " per row of C G", f"{steps} steps")
  points = _points(steps, args.points)
  eps = {a: [accounting.amplified_mf_epsilon(noise_multiplier=sigma, sampling_rate=q,
                                             coefficients=coefficients, steps=t, delta=delta,
                                             accountant=a) for t in points]
         for a in accounting.ACCOUNTANTS}
  max_b = args.max_batch_size or sampling.default_max_batch_size(n, q / bands, steps)
  ledger = accounting.PrivacyLedger()
  ledger.record_amplified_mf(noise_multiplier=sigma, sampling_rate=q, coefficients=coefficients,
                             steps=steps, overflow_probability=sampling.overflow_probability(
                                 n, q / bands, max_b))
  lines.append(_truncation(args, ledger, max_b, delta, eps[args.accountant][-1]))
  return _with_table(args, lines, points, b / n, eps,
                     f"amplified DP-MF, sigma {sigma:.4g}, {bands} bands, delta {delta:g}",
                     ledger, delta)


def _plot(points, q, eps, path, title):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(5, 3.6))
  for name, values in eps.items():
    ax.plot([t * q for t in points], values, marker="o", label=name.upper())
  ax.set_xlabel("epochs")
  ax.set_ylabel("epsilon")
  ax.set_title(title, fontsize=9)
  ax.legend()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  reporting.save_figure(fig, path)


def _summary_deltas(run_dir: str) -> dict[str, float]:
  """{run path relative to run_dir: delta} from the summaries the drivers write (train: the run's
  "delta"; federated: each strategy's "delta")."""
  out = {}
  for root, _, files in os.walk(run_dir):
    if "summary.json" not in files:
      continue
    with open(os.path.join(root, "summary.json"), encoding="utf-8") as f:
      summary = json.load(f)
    rel = os.path.relpath(root, run_dir)
    if isinstance(summary.get("delta"), (int, float)):
      out[rel] = float(summary["delta"])
    for s in summary.get("strategies", []) if isinstance(summary.get("strategies"), list) else []:
      if isinstance(s, dict) and isinstance(s.get("delta"), (int, float)) and "strategy" in s:
        out[os.path.normpath(os.path.join(rel, s["strategy"]))] = float(s["delta"])
  return out


def after_runs(args) -> str:
  ledgers = training.read_ledgers(args.run)
  if not ledgers:
    raise ValueError(f"no checkpoint with a privacy ledger under {args.run!r}")
  deltas = _summary_deltas(args.run)
  rows, skipped, replayed = [], [], []
  for run, ledger in ledgers.items():
    if not ledger.entries:
      skipped.append(run)
      continue
    delta = args.delta if args.delta is not None else deltas.get(run)
    if delta is None:
      raise ValueError(f"no delta for {run!r} in a summary.json under {args.run!r}: pass --delta")
    rep = {a: ledger.report(delta, a) for a in accounting.ACCOUNTANTS}
    sigmas = sorted({e.noise_multiplier for e in ledger.entries})
    rates = {"dp_sgd": lambda: ", ".join(f"{x:.4g}" for x in sorted({e.sampling_rate
                                                                    for e in ledger.entries})),
             "dp_ftrl": lambda: "none (DP-FTRL, " + ", ".join(
                 f"{t} steps per tree" for t in sorted({e.steps_per_tree
                                                        for e in ledger.entries})) + ")",
             "dp_mf": lambda: f"none (DP-MF, {len(ledger.entries[0].coefficients)} bands, "
                              f"{ledger.entries[0].steps_per_epoch} steps per epoch)",
             "amplified_mf": lambda: ", ".join(f"{x:.4g}" for x in sorted(
                 {e.sampling_rate for e in ledger.entries})) + " in each of "
                 f"{len(ledger.entries[0].coefficients)} groups (amplified DP-MF)",
             }[ledger.kind]()
    replayed.append((run, ledger, delta))
    rows.append([run, ledger.steps, ", ".join(f"{x:.4g}" for x in sigmas), rates, f"{delta:g}",
                 _fmt(rep["pld"]["epsilon"]), _fmt(rep["rdp"]["epsilon"]),
                 f"{rep[args.accountant]['delta_total']:.6g}"])
  if not rows:
    raise ValueError(f"the runs under {args.run!r} recorded no private steps: "
                     f"{', '.join(skipped)}")
  note = (f"\n\nNo private steps recorded (not DP): {', '.join(skipped)}" if skipped else "")
  return reporting.markdown_table(
      ["run", "steps", "noise multiplier", "sampling rate", "delta", "epsilon (PLD)",
       "epsilon (RDP)", f"total delta ({args.accountant.upper()}, with truncation)"],
      rows) + note + (_canary_table(args, replayed) if args.canaries else "")


def _canary_table(args, runs: list) -> str:
  """What each run's guarantee allows a canary inserted r times (`experiments.canary_bounds`):
  the group's epsilon and the bounds on its exposure among --references other candidates."""
  try:
    counts = sorted({int(x) for x in args.canaries.split(",")})
  except ValueError:
    counts = []
  if not counts or counts[0] < 1:
    raise ValueError(f"--canaries must list insertion counts >= 1, got {args.canaries!r}")
  refs = args.references
  if refs is None or refs < 1:
    raise ValueError("--canaries needs --references, the candidates other than the secret "
                     "(10**digits minus the canaries inserted), >= 1")
  rows = []
  for run, ledger, delta in runs:
    b = canary_bounds(ledger, counts, delta, refs)
    for r in counts:
      k = f"x{r}"
      rows.append([run, r] + ([_fmt(b["canary_group_epsilon"][k]),
                               f"{b['canary_exposure_bound'][k]:.3f}",
                               f"{b['canary_rank_one_bound'][k]:.3g}"]
                              if k in b["canary_group_epsilon"] else
                              ["none (amplified MF: one copy only)", "-", "-"]))
  return (f"\n\nCanaries among {refs} other candidates (exposure at most "
          f"{math.log2(refs + 1):.2f} bits, {canaries.chance_exposure(refs + 1):.2f} on average "
          "by chance): what each guarantee allows a canary "
          "inserted r times (group epsilon at the run's delta; bounds with the truncation term)"
          "\n\n" + reporting.markdown_table(
              ["run", "copies", "group epsilon (PLD)", "bound on the mean exposure (bits)",
               "bound on P(rank 1)"], rows))


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--examples", type=int, help="training examples N")
  ap.add_argument("--batch-size", type=int, help="expected batch size (q = batch / N)")
  ap.add_argument("--epochs", type=float, help="epochs (steps = round(epochs / q))")
  ap.add_argument("--mechanism", choices=("dp_sgd", "dp_ftrl", "dp_mf", "amplified_mf"),
                  default="dp_sgd",
                  help="dp_sgd: Poisson sampling at q; dp_ftrl: tree aggregation, a tree per "
                       "epoch; dp_mf: banded square root matrix factorization; amplified_mf: "
                       "the same on cyclic Poisson samples of --bands groups")
  ap.add_argument("--bands", type=int, default=0,
                  help="dp_mf: bands of C (0: min(steps per epoch, 64), as the driver); "
                       "amplified_mf: bands and groups (0: the driver's choice for the epsilon)")
  ap.add_argument("--momentum", type=float, default=0.0,
                  help="dp_mf, amplified_mf: the workload's momentum (the SGD optimizer's; 0 "
                       "for Adam)")
  ap.add_argument("--noise-multiplier", type=float)
  ap.add_argument("--target-epsilon", type=float)
  ap.add_argument("--delta", type=float, help="default: the driver's delta for N, or a run's own")
  ap.add_argument("--federated", action="store_true",
                  help="user-level DP as scripts/federated.py runs it: --examples counts users "
                       "(clients), --batch-size the clients per round, an epoch a pass over the "
                       "users; the default delta is that driver's, 1 / N^1.1")
  ap.add_argument("--accountant", choices=accounting.ACCOUNTANTS, default="pld",
                  help="the one that calibrates and sets the total delta (both are shown)")
  ap.add_argument("--max-batch-size", type=int, default=0,
                  help="static batch size (0: the driver's default)")
  ap.add_argument("--points", type=int, default=5, help="rows: fractions of the run")
  ap.add_argument("--plot", help="write epsilon against epochs to this PNG")
  ap.add_argument("--run", help="a run folder (or a folder of runs) to read ledgers from")
  ap.add_argument("--canaries",
                  help="insertion counts, e.g. 1,4,16, to bound the exposure of a canary "
                       "inserted that many times by the guarantee (planned, or a --run's) for "
                       "the group of its copies (needs --references)")
  ap.add_argument("--references", type=int,
                  help="with --canaries: the candidates other than the secret")
  args = ap.parse_args(argv)
  try:
    print(after_runs(args) if args.run else before_a_run(args))
  except ValueError as e:
    ap.error(str(e))


if __name__ == "__main__":
  main()
