"""The `main` of a script that runs one `--config` file and prints a table (audit.py, bias.py),
and how every training script handles Ctrl-C."""

import os
import sys
from typing import Callable

from absl import app


def run_until_stopped(run: Callable, cfg):
  """`run(cfg, show_progress=...)`, with a progress bar on a terminal (or with TQDM_FORCE set).
  On Ctrl-C, which the training loops turn into a checkpoint after the current step and a
  KeyboardInterrupt, prints the loop's message and exits with status 130."""
  try:
    return run(cfg, show_progress=sys.stderr.isatty() or "TQDM_FORCE" in os.environ)
  except KeyboardInterrupt as e:
    print(f"\n{e or 'interrupted'}", file=sys.stderr)
    sys.exit(130)


def make_main(config_flag, run: Callable, table: Callable, example: str) -> Callable:
  """An absl `main` that runs `run(cfg, show_progress=...)` on the `--config` value, then prints
  where the results went and `table(summary, cfg)`."""

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = config_flag.value
    if cfg is None:
      raise app.UsageError(f"--config is required, e.g. --config {example}")
    summary = run_until_stopped(run, cfg)
    print(f"\nresults: {os.path.join(cfg.results_dir, cfg.run_name)}\n")
    print(table(summary, cfg))

  return main
