"""Prints the README's federated result tables from finished run folders.

  python scripts/fl_tables.py [--results results]

Reads results/fl_snips_<partition>[_seed<s>]/summary.json (mean and sample std over the seeds
found), results/fl_selection_*/summary.json, results/fl_robust_*/summary.json,
results/fl_backdoor_*/summary.json and results/fl_fair/summary.json.
"""

import argparse
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from trustjax import reporting  # pylint: disable=g-import-not-at-top,wrong-import-position
from trustjax.federated.algorithms import AGGREGATORS  # pylint: disable=wrong-import-position

PARTITIONS = (("iid", "iid"), ("10", "Dir alpha=10"), ("1", "Dir alpha=1"), ("0.1", "Dir alpha=0.1"))
STRATEGIES = ("fedavg", "fedprox", "fedadam", "scaffold", "centralized")
ROBUST_RULES = tuple(a for a in AGGREGATORS if a not in ("norm_bound", "rlr"))  # fl_robust's
BACKDOOR = ("no_attack", "mean", "norm_bound", "weak_dp", "rlr", "rlr_bound", "median",
            "trimmed_mean", "multi_krum")


def _load(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def snips_table(root):
  rows = []
  for part, label in PARTITIONS:
    runs = sorted(glob.glob(os.path.join(root, f"fl_snips_{part}")) +
                  glob.glob(os.path.join(root, f"fl_snips_{part}_seed*")))
    runs = [r for r in runs if os.path.exists(os.path.join(r, "summary.json"))]
    if not runs:
      continue
    acc = {s: [] for s in STRATEGIES}
    for r in runs:
      for st in _load(os.path.join(r, "summary.json"))["strategies"]:
        acc[st["strategy"]].append(100 * st["final_eval_accuracy"])
    cell = lambda v: (f"{np.mean(v):.1f} ± {np.std(v, ddof=1):.1f}" if len(v) > 1 else
                      f"{v[0]:.1f}" if v else "-")
    rows.append([label, len(runs)] + [cell(acc[s]) for s in STRATEGIES])
  return reporting.markdown_table(["partition", "seeds"] + list(STRATEGIES), rows)


def selection_table(root):
  rows = []
  for name, label in (("shakespeare", "Shakespeare roles"), ("nlu", "NLU corpus by device")):
    for setting in ("", "_continual"):
      path = os.path.join(root, f"fl_selection_{name}{setting}", "summary.json")
      if not os.path.exists(path):
        continue
      by = {s["strategy"]: s for s in _load(path)["strategies"]}
      for strategy in ("uniform", "by_activity"):
        s = by[strategy]
        if setting:
          per = ", ".join(f"{100 * a:.1f}" for a in s["continual_next_period_accuracy"])
          rows.append([label, "continual", strategy, f"{100 * s['continual_mean_accuracy']:.1f}",
                       per])
        else:
          recs = [json.loads(l) for l in open(os.path.join(
              root, f"fl_selection_{name}", strategy, "metrics.jsonl"), encoding="utf-8")]
          evals = [(r["round"], r["eval_accuracy"]) for r in recs if "eval_accuracy" in r]
          final = s["final_eval_accuracy"]
          reach = next(r for r, a in evals if a >= 0.95 * final)
          extra = f"95% of final accuracy at round {reach}"
          if "federated_eval_client_accuracy_p10" in s:
            extra += (f"; per-role accuracy p10 "
                      f"{100 * s['federated_eval_client_accuracy_p10']:.1f}")
          rows.append([label, "static", strategy, f"{100 * final:.1f}", extra])
  return reporting.markdown_table(
      ["data", "setting", "selection", "accuracy %", "next-period accuracies % / notes"], rows)


def _studies(root, prefix):
  """(run folder, summary, {strategy: its summary}) of every finished run folder named prefix*
  (smoke runs, *_runlocal, left out)."""
  for path in glob.glob(os.path.join(root, f"{prefix}*", "summary.json")):
    if not path.split(os.sep)[-2].endswith("_runlocal"):
      summary = _load(path)
      yield os.path.dirname(path), summary, {s["strategy"]: s for s in summary["strategies"]}


def robust_table(root):
  """Final accuracy % / eval loss per aggregator, one row per malicious fraction and attack."""
  rows = []
  for _, summary, by in _studies(root, "fl_robust_"):
    first = next(iter(by.values()))
    bad = first.get("byzantine_clients", 0)
    attack = first.get("byzantine_attack", "-") if bad else "-"

    def cell(a):
      if a not in by:
        return "-"
      loss = by[a]["final_eval_loss"]
      return (f"{100 * by[a]['final_eval_accuracy']:.1f} / "
              + (f"{loss:.2f}" if np.isfinite(loss) else "diverged"))

    rows.append(((attack, bad), [f"{bad} of {summary['num_clients']}", attack,
                                 int(first.get("byzantine_updates_aggregated", 0))] +
                 [cell(a) for a in ROBUST_RULES]))
  return reporting.markdown_table(["malicious clients", "attack", "malicious updates taken in"] +
                                  [f"{a}: acc. % / loss" for a in ROBUST_RULES],
                                  [r for _, r in sorted(rows, key=lambda x: x[0])])


def backdoor_table(root):
  """Clean accuracy % / backdoor accuracy % per defence, one row per malicious fraction and
  boost (configs/fl_backdoor.py); weak_dp's epsilon in its own column."""
  rows = []
  for run, summary, by in _studies(root, "fl_backdoor_"):
    first = by["mean"]
    cell = lambda a: (f"{100 * by[a]['final_eval_accuracy']:.1f} / "
                      f"{100 * by[a]['final_backdoor_accuracy']:.1f}" if a in by else "-")
    eps = f"{by['weak_dp']['epsilon']:.0f}" if "weak_dp" in by else "-"
    data = _load(os.path.join(run, "config.json"))["data"]
    partition = (f"Dir alpha={data['alpha']:g}" if data["partition"] == "dirichlet_label" else
                 data["partition"])
    rows.append(((partition != "iid", first["byzantine_clients"], first["byzantine_attack"]),
                 [partition, f"{first['byzantine_clients']} of {summary['num_clients']}",
                  first["byzantine_attack"], int(first["byzantine_updates_aggregated"])] +
                 [cell(a) for a in BACKDOOR] + [eps]))
  return reporting.markdown_table(
      ["partition", "malicious clients", "attack", "malicious updates taken in (mean)"] +
      [f"{a}: clean % / backdoor %" for a in BACKDOOR] + ["weak_dp epsilon"],
      [r for _, r in sorted(rows, key=lambda x: x[0])])


def fair_table(root):
  """Per strategy: pooled accuracy and the per-role accuracies' mean, 10th percentile and sd."""
  path = os.path.join(root, "fl_fair", "summary.json")
  if not os.path.exists(path):
    return ""
  rows = []
  for s in _load(path)["strategies"]:
    rows.append([s["strategy"], s["algorithm"] + (f" (q={s['q']:g})" if "q" in s else ""),
                 s["selection"], f"{100 * s['final_eval_accuracy']:.1f}"] +
                [f"{100 * s[f'federated_eval_client_accuracy_{k}']:.1f}"
                 for k in ("mean", "p10", "sd")])
  return reporting.markdown_table(["strategy", "algorithm", "selection", "accuracy %",
                                   "per-role mean %",
                                   "per-role 10th percentile %", "per-role sd %"], rows)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--results", default="results")
  args = ap.parse_args()
  print(snips_table(args.results))
  print()
  print(selection_table(args.results))
  print()
  print(robust_table(args.results))
  print()
  print(backdoor_table(args.results))
  print()
  print(fair_table(args.results))


if __name__ == "__main__":
  main()
