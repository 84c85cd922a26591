"""DP-SGD on a character LSTM: Flax's cell (its weights fall back to vmap) vs `LSTMLayer`.

  python scripts/benchmark_lstm_dp.py [--repeats 10] [--batch 64] [--no-write]

One training step (Adam) of `models.CharLSTM` (embedding 8, two LSTM layers, vocabulary 100,
windows of 80 characters, random ids: the time does not depend on the text) at widths 128 and
256 (LEAF's Shakespeare model is 2 x 256), with each cell:

- `cell="flax"`: Flax's `OptimizedLSTMCell` under `nn.RNN`. No clipping rule covers its weights,
  so book-keeping takes their per-example gradients from vmap (`privacy.fallback_leaves` lists
  them) and only the embedding and the output layer from the rules;
- `cell="dp"`: `models.LSTMLayer`, whose input projection is a Dense over the sequence and whose
  recurrent weight has its own rule (`privacy.ghost`), so book-keeping needs no vmap.

Rows: the non-DP step and the DP-SGD step (book-keeping, clip 1, noise multiplier 1) of each
cell, timed interleaved (one call of each per round, medians), and the vmap reference of each
cell timed afterwards on its own (its per-example gradients' temporaries slow whatever runs
next). Ratios are to the Flax cell's non-DP step, the model a non-private user would train.
Writes its table into BENCHMARKS.md between `<!-- benchmark_lstm_dp:begin/end -->`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

from trustjax import models, privacy, reporting, training  # pylint: disable=wrong-import-position
from trustjax.privacy.dp_sgd import DPConfig  # pylint: disable=wrong-import-position

VOCAB, LENGTH = 100, 80


def setup(hidden: int, cell: str, batch_size: int):
  """(loss_fn, state, batch, optimizer, DP config) for one CharLSTM."""
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, VOCAB, (batch_size, LENGTH + 1)), jnp.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "target_mask": jnp.ones((batch_size, LENGTH), bool),
           "mask": jnp.ones((batch_size,), bool)}
  model = models.CharLSTM(vocab_size=VOCAB, embed_dim=8, hidden=hidden, num_layers=2, cell=cell)
  params = model.init(jax.random.key(0), batch["inputs"])["params"]
  opt = optax.adam(1e-3)
  state = training.create_state(params, opt, jax.random.key(1))
  dp = DPConfig(l2_clip=1.0, noise_multiplier=1.0, sampling_rate=0.01,
                num_examples=100 * batch_size, max_batch_size=batch_size, method="bookkeeping")
  return models.lm_loss(model), state, batch, opt, dp


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
  args = ap.parse_args()
  rows = []
  for hidden in (128, 256):
    calls, reference, fallback = {}, {}, {}
    for cell in ("flax", "dp"):
      loss_fn, state, batch, opt, dp = setup(hidden, cell, args.batch)
      fallback[cell] = len(privacy.fallback_leaves(loss_fn, state.params, batch))
      for label, cfg in ((f"{cell} cell, non-DP", None), (f"{cell} cell, DP book-keeping", dp),
                         (f"{cell} cell, DP vmap", dataclasses.replace(dp, method="vmap"))):
        step = training.make_train_step(loss_fn, opt, cfg, donate=False)
        target = reference if label.endswith("vmap") else calls
        target[label] = lambda s=step, st=state, b=batch: s(st, b)
    secs = training.time_interleaved(calls, repeats=args.repeats)
    secs.update(training.time_interleaved(reference, repeats=max(3, args.repeats // 2)))
    base = secs["flax cell, non-DP"]
    for label in ("flax cell, non-DP", "flax cell, DP book-keeping", "flax cell, DP vmap",
                  "dp cell, non-DP", "dp cell, DP book-keeping", "dp cell, DP vmap"):
      cell = label.split()[0]
      own = secs[f"{cell} cell, non-DP"]
      leaves = fallback[cell] if "book-keeping" in label else "-"
      rows.append([f"LSTM 2x{hidden}, batch {args.batch}", label, 1e3 * secs[label],
                   secs[label] / base, secs[label] / own, leaves])
  table = reporting.markdown_table(
      ["model", "step", "median ms", "ratio to the flax cell's non-DP step",
       "ratio to its own cell's non-DP step", "parameter leaves on the vmap fallback"], rows)
  print(table)
  if not args.no_write:
    cmd = f"python scripts/benchmark_lstm_dp.py --repeats {args.repeats} --batch {args.batch}"
    body = (reporting.measured(cmd) + f": vocabulary {VOCAB}, windows of {LENGTH}, embedding 8, "
            "Adam.\n\n" + table)
    reporting.write_marked_block(reporting.BENCHMARKS_MD, "benchmark_lstm_dp",
                                 "DP-SGD on a character LSTM", body)


if __name__ == "__main__":
  main()
