"""DP-FTRL and DP-MF vs DP-SGD vs non-DP step time, in one run.

  python scripts/benchmark_ftrl.py [--repeats 10] [--only mlp,encoder] [--no-write]

On `scripts/benchmark_dp.py`'s models, batches and optimizer (Adam), timed interleaved (one call of
each per round, `--repeats` rounds after 2 warm-up calls each; medians): the non-DP step, the
DP-SGD step (book-keeping, one normal draw per parameter) and the DP-FTRL step (book-keeping, the
tree's residual noise) at three positions of a 64-step tree. A step at position t draws k + 1
nodes, k the trailing zero bits of t: one node at t = 1 (and every odd t, half of all steps), four
at t = 8, seven at t = 64 (the last step of the tree); on average two per step over a tree of
2^j steps. So DP-FTRL's noise costs DP-SGD's noise times the number of nodes drawn, and its mean
cost over a tree is about that of two DP-SGD noise draws. The DP-MF step (book-keeping, banded
square root noise) draws one normal per parameter, as DP-SGD, and adds b - 1 stored noises
times their coefficients (a read of the b - 1 stored noises, one slot written): with BANDS = 4,
16, 64 bands, every step alike, its state donated as in training (the other steps are not, as
in benchmark_dp.py). Writes the table into BENCHMARKS.md between markers.
"""

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

from benchmark_dp import CASES, case_names, setup  # scripts/ is on sys.path when it runs
from trustjax import reporting, training
from trustjax.privacy import DPFTRLConfig, DPMFConfig, dp_mf

POSITIONS = (1, 8, 64)  # nodes drawn: 1, 4, 7
TREE = 64
BANDS = (4, 16, 64)


def run(names, repeats):
  rows = []
  for name in names:
    title, loss_fn, _, batch, opt, state, dp = setup(name)
    b = batch["label"].shape[0]
    ftrl = DPFTRLConfig(l2_clip=1.0, noise_multiplier=1.0, batch_size=b, num_examples=TREE * b,
                        method="bookkeeping")
    steps = {"non-DP": training.make_train_step(loss_fn, opt, donate=False),
             "DP-SGD": training.make_train_step(
                 loss_fn, opt, dataclasses.replace(dp, method="bookkeeping"), donate=False),
             "DP-FTRL": training.make_train_step(loss_fn, opt, ftrl, donate=False)}
    calls = {"non-DP": lambda: steps["non-DP"](state, batch),
             "DP-SGD": lambda: steps["DP-SGD"](state, batch)}
    for t in POSITIONS:  # the step's position in its tree is state.step % T + 1
      at = state.replace(step=jnp.asarray(t - 1, jnp.int32))
      calls[f"DP-FTRL, tree step {t}"] = lambda at=at: steps["DP-FTRL"](at, batch)
    for bands in BANDS:
      mf = DPMFConfig(l2_clip=1.0, noise_multiplier=1.0, batch_size=b, num_examples=TREE * b,
                      bands=bands, method="bookkeeping")
      # donated, as in training, so the history's one new slot is written in place; each call
      # takes the state the previous one returned
      mf_step = training.make_train_step(loss_fn, opt, mf, donate=True)
      chain = [jax.tree_util.tree_map(jnp.copy, state.replace(
          opt_state=dp_mf.init_state(state.params, opt, mf)))]

      def mf_call(f=mf_step, chain=chain):
        chain[0], metrics = f(chain[0], batch)
        return metrics

      calls[f"DP-MF, {bands} bands"] = mf_call
    secs = training.time_interleaved(calls, repeats=repeats)
    base, sgd = secs["non-DP"], secs["DP-SGD"]
    for label, s in secs.items():
      nodes = {f"DP-FTRL, tree step {t}": (t & -t).bit_length() for t in POSITIONS}.get(
          label, 1 if label == "DP-SGD" or label.startswith("DP-MF") else 0)
      rows.append([title, label, nodes, s * 1e3, s / base,
                   (s - sgd) * 1e3 if label.startswith(("DP-FTRL", "DP-MF")) else "-"])
      print(f"{title:45s} {label:22s} {s * 1e3:9.2f} ms  x{s / base:5.2f}", flush=True)
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--only", default="mlp,encoder", help=f"comma list of {list(CASES)}")
  ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
  args = ap.parse_args()
  names = case_names(ap, args.only)
  table = reporting.markdown_table(
      ["model", "step", "normal draws per parameter", "median ms", "ratio to non-DP",
       "ms over DP-SGD"], run(names, args.repeats))
  cmd = "python scripts/benchmark_ftrl.py" + (
      f" --only {args.only}" if args.only != "mlp,encoder" else "") + (
          f" --repeats {args.repeats}" if args.repeats != 10 else "")
  body = f"{reporting.measured(cmd)}:\n\n{table}"
  print("\n" + table)
  if args.no_write:
    return
  reporting.write_marked_block(reporting.BENCHMARKS_MD, "benchmark_ftrl",
                               "DP-FTRL and DP-MF vs DP-SGD step", body)


if __name__ == "__main__":
  main()
