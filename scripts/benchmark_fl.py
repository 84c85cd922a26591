"""One federated round: trustjax's vmapped clients vs a sequential jitted loop vs centralized SGD.

  python scripts/benchmark_fl.py [--clients 100] [--models lstm128,lstm16,gpt64] [--client-chunk 4]
                                 [--client-chunk-gpt 1] [--repeats 5] [--no-write]

Task: next-character prediction on Shakespeare speaking roles (LEAF), `--clients` roles drawn at
random, each role's first `--max-windows` windows of 80 characters, one local epoch of SGD with
batch 16. Models (`--models`): `lstmN`, a character LSTM (embedding 8, one LSTM layer of N units:
128, compute-bound on a CPU, and 16, where per-call overhead dominates), and `gptN`, the GPT-style
decoder (`models.GPTDecoder`: width N, 2 layers, 4 heads, MLP 4N; the issue's "small transformer
LM"). Local SGD rates: 1.0 for the LSTMs, `--lr-gpt` 0.3 for the decoders (in one centralized
epoch of gpt64 at 1.0 the first ten batches' mean loss was 5.7, at 0.3 3.9; the last ten's 3.0
and 2.8). The timings do not depend on the rate. Chunks: `--client-chunk` 4 for the LSTMs (the
federated driver's CPU default), `--client-chunk-gpt` 1 for the decoders (one client at a time per
device: in an interleaved probe of gpt64, chunks of 1 vs 4 took 1609 vs 1824 ms sharded over 2
cores and 2154 vs 2033 ms on one; the LSTMs were faster with 4 in both).

Rows, all on the same examples in one process:
- trustjax, one vmap: `run_round` with every client in one cohort (vmap over all clients, a
  while loop over local steps, one compiled program, examples padded to the cohort's size bucket);
- trustjax, chunked: the same round with `client_chunk` (clients sorted by size, that many at a
  time under vmap, lax.map over the chunks: each chunk loops only as long as its busiest
  client, and a chunk's models stay in cache);
- trustjax, chunked and sharded: the chunked round with the clients split over the CPU's cores
  as JAX devices (a mesh axis "clients", `run_round(..., mesh=...)`; each device sorts and chunks
  its own block). The script sets `--xla_force_host_platform_device_count` to the core count
  unless XLA_FLAGS already sets it; the other rows run on one device (XLA still spreads their
  large products over the cores);
- sequential: the usual simulator design (FedJAX's or Flower's simulation loop): for each client,
  a Python loop over its minibatches calling one jitted SGD step (batches padded to 16 with a
  mask, so it also compiles once), then the weighted average of the client models;
- sequential, one jit per client: a stronger loop: each client's whole local training
  (`local_train`, the function trustjax vmaps) as one jitted call;
- centralized: one epoch of SGD over the union of the clients' examples, batch 16, jitted step
  (the same number of example-gradients as the round).
Reports the median wall time of `--repeats` rounds after a warm-up (the variants timed in turn,
one round of each per repeat), clients per second, the speed-up over both sequential loops and
the efficiency = centralized time / round time. A second table sets the round's work (the
model's matmul FLOPs) against the rate of a large float32 matmul on the same machine: the rate a 5x
speed-up over the per-batch loop would need.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from trustjax import data as tjdata
from trustjax import models, reporting, sharding, training
from trustjax import federated as fl

sharding.one_cpu_device_per_core()  # for the sharded row; before the first JAX computation


def _problem(num_clients, max_windows, seed=0):
  corpus = tjdata.load_shakespeare()
  rng = np.random.default_rng(seed)
  keep = np.sort(rng.choice(len(corpus), num_clients, replace=False))
  corpus = tjdata.RoleCorpus(tuple(corpus.roles[i] for i in keep),
                             tuple(corpus.speeches[i] for i in keep),
                             tuple(corpus.times[i] for i in keep))
  tok = tjdata.build_char_tokenizer([corpus.text(), "\n"], max_vocab=100)
  ex = tjdata.lm_examples(corpus, tok, 80)
  arrays = {k: ex[k] for k in ("inputs", "targets", "target_mask")}
  parts, _ = fl.partition.natural(ex["client"])
  store = fl.ClientStore(arrays, parts, min_capacity=16, max_capacity=max_windows)
  return store, tok.vocab_size


def _lstm_flops_per_token(embed, hidden, vocab):
  """Multiply-add FLOPs of one token's forward and backward pass through the gate matmul
  ([embed + hidden] -> 4 hidden) and the output matmul (hidden -> vocab), the backward counted as
  twice the forward; elementwise work is left out, so this is a lower bound on the work."""
  return 3 * 2 * ((embed + hidden) * 4 * hidden + hidden * vocab)


def _gpt_flops_per_token(width, layers, vocab, seq, mlp_mult=4):
  """Multiply-add FLOPs of one token's forward and backward pass through the decoder's products:
  per layer the q, k, v and output projections (4 d^2), the MLP (2 * mlp_mult * d^2) and the
  attention scores and weighted values (2 * seq * d, the full square though half is masked),
  then the output layer (d * vocab); backward counted as twice the forward, elementwise work left
  out (a lower bound)."""
  d = width
  per_layer = 4 * d * d + 2 * mlp_mult * d * d + 2 * seq * d
  return 3 * 2 * (layers * per_layer + d * vocab)


def _model(spec, vocab, seq=80):
  """`lstmN` or `gptN` -> (label, flax model, matmul FLOPs per token, local learning rate key)."""
  if spec.startswith("lstm"):
    n = int(spec[4:])
    return (f"LSTM {n}", models.CharLSTM(vocab_size=vocab, embed_dim=8, hidden=n),
            _lstm_flops_per_token(8, n, vocab), "lstm")
  if spec.startswith("gpt"):
    n = int(spec[3:])
    return (f"GPT {n}x2", models.GPTDecoder(vocab_size=vocab, max_length=seq, embed_dim=n,
                                            num_layers=2, num_heads=4, mlp_dim=4 * n),
            _gpt_flops_per_token(n, 2, vocab, seq), "gpt")
  raise ValueError(f"unknown model {spec!r}; expected lstmN or gptN (e.g. lstm128, gpt64)")


def _matmul_gflops(n=2048, repeats=10):
  """GFLOP/s of one jitted float32 n x n x n matmul on this machine (the median of `repeats`)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  seconds = training.time_interleaved({"mm": lambda: f(a)}, repeats=repeats)["mm"]
  return 2 * n ** 3 / seconds / 1e9


