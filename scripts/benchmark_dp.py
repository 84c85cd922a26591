"""DP-SGD vs non-DP step time and memory, side by side in one process.

  python scripts/benchmark_dp.py [--repeats 10] [--only mlp,encoder] [--no-write]

For each model: the non-DP step (mean loss, one backward) and the DP step (clip, sum, Gaussian
noise) with each clipped-sum method (vmap per-example gradients; ghost norms + second backward;
book-keeping), same model, batch and sequence length, same optimizer (Adam). Reports the median wall time over `--repeats` calls after 2 warm-up calls, the ratio to
non-DP, and XLA's peak buffer estimate for the compiled step (arguments + outputs + temporaries,
from `compiled.memory_analysis()`). Writes the table into BENCHMARKS.md between markers.
"""

import argparse
import dataclasses
import datetime
import os
import platform
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
}


def _peak_mib(step, state, batch) -> float:
  mem = step.lower(state, batch).compile().memory_analysis()
  if mem is None:
    return float("nan")
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
           - mem.alias_size_in_bytes)
  return total / 2 ** 20


def run(names, repeats):
  rows = []
  for name in names:
    title, make = CASES[name]
    loss_fn, params, batch = make()
    b = batch["label"].shape[0]
    batch["mask"] = jnp.ones((b,), bool)
    opt = optax.adam(1e-3)
    state = training.create_state(params, opt, jax.random.key(1))
    dp = DPConfig(l2_clip=1.0, noise_multiplier=1.0, sampling_rate=0.01, num_examples=100 * b,
                  max_batch_size=b)
    variants = [("non-DP", None)] + [
        (f"DP {m}", dataclasses.replace(dp, method=m)) for m in ("vmap", "ghost", "bookkeeping")]
    base = None
    for label, cfg in variants:
      step = training.make_train_step(loss_fn, opt, cfg, donate=False)
      seconds = training.time_step(step, state, batch, repeats=repeats)
      base = base or seconds
      rows.append([title, label, seconds * 1e3, seconds / base, _peak_mib(step, state, batch)])
      print(f"{title:55s} {label:8s} {seconds * 1e3:9.2f} ms  x{seconds / base:6.2f}  "
            f"{rows[-1][-1]:8.1f} MiB", flush=True)
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--only", default=",".join(CASES), help=f"comma list of {list(CASES)}")
  ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
  args = ap.parse_args()
  names = [n for n in args.only.split(",") if n]
  unknown = sorted(set(names) - set(CASES))
  if unknown:
    ap.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
  rows = run(names, args.repeats)
  table = reporting.markdown_table(
      ["model", "step", "median ms", "ratio to non-DP", "peak MiB (XLA estimate)"], rows)
  cmd = "python scripts/benchmark_dp.py" + (f" --only {args.only}" if args.only != ",".join(
      CASES) else "") + (f" --repeats {args.repeats}" if args.repeats != 10 else "")
  body = (f"Measured {datetime.date.today()} on {platform.machine()} "
          f"({os.cpu_count()} CPU cores, backend {jax.default_backend()}, jax {jax.__version__})"
          f" with `{cmd}`:\n\n{table}")
  print("\n" + table)
  if args.no_write:
    return
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "BENCHMARKS.md")
  reporting.write_marked_block(path, "benchmark_dp", "DP-SGD vs non-DP step", body)


if __name__ == "__main__":
  main()
