"""DP-SGD vs non-DP step time and memory, and Opacus on the same models, in one run.

  python scripts/benchmark_dp.py [--repeats 10] [--only mlp,encoder] [--no-opacus] [--no-write]

For each model: the non-DP step (mean loss, one backward) and the DP step (clip, sum, Gaussian
noise) with each clipped-sum method (vmap per-example gradients; ghost norms + second backward;
book-keeping), same model, batch and sequence length, same optimizer (Adam). The variants are timed
interleaved (one call of each per round, `--repeats` rounds after 2 warm-up calls each), so that
the machine's load drifts over all of them alike; the slow vmap reference is timed on its own after
them, because its large temporaries slow down whatever step runs next. Reports the median wall
time, the ratio to non-DP, and XLA's peak buffer estimate for the compiled step (arguments +
outputs + temporaries, from `compiled.memory_analysis()`). Then `scripts/opacus_step.py` runs in a
subprocess (its own threads) for PyTorch's non-DP step and Opacus's hooks and ghost modes on the
same architecture and batch (Opacus rows: ratio to trustjax's non-DP step; memory not measured). A
second table checks the targets. A last trustjax row per model is a breakdown, not a private
method: the book-keeping step with noise_multiplier 0 (`privatize` then draws nothing and returns
the clipped sum divided by the expected batch size), so that the table shows how much of the DP
overhead is clipping and how much is drawing one normal value per parameter, which no clipping
method changes. Writes both into BENCHMARKS.md between markers.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax

from trustjax import models, reporting, training
from trustjax.privacy import DPConfig

def _mlp(batch_size):
  model = models.MLPClassifier(hidden=(512, 512), num_classes=10)
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(batch_size, 784)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)}
  params = model.init(jax.random.key(0), batch["x"][:1])["params"]
  return models.classification_loss(model, input_key="x"), params, batch


def _encoder(batch_size, layers, width, seq, vocab=10000, heads=4):
  model = models.TransformerClassifier(vocab_size=vocab, num_classes=2, max_length=seq,
                                       embed_dim=width, num_layers=layers, num_heads=heads,
                                       mlp_dim=4 * width)
  rng = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(rng.integers(1, vocab, (batch_size, seq)), jnp.int32),
           "label": jnp.asarray(rng.integers(0, 2, batch_size), jnp.int32)}
  params = model.init(jax.random.key(0), batch["tokens"][:1])["params"]
  return models.classification_loss(model), params, batch


CASES = {
    "mlp": ("MLP 784-512-512-10, batch 256", lambda: _mlp(256)),
    "encoder": ("Encoder 2x128, 4 heads, seq 64, vocab 10k, batch 32",
                lambda: _encoder(32, 2, 128, 64)),
    "encoder256": ("Encoder 2x128, 4 heads, seq 64, vocab 10k, batch 256",
                   lambda: _encoder(256, 2, 128, 64)),
    "encoder_large": ("Encoder 4x256, 4 heads, seq 128, vocab 10k, batch 64",
                      lambda: _encoder(64, 4, 256, 128)),
}


def _opacus(name, repeats):
  """Runs scripts/opacus_step.py in a subprocess; None if PyTorch/Opacus are not installed."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "opacus_step.py")
  proc = subprocess.run([sys.executable, script, "--case", name, "--repeats", str(repeats)],
                        capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    print(f"Opacus run for {name} failed:\n{proc.stderr[-1500:]}", flush=True)
    return None
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _peak_mib(step, state, batch) -> float:
  mem = step.lower(state, batch).compile().memory_analysis()
  if mem is None:
    return float("nan")
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
           - mem.alias_size_in_bytes)
  return total / 2 ** 20


def setup(name):
  """(title, loss_fn, params, batch with an all-true mask, Adam, its state, the DP config:
  clip 1, noise multiplier 1, the batch as max batch size) for a case; profile_dp.py uses it too."""
  title, make = CASES[name]
  loss_fn, params, batch = make()
  b = batch["label"].shape[0]
  batch["mask"] = jnp.ones((b,), bool)
  opt = optax.adam(1e-3)
  state = training.create_state(params, opt, jax.random.key(1))
  dp = DPConfig(l2_clip=1.0, noise_multiplier=1.0, sampling_rate=0.01, num_examples=100 * b,
                max_batch_size=b)
  return title, loss_fn, params, batch, opt, state, dp


