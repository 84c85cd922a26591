"""The `main` of a script that runs one `--config` file and prints a table (audit.py, bias.py),
how every training script handles Ctrl-C, and how every config script reports a config field
that does not exist."""

import os
import sys
from typing import Callable

from absl import app, flags, logging


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
    logging.set_verbosity(logging.WARNING)  # as train.py and federated.py: no INFO lines
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = config_flag.value
    if cfg is None:
      raise app.UsageError(f"--config is required, e.g. --config {example}")
    summary = run_until_stopped(run, cfg)
    print(f"\nresults: {os.path.join(cfg.results_dir, cfg.run_name)}\n")
    print(table(summary, cfg))

  return main


def run_app(main: Callable, defaults: str) -> None:
  """`app.run(main)`, where a `--config.<path>` override naming a field the config does not have
  is reported in one line (the argument, the field, ml_collections' "did you mean" and where the
  fields are listed) with exit status 1, as absl reports a bad flag value, instead of the
  traceback ml_collections raises from inside flag parsing. `defaults`: where the config's fields
  and their defaults are defined."""
  try:
    app.run(main)
  except (AttributeError, KeyError) as e:
    if flags.FLAGS.is_parsed():  # raised by main, not by flag parsing
      raise
    detail = e
    while isinstance(detail, BaseException) and detail.args:  # AttributeError(KeyError(msg))
      detail = detail.args[0]
    detail = str(detail)
    name, _, hint = detail.partition("\n")
    name = name.strip("'\"")
    given = [a for a in sys.argv[1:] if a.startswith("--config.")
             and name in a.split("=", 1)[0].split(".")[1:]]
    where = f"{given[0]}: " if given else ""
    print(f"FATAL Flags parsing error: {where}the config has no field {name!r}. "
          f"{hint + ' ' if hint else ''}All fields and their defaults: {defaults}",
          file=sys.stderr)
    sys.exit(1)
