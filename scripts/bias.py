"""Measure the identity bias a toxicity classifier learns from real comments, from a config file.

  python scripts/bias.py --config configs/bias_toxicity.py [--config.seeds='(0,1)' ...]

Writes results/<run_name>/: config.json, summary.json, report.md and plots/bias_aucs.png
(with post-processing also plots/postprocessing.png). Prints the summary table and the
mitigations' tables.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from config_main import make_main, run_app  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from trustjax.fairness import experiments

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/bias_*.py file.",
                                          lock_config=True)

if __name__ == "__main__":
  run_app(make_main(_CONFIG, experiments.run,
                    experiments.printed_tables,
                    "configs/bias_toxicity.py"),
          "trustjax/fairness/experiments.py:default_config")