def run(names, repeats, opacus=True):
  rows, summary = [], []
  for name in names:
    title, loss_fn, params, batch, opt, state, dp = setup(name)
    variants = [("non-DP", None)] + [
        (f"DP {m}", dataclasses.replace(dp, method=m)) for m in ("vmap", "ghost", "bookkeeping")]
    steps = {label: training.make_train_step(loss_fn, opt, cfg, donate=False)
             for label, cfg in variants}
    # Breakdown only, NOT private: the book-keeping step without its noise draws.
    noiseless = training.make_train_step(
        loss_fn, opt, dataclasses.replace(dp, method="bookkeeping", noise_multiplier=0.0),
        donate=False)
    calls = {label: (lambda s=s: s(state, batch)) for label, s in steps.items()}
    calls["noiseless"] = lambda: noiseless(state, batch)
    # The vmap reference is timed on its own afterwards: interleaved, its large temporaries (1 GiB
    # on the MLP) doubled the time of the millisecond steps that ran after it.
    secs = training.time_interleaved({k: v for k, v in calls.items() if k != "DP vmap"},
                                     repeats=repeats)
    secs.update(training.time_interleaved({"DP vmap": calls["DP vmap"]}, repeats=repeats))
    base, base_mem = secs["non-DP"], _peak_mib(steps["non-DP"], state, batch)
    dp_rows = []
    for label, cfg in variants:
      seconds = secs[label]
      mem = _peak_mib(steps[label], state, batch)
      rows.append([title, label, seconds * 1e3, seconds / base, mem])
      if cfg is not None:
        dp_rows.append((seconds, label, mem))
      print(f"{title:55s} {label:18s} {seconds * 1e3:9.2f} ms  x{seconds / base:6.2f}  "
            f"{mem:8.1f} MiB", flush=True)
    n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
    rows.append([title, f"(breakdown) bookkeeping without its {n_params / 1e6:.2f}M noise draws",
                 secs["noiseless"] * 1e3, secs["noiseless"] / base,
                 _peak_mib(noiseless, state, batch)])
    best_s, best_label, best_mem = min(dp_rows)
    line = [title, best_label.replace("DP ", ""), best_s / base, secs["noiseless"] / base,
            best_mem / base_mem]
    op = _opacus(name, repeats) if opacus else None
    if op is not None:
      for key, label in (("nondp_ms", "PyTorch non-DP"), ("hooks_ms", "Opacus hooks"),
                         ("ghost_ms", "Opacus ghost")):
        rows.append([title, label, op[key], op[key] / (base * 1e3), "-"])
        print(f"{title:55s} {label:18s} {op[key]:9.2f} ms  x{op[key] / (base * 1e3):6.2f}",
              flush=True)
      line.append(min(op["hooks_ms"], op["ghost_ms"]) / (best_s * 1e3))
    else:
      line.append(float("nan"))
    ok = line[2] <= 1.25 and line[4] <= 1.2
    if line[5] != line[5]:  # no Opacus run: that target is unmeasured, not met
      verdict = "no Opacus run" if ok else "no"
    else:
      verdict = "yes" if ok and line[5] >= 2 else "no"
    summary.append(line + [verdict])
  return rows, summary


def case_names(ap: argparse.ArgumentParser, only: str) -> list[str]:
  """The CASES named in `--only` (a comma list); an unknown one is a usage error."""
  names = [n for n in only.split(",") if n]
  unknown = sorted(set(names) - set(CASES))
  if unknown:
    ap.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
  return names


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--only", default=",".join(CASES), help=f"comma list of {list(CASES)}")
  ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
  ap.add_argument("--no-opacus", action="store_true", help="skip the PyTorch/Opacus rows")
  args = ap.parse_args()
  names = case_names(ap, args.only)
  rows, summary = run(names, args.repeats, opacus=not args.no_opacus)
  table = reporting.markdown_table(
      ["model", "step", "median ms", "ratio to non-DP (trustjax)", "peak MiB (XLA estimate)"],
      rows)
  table += "\n\nTargets (best DP method <= 1.25x non-DP time and <= 1.2x its peak memory, and >= 2x " \
           "faster than Opacus's best mode):\n\n" + reporting.markdown_table(
               ["model", "best DP method", "time ratio",
                "book-keeping without noise (breakdown)", "memory ratio",
                "speed-up over Opacus's best", "all targets met"], summary)
  cmd = "python scripts/benchmark_dp.py" + (f" --only {args.only}" if args.only != ",".join(
      CASES) else "") + (f" --repeats {args.repeats}" if args.repeats != 10 else "") + (
          " --no-opacus" if args.no_opacus else "")
  body = f"{reporting.measured(cmd)}:\n\n{table}"
  print("\n" + table)
  if args.no_write:
    return
  reporting.write_marked_block(reporting.BENCHMARKS_MD, "benchmark_dp",
                               "DP-SGD vs non-DP step", body)


if __name__ == "__main__":
  main()
