"""Backdoor poisoning across training runs, beside what each run's guarantee allows.

  python scripts/poison_tables.py results/snips_nondp_poison results/snips_dp_eps8_poison \
      results/snips_dp_eps1_poison

Reads the summary.json of each run folder that `scripts/train.py` wrote with `poison.triggers`
(runs without are refused by name). Prints one row per run and poisoned count: the run's epsilon
(none without DP), the trigger word, its backdoor accuracy, and for DP runs with a control
trigger the group epsilon of the poisoned examples and the bound on the backdoor accuracy's
mean at the control's rate (`experiments.poison_bounds`).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from trustjax import reporting  # pylint: disable=g-import-not-at-top,wrong-import-position


def table(runs: list[str]) -> str:
  rows = []
  for run in runs:
    s = reporting.read_summary(run, "poison_backdoor_accuracy",
                               "poisoned triggers (train with --config.poison.triggers)")
    eps = f"{s['epsilon']:.3g}" if s.get("epsilon") is not None else "no DP"
    control = s.get("poison_control_accuracy")
    bound = s.get("poison_backdoor_bound", {})
    for word, k in sorted(s["poison_counts"].items(), key=lambda kv: kv[1]):
      key = f"x{k}"
      rows.append([os.path.basename(os.path.normpath(run)), eps,
                   f"{s['eval_accuracy']:.3f}", f"{k}" + (" (control)" if k == 0 else ""),
                   word, f"{100 * s['poison_backdoor_accuracy'][word]:.1f}",
                   f"{s['poison_group_epsilon'][key]:.3g}" if key in bound else "-",
                   f"{100 * bound[key]:.1f}" if key in bound else "-"])
    if control is None:
      print(f"{run}: no control trigger (count 0), so no bounds", file=sys.stderr)
  return reporting.markdown_table(
      ["run", "epsilon", "clean accuracy", "poisoned examples", "trigger",
       "backdoor accuracy %", "group epsilon", "bound on its mean %"], rows)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("runs", nargs="+", help="run folders written by scripts/train.py")
  print(table(ap.parse_args().runs))


if __name__ == "__main__":
  main()
