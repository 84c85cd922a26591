"""Federated learning simulation: one or more strategies on a federated dataset.

  python scripts/federated.py --config configs/fl_snips.py:1
  python scripts/federated.py --config configs/fl_selection.py:shakespeare

Writes results/<run_name>/: config.json, summary.json, report.md, plots/accuracy.png and, per
strategy, metrics.jsonl + checkpoints/. Re-running the same command resumes unfinished strategies
from their latest checkpoint (finished ones are reloaded, not rerun).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, logging  # pylint: disable=g-import-not-at-top
from config_main import run_app, run_until_stopped
from ml_collections import config_flags

from trustjax import sharding
from trustjax.federated import experiments

# On a CPU, one JAX device per core, so that fl.num_devices = 0 (all devices) trains a block of
# clients on each core.
sharding.one_cpu_device_per_core()

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/fl_*.py file.",
                                          lock_config=True)


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = _CONFIG.value
  if cfg is None:
    raise app.UsageError("--config is required, e.g. --config configs/fl_snips.py:1")
  summary = run_until_stopped(experiments.run, cfg)  # Ctrl-C: a checkpoint, then exit 130
  print(f"\nresults: {os.path.join(cfg.results_dir, cfg.run_name)} (summary.json has every "
        f"number)\n\n{summary['task']}\n")
  print(experiments.summary_table(summary))


if __name__ == "__main__":
  run_app(main, "trustjax/federated/experiments.py:default_config")
