"""Audit what text classifiers leak, without DP and at several epsilons, from a config file.

  python scripts/audit.py --config configs/audit_snips.py [--config.train.num_models=32 ...]

Writes results/<run_name>/: config.json, levels/<level>.npz (each level's statistics; a rerun
skips the levels already saved), summary.json, report.md and plots/roc.png. Ctrl-C while a
level trains saves its models after the current chunk of steps; the same command resumes.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from config_main import make_main, run_app  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from trustjax import sharding
from trustjax.attacks import experiments

# On a CPU, one JAX device per core, so that train.num_devices = 0 (all devices) trains a block
# of the models on each core. Must run before JAX starts its backend.
sharding.one_cpu_device_per_core()

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/audit_*.py file.",
                                          lock_config=True)

if __name__ == "__main__":
  run_app(make_main(_CONFIG, experiments.run,
                    lambda summary, cfg: experiments.report_table(summary, cfg.audit.fprs),
                    "configs/audit_snips.py"),
          "trustjax/attacks/experiments.py:default_config")
