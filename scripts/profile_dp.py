"""Where the DP step's time goes, against the non-DP step: an XLA profile of each, op by op.

  python scripts/profile_dp.py --case encoder [--methods bookkeeping,ghost] [--calls 5]
      [--out results/profile_dp] [--top 15] [--benchmarks]

Profiles trustjax's non-DP training step and its DP-SGD step with each clipped-sum method on one of
`scripts/benchmark_dp.py`'s models (same batch, Adam, noise multiplier 1), `--calls` calls each
under `jax.profiler.trace`, and attributes every XLA op to a part of the step (forward, backward,
per-example norms, clipped sum, noise, optimizer; from the named scopes the DP code sets, see
`trustjax.profiling`), a kind (matmul, elementwise, ...) and a layer. The wall times are medians of
one call of each step per round (interleaved, like benchmark_dp.py), before any tracing.

Writes a run folder (`--out`/<case>-<time>): report.md (tables by part and by kind, and the layers
where the DP step spends the most beyond the non-DP step), ops.csv (every op of every step),
traces/<step>.trace.json.gz (Perfetto traces: open them in ui.perfetto.dev) and plots/parts.png.
With `--benchmarks`, the tables also go into BENCHMARKS.md between markers.

The op times are XLA's own per-op spans. On a CPU, XLA runs independent ops at the same time on
different cores, so their sum can exceed the wall time; the tables give both.
"""

import argparse
import collections
import csv
import dataclasses
import datetime
import os
import platform
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # pylint: disable=g-import-not-at-top

from benchmark_dp import CASES, setup  # scripts/ is on sys.path when this script runs
from trustjax import profiling, reporting, training

METHODS = ("vmap", "ghost", "bookkeeping")


def steps_for(case: str, methods):
  """(title, {label: compiled step}, state, batch) for a benchmark_dp case."""
  title, loss_fn, _, batch, opt, state, dp = setup(case)
  configs = {"non-DP": None}
  configs.update({m: dataclasses.replace(dp, method=m) for m in methods})
  compiled = {label: training.make_train_step(loss_fn, opt, cfg, donate=False)
              .lower(state, batch).compile() for label, cfg in configs.items()}
  return title, compiled, state, batch


def layer_excess(profiles, base: str, top: int, depth: int = 2):
  """Rows (layer, part, base ms, DP ms per method...) of the (layer, part) groups of the DP steps'
  DP parts, largest first: where each method's extra work goes, layer by layer."""
  dp_parts = set(profiling.PARTS) - {"forward", "backward", "optimizer", "other"}
  totals = {n: collections.Counter() for n in profiles}
  for n, p in profiles.items():
    for o in p.ops:
      if o.part in dp_parts:
        totals[n][("/".join(o.layer.split("/")[:depth]) or "(none)", o.part)] += o.us / 1e3
  keys = collections.Counter()
  for n in profiles:
    if n != base:
      for k, v in totals[n].items():
        keys[k] = max(keys[k], v)
  return [[layer, part] + [totals[n].get((layer, part), 0.0) for n in profiles if n != base]
          for (layer, part), _ in keys.most_common(top)]


