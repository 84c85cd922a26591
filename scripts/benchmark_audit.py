"""Shadow models for a membership audit: trained all at once (vmap) vs one at a time.

  python scripts/benchmark_audit.py [--models 16] [--steps 100] [--repeats 3] [--model-chunk 2]
                                    [--no-write]

Task: the audit of `configs/audit_snips.py` (a pool of 2,000 SNIPS queries plus 20 canaries;
bag-of-embeddings classifiers, hash vocabulary of 8,192, 64-dim embeddings, hidden 128; each
model Poisson-samples its own half of the pool at rate 64/1010 and takes Adam steps), `--models`
models for `--steps` steps, without DP and with DP-SGD (book-keeping, the mechanism the audit's
epsilon-8 level uses). Every row trains the same models from the same initial parameters with
the same per-model, per-step samples and noise (`attacks.shadow.model_trainer`), so they compute
the same thing:

- trustjax, all models in one program: `train_in_parallel`'s program, `vmap` over models of a
  `lax.scan` over steps, in chunks of `--model-chunk` models (2, its CPU default) run one after
  another by `lax.map`;
- trustjax, one vmap over all models (`model_chunk` = number of models, its accelerator default);
- trustjax, sharded: the models split over the CPU's cores as JAX devices (one per core, a mesh
  axis "models", `jax.shard_map`), each device running its block in chunks of `--model-chunk`
  (the audit's default, `train.num_devices` = 0);
- loop over models: each model's whole scan as one jitted call, one call per model;
- loop over models and steps: one jitted call per model per step, the usual shadow-model design
  (a training loop run once per shadow model).

Timings are medians over `--repeats` rounds, one call of each variant per round (compilation
excluded). Writes its table into BENCHMARKS.md between `<!-- benchmark_audit:begin/end -->`.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from trustjax import reporting, sharding, training  # pylint: disable=wrong-import-position
from trustjax.attacks import experiments, shadow  # pylint: disable=wrong-import-position

sharding.one_cpu_device_per_core()  # before JAX starts: the sharded row's devices


def _load_config(data_dir: str):
  import importlib.util  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                      "audit_snips.py")
  spec = importlib.util.spec_from_file_location("audit_snips", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()
  cfg.unlock()
  if data_dir:
    cfg.data.data_dir = data_dir
  return cfg


def variants(setup, level: str, num_models: int, steps: int, model_chunk: int) -> dict:
  """Zero-argument calls, one per variant, each training `num_models` models for `steps` steps."""
  dp_config = setup.mechanisms.get(level)
  opt = experiments._optimizer(setup.cfg, level)  # pylint: disable=protected-access
  kw = dict(sampling_rate=setup.sampling_rate, batch_size=setup.batch_size, dp_config=dp_config)
  whole = shadow.model_trainer(setup.loss_fn, opt, setup.arrays, steps=steps, **kw)
  one_step = jax.jit(shadow.model_trainer(setup.loss_fn, opt, setup.arrays, steps=1, **kw))
  parallel = jax.jit(shadow.models_program(whole, model_chunk))
  one_vmap = jax.jit(shadow.models_program(whole, num_models))
  devices = jax.device_count()
  if num_models % devices:
    raise ValueError(f"--models {num_models} must be a multiple of the {devices} devices")
  sharded = jax.jit(shadow.models_program(whole, model_chunk, shadow.model_mesh(devices)))
  per_model = jax.jit(whole)
  root = jax.random.key(0)
  keys = jax.random.split(jax.random.fold_in(root, 0), num_models)
  params = jax.vmap(setup.init_fn)(jax.random.split(jax.random.fold_in(root, 1), num_models))
  opt_state = jax.vmap(opt.init)(params)
  members = jnp.asarray(setup.is_in[:num_models])
  pick = lambda tree, m: jax.tree.map(lambda x: x[m], tree)
  start = jnp.int32(0)

  def loop_models():
    return [per_model(pick(params, m), pick(opt_state, m), keys[m], members[m], start)
            for m in range(num_models)]

  def loop_steps():
    out = []
    for m in range(num_models):
      p, s = pick(params, m), pick(opt_state, m)
      for t in range(steps):
        p, s, _ = one_step(p, s, keys[m], members[m], jnp.int32(t))
      out.append(p)
    return out

  calls = {f"trustjax, all models in one program ({model_chunk} per vmap)":
           lambda: parallel(params, opt_state, keys, members, start),
           "trustjax, one vmap over all models":
           lambda: one_vmap(params, opt_state, keys, members, start),
           f"trustjax, sharded over {devices} CPU devices ({model_chunk} per vmap each)":
           lambda: sharded(params, opt_state, keys, members, start),
           "loop over models (one jitted scan each)": loop_models,
           "loop over models and steps (one jitted step each)": loop_steps}
  # the variants compute the same models: check the first and last models before timing
  loop = loop_steps()
  err = 0.0
  for program in (parallel, sharded):
    out = program(params, opt_state, keys, members, start)[0]
    for m in (0, num_models - 1):
      err = max([err] + [float(jnp.max(jnp.abs(x - y))) for x, y in zip(
          jax.tree.leaves(pick(out, m)), jax.tree.leaves(loop[m]))])
  return calls, err


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", type=int, default=16)
  ap.add_argument("--steps", type=int, default=100)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--model-chunk", type=int, default=2, help="models per vmap (trustjax row)")
  ap.add_argument("--data-dir", default="", help="SNIPS folder (default: the config's)")
  ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
  args = ap.parse_args()
  cfg = _load_config(args.data_dir)
  cfg.train.num_models = max(args.models, 2 + args.models % 2)
  cfg.dp.epsilons = (8.0,)
  setup = experiments.AuditSetup(cfg)
  rows = []
  for level in ("nondp", "eps8"):
    calls, err = variants(setup, level, args.models, args.steps, args.model_chunk)
    times = training.time_interleaved(calls, repeats=args.repeats, warmup=1)
    base = times["loop over models and steps (one jitted step each)"]
    for name, sec in times.items():
      rows.append([("non-DP" if level == "nondp" else "DP-SGD (eps 8)"), name, sec,
                   args.models * args.steps / sec, base / sec])
    print(f"{level}: largest parameter difference, parallel and sharded vs per-step loop: "
          f"{err:.2e}")
    if err > 1e-4:
      raise RuntimeError(f"the variants trained different models ({err:.2e})")
  table = reporting.markdown_table(
      ["training", "variant", "median s", "model-steps / s", "speed-up over per-step loop"], rows)
  print(table)
  if not args.no_write:
    cmd = (f"python scripts/benchmark_audit.py --models {args.models} --steps {args.steps} "
           f"--repeats {args.repeats} --model-chunk {args.model_chunk}")
    body = (reporting.measured(cmd) + f": {args.models} models x {args.steps} steps, padded "
            f"batch {setup.batch_size}.\n\n" + table)
    reporting.write_marked_block(reporting.BENCHMARKS_MD, "benchmark_audit",
                                 "Shadow models for a membership audit", body)


if __name__ == "__main__":
  main()
