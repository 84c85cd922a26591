"""Privacy audit on SNIPS: membership inference (LiRA, loss threshold), canary exposure and
canary extraction (ModIvA) against bag-of-embeddings intent classifiers trained without DP and
with DP at epsilon 8 and 1, 32 models per level trained in parallel.

  python scripts/audit.py --config configs/audit_snips.py
  python scripts/audit.py --config configs/audit_snips.py --config.data.data_dir=/path/to/snips
  python scripts/audit.py --config configs/audit_snips.py:runlocal   # a one-minute smoke run
"""

from trustjax.attacks.experiments import default_config


def get_config(arg: str = ""):
  c = default_config()
  c.run_name = "audit_snips"
  c.data.name = "snips"
  c.data.data_dir = "../shared/data/snips"
  if arg == "runlocal":
    c.run_name = "audit_snips_runlocal"
    c.data.pool_size = 300
    c.canaries.num = 4
    c.canaries.digits = 2
    c.train.num_models = 4
    c.train.batch_size = 32
    c.train.epochs = 10.0
    c.dp.epsilons = (8.0,)
    c.audit.inversion_steps = 20
    c.audit.inversion_restarts = 2
    c.audit.bootstrap_resamples = 200
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '' or 'runlocal'")
  c.lock()
  return c
