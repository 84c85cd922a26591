"""Accuracy per class across training runs: who pays for differential privacy.

  python scripts/class_tables.py results/snips_nondp_minority results/snips_dp_eps8_minority \
      results/snips_dp_eps1_minority

Reads the summary.json of each run folder that `scripts/train.py` wrote for a classifier (the
runs must share their classes; a language model's run is refused by name). Prints two tables
with one row per class: (1) its training examples in each run and its held-out accuracy in each
run, with the change from the first run in brackets; (2) the median per-example gradient norm at
the end of each run and, for DP runs, the share of the class's examples above the clip norm
(runs trained with `--config.train.class_grad_norms=True`; "-" otherwise). The last row of (1)
is the accuracy averaged over classes. `--plot PATH` also draws each class's accuracy as grouped
bars, one colour per run. Bagdasaryan, Poursaeed and Shmatikov (NeurIPS 2019)
found DP-SGD's loss of accuracy largest on under-represented classes, whose gradients are
larger and so clipped more.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from trustjax import reporting  # pylint: disable=g-import-not-at-top,wrong-import-position


def _label(s: dict) -> str:
  return f"epsilon {s['epsilon']:.2g}" if s.get("epsilon") is not None else "no DP"


def _summaries(runs: list[str]) -> tuple[list[dict], list[str], set[str], list[str]]:
  """The runs' summaries (each must hold per-class results for the first run's classes), those
  classes, the downsampled ones in any run, and a column heading per run."""
  summaries = [reporting.read_summary(run, "eval_class_accuracy",
                                      "per-class accuracy (a classifier's run)") for run in runs]
  classes = summaries[0]["class_names"]
  for run, s in zip(runs, summaries):
    if s["class_names"] != classes:
      raise ValueError(f"{run!r} has classes {s['class_names']}, the first run {classes}")
  minority = set().union(*(s.get("minority_classes", ()) for s in summaries))
  heads = [f"{os.path.basename(os.path.normpath(r))} ({_label(s)})"
           for r, s in zip(runs, summaries)]
  return summaries, classes, minority, heads


def tables(runs: list[str]) -> str:
  summaries, classes, minority, heads = _summaries(runs)
  first = summaries[0]["eval_class_accuracy"]

  def cell(s, c):
    acc = s["eval_class_accuracy"].get(c)
    if acc is None:
      return "-"
    return f"{acc:.3f}" + (f" ({acc - first[c]:+.3f})" if s is not summaries[0] and c in first
                           else "")

  rows = [[c + (" (downsampled)" if c in minority else ""),
           " / ".join(str(s["train_class_examples"][c]) for s in summaries)]
          + [cell(s, c) for s in summaries] for c in classes]
  means = [float(np.mean(list(s["eval_class_accuracy"].values()))) for s in summaries]
  rows.append(["mean over classes", ""] + [
      f"{m:.3f}" + (f" ({m - means[0]:+.3f})" if i else "") for i, m in enumerate(means)])
  out = [reporting.markdown_table(["class", "train examples"] + heads, rows)]
  if any("train_class_grad_norm" in s for s in summaries):
    def norm(s, c):
      n, clipped = s.get("train_class_grad_norm", {}), s.get("train_class_clipped", {})
      if c not in n:
        return "-"
      return f"{n[c]:.3g}" + (f" ({clipped[c]:.0%} clipped)" if c in clipped else "")
    out += ["", "Median per-example gradient norm at the end of training:", "",
            reporting.markdown_table(["class"] + heads, [
                [c + (" (downsampled)" if c in minority else "")] + [norm(s, c) for s in summaries]
                for c in classes])]
  return "\n".join(out)


def plot(runs: list[str], path: str) -> None:
  """Grouped bars: each class's held-out accuracy, one colour per run (downsampled classes
  starred)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  summaries, classes, minority, heads = _summaries(runs)
  width = 0.8 / len(runs)
  fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(classes) + 1), 4.2 + 0.15 * len(runs)))
  for i, (head, s) in enumerate(zip(heads, summaries)):
    ax.bar(np.arange(len(classes)) + (i - (len(runs) - 1) / 2) * width,
           [s["eval_class_accuracy"].get(c, np.nan) for c in classes], width, label=head)
  ax.set_xticks(range(len(classes)), [c + ("*" if c in minority else "") for c in classes],
                rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("held-out accuracy")
  ax.set_ylim(0, 1.05)
  ax.set_title("accuracy per class" + (" (* downsampled)" if minority else ""))
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2)
  reporting.save_figure(fig, path)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("runs", nargs="+", help="run folders written by scripts/train.py")
  ap.add_argument("--plot", default="", help="also write a bar chart of accuracy per class here")
  args = ap.parse_args()
  print(tables(args.runs))
  if args.plot:
    plot(args.runs, args.plot)


if __name__ == "__main__":
  main()