def plot_parts(profiles, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  names = list(profiles)
  fig, ax = plt.subplots(figsize=(8.5, 1.2 + 0.6 * len(names)))
  left = [0.0] * len(names)
  cmap = plt.get_cmap("tab10")
  for i, part in enumerate(profiling.PARTS):
    widths = [profiles[n].by("part").get(part, 0.0) for n in names]
    if not any(widths):
      continue
    ax.barh(names, widths, left=left, color=cmap(i % 10), label=part)
    left = [l + w for l, w in zip(left, widths)]
  ax.scatter([profiles[n].wall_ms for n in names], names, marker="|", s=300, color="black",
             label="wall time", zorder=3)
  ax.set_xlabel("ms per step (sum of XLA op times)")
  ax.invert_yaxis()
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  reporting.save_figure(fig, path)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--case", default="encoder", help=f"one of {list(CASES)}")
  ap.add_argument("--methods", default="bookkeeping,ghost", help=f"comma list of {METHODS}")
  ap.add_argument("--calls", type=int, default=5, help="traced calls per step (and timed calls)")
  ap.add_argument("--out", default="results/profile_dp")
  ap.add_argument("--top", type=int, default=12, help="rows of the per-layer table")
  ap.add_argument("--benchmarks", action="store_true",
                  help="also write the tables into BENCHMARKS.md")
  args = ap.parse_args()
  if args.case not in CASES:
    ap.error(f"unknown --case {args.case!r}; choose from {list(CASES)}")
  methods = [m for m in args.methods.split(",") if m]
  bad = sorted(set(methods) - set(METHODS))
  if bad or not methods:
    ap.error(f"--methods must name some of {list(METHODS)}, got {args.methods!r}")
  if args.calls < 1:
    ap.error(f"--calls must be >= 1, got {args.calls}")

  title, compiled, state, batch = steps_for(args.case, methods)
  wall = training.time_interleaved({k: (lambda c=c: c(state, batch)) for k, c in compiled.items()},
                                   repeats=max(args.calls, 5))
  run = os.path.join(args.out, f"{args.case}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
  os.makedirs(os.path.join(run, "plots"), exist_ok=True)
  profiles = {}
  for label, c in compiled.items():
    print(f"profiling {label} ...", flush=True)
    p = profiling.profile(c, state, batch, calls=args.calls,
                          trace_dir=os.path.join(run, "traces", label))
    p.wall_ms = wall[label] * 1e3  # interleaved medians, taken before any tracing
    profiles[label] = p
  with open(os.path.join(run, "ops.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["step", "op", "kind", "part", "layer", "us_per_call", "op_name"])
    for label, p in profiles.items():
      for o in p.ops:
        w.writerow([label, o.name, o.kind, o.part, o.layer, f"{o.us:.1f}", o.op_name])
  plot_parts(profiles, os.path.join(run, "plots", "parts.png"))

  header, rows = profiling.compare(profiles, "part", profiling.PARTS)
  by_part = reporting.markdown_table(header, rows)
  header, rows = profiling.compare(profiles, "kind", profiling.KINDS)
  by_kind = reporting.markdown_table(header, rows)
  excess = reporting.markdown_table(
      ["layer", "DP part"] + [f"{m} ms" for m in methods],
      layer_excess(profiles, "non-DP", args.top))
  cmd = f"python scripts/profile_dp.py --case {args.case} --methods {','.join(methods)}" + (
      f" --calls {args.calls}" if args.calls != 5 else "")
  unmatched = max(p.unmatched_us for p in profiles.values()) / 1e3
  body = (f"Measured {datetime.date.today()} on {platform.machine()} ({os.cpu_count()} CPU cores, "
          f"backend {jax.default_backend()}, jax {jax.__version__}) with `{cmd}`: {title}; "
          f"{args.calls} traced calls per step. Milliseconds per step; the op times are XLA's "
          f"per-op spans, which overlap on a multi-core CPU, so their sum can exceed the wall "
          f"time (the interleaved median of untraced calls). Largest time in trace events that "
          f"matched no HLO op: {unmatched:.3f} ms.\n\nBy part of the step:\n\n{by_part}\n\n"
          f"By kind of op:\n\n{by_kind}\n\nThe DP parts by layer (largest first):\n\n{excess}")
  with open(os.path.join(run, "report.md"), "w") as f:
    f.write(f"# DP step profile: {title}\n\n{body}\n")
  print(f"\n{body}\n\nwrote {run}")
  if args.benchmarks:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "BENCHMARKS.md")
    reporting.write_marked_block(path, f"profile_dp_{args.case}", "DP step profile", body)


if __name__ == "__main__":
  main()
