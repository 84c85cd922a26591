"""Canary exposure across training runs, beside what each run's guarantee allows.

  python scripts/canary_tables.py results/nondp_shakespeare_canaries results/dp_shakespeare_canaries_eps1 \
      results/dp_shakespeare_canaries_eps3 results/dp_shakespeare_canaries --plot exposure_vs_epsilon.png

Reads the summary.json of each run folder that `scripts/train.py` wrote with `canaries.num` > 0
(runs without canaries are refused by name). Prints one row per run and insertion count: the
run's epsilon (none without DP), the measured mean exposure (lowest-highest over the secrets),
how many secrets ranked first (rank form only: the model's most likely completion among every
candidate), how many a beam search found (runs with `canaries.beam`), and for DP runs the group
epsilon of the copies and the bounds on the mean exposure and on the chance of ranking first
(`experiments.canary_bounds`; for runs whose summary predates them, computed from the ledger
saved with the run's checkpoint). `--plot` draws the mean exposure and its bound against
epsilon, one colour per insertion count, runs without DP at the right edge.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from trustjax import reporting, training  # pylint: disable=g-import-not-at-top,wrong-import-position
from trustjax.experiments import canary_bounds, canary_counts  # pylint: disable=wrong-import-position


def load(run: str) -> dict:
  summary = reporting.read_summary(run, "canary_exposure",
                                   "canaries (train with --config.canaries.num=k)")
  if summary.get("epsilon") is not None and "canary_exposure_bound" not in summary:
    # a DP run from before the summaries held the bounds: from the ledger of its checkpoint
    ledger = training.read_ledgers(run).get(".")
    if ledger is not None and ledger.entries:
      references = round(2 ** summary["canary_exposure_max"]) - 1
      repeats = [int(k[1:]) for k in canary_counts(summary["canary_exposure"])]
      summary.update(canary_bounds(ledger, repeats, summary["delta"], references))
  return summary


def table(runs: dict[str, dict]) -> str:
  rows = []
  for name, s in runs.items():
    rank_form = s.get("canary_exposure_method", "rank") == "rank"
    for k in canary_counts(s["canary_exposure"]):
      each = s["canary_exposures"][k]
      first = (sum(e >= s["canary_exposure_max"] - 1e-9 for e in each) if rank_form else None)
      dp = k in s.get("canary_exposure_bound", {})
      beam = s.get("canary_beam_positions", {}).get(k)
      rows.append([
          name, "-" if s.get("epsilon") is None else f"{s['epsilon']:.3g}", k[1:],
          f"{s['canary_exposure'][k]:.2f} ({min(each):.1f}-{max(each):.1f})",
          "-" if first is None else f"{first} of {len(each)}",
          "-" if beam is None else f"{sum(p > 0 for p in beam)} of {len(beam)}",
          f"{s['canary_group_epsilon'][k]:.4g}" if dp else "-",
          f"{s['canary_exposure_bound'][k]:.2f}" if dp else "-",
          f"{s['canary_rank_one_bound'][k]:.3g}" if dp else "-"])
  first = next(iter(runs.values()))
  return (f"Exposure at most {first['canary_exposure_max']:.2f} bits, "
          f"{first['canary_exposure_chance']:.2f} on average by chance (the first run's secret "
          "space)\n\n" + reporting.markdown_table(
              ["run", "epsilon", "copies", "mean exposure (bits)", "ranked first",
               "found by beam search", "group epsilon", "bound on the mean",
               "bound on P(rank 1)"], rows))


def plot(runs: dict[str, dict], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  eps = [s.get("epsilon") for s in runs.values()]
  finite = [e for e in eps if e is not None]
  right = 2.0 * max(finite) if finite else 1.0  # where runs without DP are drawn
  x = [right if e is None else e for e in eps]
  keys = canary_counts({k for s in runs.values() for k in s["canary_exposure"]})
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for i, k in enumerate(keys):
    colour = f"C{i}"
    pts = sorted((xi, s["canary_exposure"][k]) for xi, s in zip(x, runs.values())
                 if k in s["canary_exposure"])
    ax.plot(*zip(*pts), "o-", color=colour, label=f"{k[1:]}x measured")
    bound = sorted((xi, s["canary_exposure_bound"][k]) for xi, s in zip(x, runs.values())
                   if k in s.get("canary_exposure_bound", {}))
    if bound:
      ax.plot(*zip(*bound), "v--", color=colour, alpha=0.7, label=f"{k[1:]}x bound")
  first = next(iter(runs.values()))
  ax.axhline(first["canary_exposure_chance"], color="gray", ls=":", label="chance")
  ax.axhline(first["canary_exposure_max"], color="black", ls="--", lw=0.8, label="maximum")
  ax.set_xscale("log")
  ticks = sorted(set(finite))
  ax.set_xticks(ticks + ([right] if None in eps else []),
                [f"{e:.3g}" for e in ticks] + (["no DP"] if None in eps else []))
  ax.minorticks_off()
  ax.set_xlabel("epsilon")
  ax.set_ylabel("mean exposure (bits)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  reporting.save_figure(fig, path)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("runs", nargs="+", help="run folders written by scripts/train.py")
  ap.add_argument("--plot", help="write mean exposure and its bound against epsilon to this PNG")
  args = ap.parse_args(argv)
  try:
    runs = {os.path.basename(os.path.normpath(r)): load(r) for r in args.runs}
    spaces = {round(s["canary_exposure_max"], 6) for s in runs.values()}
    if len(spaces) > 1:
      raise ValueError("the runs rank their secrets among different candidate sets (maxima "
                       f"{sorted(spaces)} bits); compare runs of one secret space")
    print(table(runs))
    if args.plot:
      plot(runs, args.plot)
      print(f"\nplot: {args.plot}")
  except ValueError as e:
    ap.error(str(e))


if __name__ == "__main__":
  main()
