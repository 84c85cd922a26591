"""Train a text classifier, with or without DP, from a config file.

  python scripts/train.py --config configs/dp_intents.py [--config.train.epochs=2 ...]

Writes results/<run_name>/: config.json, tokenizer.json, metrics.jsonl, report.md, summary.json,
plots/training.png, checkpoints/ (a rerun with the same run_name resumes from the last one).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, logging  # pylint: disable=g-import-not-at-top
from config_main import run_app, run_until_stopped
from ml_collections import config_flags

from trustjax import experiments

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                          lock_config=True)


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = _CONFIG.value
  if cfg is None:
    raise app.UsageError("--config is required, e.g. --config configs/dp_intents.py")
  summary = run_until_stopped(experiments.run, cfg)  # Ctrl-C: a checkpoint, then exit 130
  out = os.path.join(cfg.train.results_dir, cfg.train.run_name)
  print(f"\nresults: {out}")
  print(f"eval accuracy: {summary['eval_accuracy']:.4f}  ({summary['eval_examples']} examples)")
  if "epsilon" in summary:
    how = {"dp_sgd": lambda: f"q = {summary['sampling_rate']:.4g}",
           "dp_ftrl": lambda: f"DP-FTRL, {summary['trees']} tree"
                              f"{'s' * (summary['trees'] != 1)} of {summary['steps_per_tree']} "
                              f"steps, batch {summary['batch_size']}, replace-with-zero neighbours",
           "dp_mf": lambda: f"DP-MF, {summary['bands']} band{'s' * (summary['bands'] != 1)}, "
                            f"sensitivity "
                            f"{summary['sensitivity']:.3f}, epochs of {summary['steps_per_epoch']}"
                            f" steps, batch {summary['batch_size']}, replace-with-zero neighbours",
           "amplified_mf": lambda: f"amplified MF, {summary['bands']} band"
                                   f"{'s' * (summary['bands'] != 1)} and groups, q = "
                                   f"{summary['sampling_rate']:.4g} in a group, "
                                   f"{summary['participations']} participations at sigma / "
                                   f"{summary['column_norm']:.3f}",
           }[summary["mechanism"]]()
    print(f"privacy: epsilon = {summary['epsilon']:.3f} at delta = {summary['delta_total']:.3g} "
          f"({summary['accountant'].upper()}, sigma = {summary['noise_multiplier']:.4f}, {how}, "
          f"{summary['steps']} steps)")
  if "canary_exposure" in summary:
    print(f"canary exposure (bits; at most {summary['canary_exposure_max']:.1f}, "
          f"{summary['canary_exposure_chance']:.2f} by chance): " + ", ".join(
              f"inserted {k[1:]}x {v:.2f}" for k, v in summary["canary_exposure"].items()))
  if "canary_extracted" in summary:
    print("extracted by beam search (fraction in the final beam): " + ", ".join(
        f"inserted {k[1:]}x {v:.0%}" for k, v in summary["canary_extracted"].items()))
  if "canary_exposure_bound" in summary:
    print("what the guarantee allows (group epsilon; bound on the mean exposure; on P(rank 1)): "
          + ", ".join(f"{k[1:]}x {e:.4g}; {summary['canary_exposure_bound'][k]:.2f}; "
                      f"{summary['canary_rank_one_bound'][k]:.3g}"
                      for k, e in summary["canary_group_epsilon"].items()))
  if "dp_step_s" in summary:
    print(f"step time: DP {summary['dp_step_s'] * 1e3:.1f} ms vs non-DP "
          f"{summary['nondp_step_s'] * 1e3:.1f} ms  (x{summary['dp_over_nondp']:.2f})")


if __name__ == "__main__":
  run_app(main, "trustjax/experiments.py:default_config")