def run(num_clients, max_windows, spec, repeats, chunks, lrs, batch_size=16):
  store, vocab = _problem(num_clients, max_windows)
  m, model, flops_per_token, kind = _model(spec, vocab)
  lr, client_chunk = lrs[kind], chunks[kind]
  params = model.init(jax.random.key(0), jnp.zeros((1, 80), jnp.int32))["params"]
  loss_fn = models.lm_loss(model)
  ids = np.arange(store.num_clients)
  weights = (store.counts / store.counts.sum()).astype(np.float32)
  sel = fl.Selection(ids.astype(np.int32), weights)
  cohort = fl.make_cohort(store, sel)
  alg = fl.fedavg(loss_fn=loss_fn, client_lr=lr, batch_size=batch_size)
  chunked_alg = fl.fedavg(loss_fn=loss_fn, client_lr=lr, batch_size=batch_size,
                          client_chunk=client_chunk)
  state = alg.init(params)

  def vmapped():
    return fl.run_round(alg, state, cohort, jax.random.key(0))[0].params

  def chunked():
    return fl.run_round(chunked_alg, state, cohort, jax.random.key(0))[0].params

  devices = jax.device_count() if jax.default_backend() == "cpu" else 1
  mesh = fl.simulate.client_mesh(devices)
  sharded_cohort = fl.simulate.pad_cohort(cohort, devices)

  def sharded():
    return fl.run_round(chunked_alg, state, sharded_cohort, jax.random.key(0), mesh=mesh)[0].params

  one_client = jax.jit(lambda ex, n, k: fl.local_train(
      params, ex, n, k, jnp.float32(1.0), loss_fn=loss_fn, client_lr=lr, batch_size=batch_size,
      local_epochs=1).params)
  client_examples = [{k: jax.device_put(v[i]) for k, v in cohort.examples.items()} for i in ids]
  client_keys = jax.random.split(jax.random.key(0), len(ids))

  def per_client_jit():
    outs = [one_client(ex, cohort.counts[i], client_keys[i])
            for i, ex in zip(ids, client_examples)]
    return weighted_avg(outs, list(weights))

  @jax.jit
  def sgd_step(p, batch):
    def mean_loss(q):
      per = loss_fn(q, batch)
      m = batch["mask"].astype(per.dtype)
      return (per * m).sum() / jnp.maximum(m.sum(), 1.0)
    g = jax.grad(mean_loss)(p)
    return jax.tree_util.tree_map(lambda a, b: a - lr * b, p, g)

  @jax.jit
  def weighted_avg(models_, w):
    return jax.tree_util.tree_map(lambda *xs: sum(wi * x for wi, x in zip(w, xs)), *models_)

  client_batches = []
  for i in ids:
    arrays = store.client_examples(i)
    client_batches.append([jax.device_put(b) for b in tjdata.padded_batches(
        arrays, batch_size, shuffle=True, seed=int(i))])

  def sequential():
    outs = []
    for batches in client_batches:
      p = params
      for b in batches:
        p = sgd_step(p, b)
      outs.append(p)
    return weighted_avg(outs, list(weights))

  pooled = {k: np.concatenate([store.client_examples(i)[k] for i in ids]) for k in store.flat}
  central_batches = [jax.device_put(b) for b in tjdata.padded_batches(
      pooled, batch_size, shuffle=True, seed=0)]

  def centralized():
    p = params
    for b in central_batches:
      p = sgd_step(p, b)
    return p

  # One warm-up call each (it compiles), then one round of each variant per repeat: this
  # machine's speed drifted by up to 1.7x between consecutive runs.
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree_util.tree_leaves(chunked()), jax.tree_util.tree_leaves(sharded())))
  print(f"{m}: sharded over {devices} devices vs one device, max |difference| of the "
        f"new model: {diff:.2g}", flush=True)
  t = training.time_interleaved({"v": vmapped, "k": chunked, "d": sharded, "s": sequential,
                                 "j": per_client_jit, "c": centralized},
                                repeats=repeats, warmup=1)
  t_v, t_k, t_d, t_s, t_j, t_c = t["v"], t["k"], t["d"], t["s"], t["j"], t["c"]
  desc = (f"{store.num_clients} Shakespeare roles, {store.num_examples} windows of 80 chars "
          f"(cohort padded to {cohort.examples['inputs'].shape[1]} per client), 1 local epoch, "
          f"batch {batch_size}")
  def row(label, t):
    return [m, label, f"{t * 1e3:.0f}", f"{store.num_clients / t:.1f}", f"{t_s / t:.2f}x",
            f"{t_j / t:.2f}x", f"{t_c / t:.2f}"]

  tokens = sum(int(b["inputs"].size) for b in central_batches)
  gflop = flops_per_token * tokens / 1e9
  bound = [m, f"{gflop:.1f}", f"{gflop / t_c:.0f}", f"{gflop / t_k:.0f}", f"{gflop / t_d:.0f}",
           f"{gflop / (t_s / 5):.0f}"]
  rows = [
      row("trustjax, one vmap over all clients", t_v),
      row(f"trustjax, client_chunk={client_chunk} (size-sorted)", t_k),
      row(f"trustjax, client_chunk={client_chunk}, sharded over {devices} CPU devices "
          "(one per core)", t_d),
      row("sequential loop, jitted SGD step per batch", t_s),
      row("sequential loop, one jitted local_train per client", t_j),
      [m, "centralized SGD, same examples (1 epoch)", f"{t_c * 1e3:.0f}", "-", "-", "-", "1.00"],
  ]
  return desc, rows, bound


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--clients", type=int, default=100)
  ap.add_argument("--max-windows", type=int, default=32)
  ap.add_argument("--models", default="lstm128,lstm16,gpt64",
                  help="comma list of lstmN (character LSTM, N units) and gptN (GPT decoder, "
                  "width N)")
  ap.add_argument("--lr-lstm", type=float, default=1.0, help="local SGD rate for the LSTMs")
  ap.add_argument("--lr-gpt", type=float, default=0.3, help="local SGD rate for the decoders")
  ap.add_argument("--client-chunk", type=int, default=4, help="clients per vmap, LSTMs")
  ap.add_argument("--client-chunk-gpt", type=int, default=1, help="clients per vmap, decoders")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
  args = ap.parse_args()
  rows, bounds = [], []
  lrs = {"lstm": args.lr_lstm, "gpt": args.lr_gpt}
  chunks = {"lstm": args.client_chunk, "gpt": args.client_chunk_gpt}
  for spec in args.models.split(","):
    desc, r, b = run(args.clients, args.max_windows, spec, args.repeats, chunks, lrs)
    rows += r
    bounds.append(b)
  peak = _matmul_gflops()
  table = reporting.markdown_table(
      ["model", "round", "median ms", "clients / s", "speed-up vs per-batch loop",
       "speed-up vs per-client jit", "efficiency (centralized / this)"], rows)
  table += ("\n\nThe work (matmul FLOPs of forward and backward, a lower bound) against the rate "
            f"of a 2048x2048x2048 float32 matmul on this machine, {peak:.0f} GFLOP/s:\n\n")
  table += reporting.markdown_table(
      ["model", "GFLOP per round", "centralized GFLOP/s", "chunked GFLOP/s", "sharded GFLOP/s",
       "GFLOP/s a 5x speed-up over the per-batch loop needs"],
      bounds)
  cmd = "python scripts/benchmark_fl.py" + "".join(
      f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
      if k != "no_write" and v != ap.get_default(k))
  body = f"{reporting.measured(cmd)}; {desc}:\n\n{table}"
  print(body)
  if not args.no_write:
    reporting.write_marked_block(reporting.BENCHMARKS_MD, "benchmark_fl",
                                 "One federated round (100 clients)", body)


if __name__ == "__main__":
  main()
