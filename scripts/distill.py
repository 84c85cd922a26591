"""Measure how a teacher language model's gender bias passes to distilled students, and how
counterfactual augmentation and the role-reversed teacher remove it, from a config file.

  python scripts/distill.py --config configs/distill_professions.py [--config.seeds='(0,1)' ...]
  python scripts/distill.py --config configs/distill_shakespeare_bold.py

Writes results/<run_name>/: config.json, summary.json, report.md and a plot (plots/*.png).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from config_main import make_main, run_app  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from trustjax.fairness import distillation, distillation_bold


def _study(cfg):
  """The study module a config names: the gendered-profession corpus (default) or
  Shakespeare with BOLD's prompts (`study = "shakespeare_bold"`)."""
  return distillation_bold if cfg.get("study") == "shakespeare_bold" else distillation


_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "Path to a configs/distill_*.py file.",
                                          lock_config=True)

if __name__ == "__main__":
  run_app(make_main(_CONFIG, lambda cfg, **kw: _study(cfg).run(cfg, **kw),
                    lambda summary, cfg: _study(cfg).summary_table(summary),
                    "configs/distill_professions.py"),
          "trustjax/fairness/distillation.py:default_config (distillation_bold.py's for the "
          "shakespeare_bold study)")
