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
traces/<step>/trace.json.gz (Perfetto traces: open them in ui.perfetto.dev) and parts.png.
With `--benchmarks`, the tables also go into BENCHMARKS.md between markers.

The op times are XLA's own per-op spans. On a CPU, XLA runs independent ops at the same time on
different cores, so their sum can exceed the wall time; the tables give both.
"""

import argparse
import dataclasses
import datetime
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


from benchmark_dp import CASES, setup  # scripts/ is on sys.path when this script runs
from trustjax import profiling, reporting, training

METHODS = ("vmap", "ghost", "bookkeeping")


def steps_for(case: str, methods):
  """(title, {label: jitted step}, (state, batch)) for a benchmark_dp case."""
  title, loss_fn, _, batch, opt, state, dp = setup(case)
  configs = {"non-DP": None}
  configs.update({m: dataclasses.replace(dp, method=m) for m in methods})
  return title, {label: training.make_train_step(loss_fn, opt, cfg, donate=False)
                 for label, cfg in configs.items()}, (state, batch)


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

  title, steps, step_args = steps_for(args.case, methods)
  run = os.path.join(args.out, f"{args.case}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
  print(f"profiling {', '.join(steps)} ...", flush=True)
  profiles = profiling.profile_steps(steps, step_args, calls=args.calls, folder=run)
  cmd = f"python scripts/profile_dp.py --case {args.case} --methods {','.join(methods)}" + (
      f" --calls {args.calls}" if args.calls != 5 else "")
  body = profiling.write_report(
      profiles, run, base="non-DP", top=args.top,
      title=f"{reporting.measured(cmd)}: {title}")
  print(f"\n{body}\n\nwrote {run}")
  if args.benchmarks:
    reporting.write_marked_block(reporting.BENCHMARKS_MD, f"profile_dp_{args.case}",
                                 "DP step profile", body)


if __name__ == "__main__":
  main()
