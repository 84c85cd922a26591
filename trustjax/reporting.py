"""Metrics sinks: JSON lines, Markdown reports, training-curve plots and progress bars."""

from __future__ import annotations

import json
import math
import os
import re
from typing import Iterable, Sequence

import tqdm


def _clean(v):
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


class MetricsWriter:
  """Appends one JSON object per line to `path`; each record has a "step"."""

  def __init__(self, path: str):
    self.path = path

  def write(self, record: dict) -> None:
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

  def read(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    with open(self.path, encoding="utf-8") as f:
      return [json.loads(line) for line in f if line.strip()]

  def truncate_after(self, step: int) -> None:
    """Drops records with step > `step` (used when resuming from a checkpoint at `step`)."""
    kept = [r for r in self.read() if r.get("step", 0) <= step]
    with open(self.path, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)


def write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_clean)
  os.replace(tmp, path)


def read_summary(run: str, key: str, missing: str) -> dict:
  """The summary.json of run folder `run`, which must hold `key` (else ValueError: "`run` has
  no `missing`")."""
  path = os.path.join(run, "summary.json")
  if not os.path.exists(path):
    raise ValueError(f"no summary.json in {run!r}")
  with open(path, encoding="utf-8") as f:
    summary = json.load(f)
  if key not in summary:
    raise ValueError(f"{run!r} has no {missing}")
  return summary


def start_run(cfg) -> str:
  """Creates `<cfg.results_dir>/<cfg.run_name>/plots` and writes the config there as
  config.json; returns the run folder. For the studies that do not resume (bias, distillation)."""
  workdir = os.path.join(cfg.results_dir, cfg.run_name)
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  write_json(os.path.join(workdir, "config.json"), cfg.to_dict())
  return workdir


def _plain(v):
  """A JSON-ready copy: numpy scalars and arrays become Python numbers and lists (NaN and inf
  stay floats, which Python's json writes and reads back)."""
  if isinstance(v, dict):
    return {str(k): _plain(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_plain(x) for x in v]
  if hasattr(v, "tolist"):
    return _plain(v.tolist())
  return v


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def config_changes(path: str, cfg, allowed=(), defaults=None) -> list[str]:
  """The dotted fields whose value in `cfg` differs from the config stored at `path`
  (a run's config.json), compared as stored (tuples read back as lists), except `allowed`.
  With `defaults`, a field the stored config lacks (added to the code after the run began)
  counts as unchanged when `cfg` keeps its default value, which is what the run used."""
  with open(path, encoding="utf-8") as f:
    old = _flatten(json.load(f))
  new = _flatten(json.loads(cfg.to_json_best_effort()))
  default = {} if defaults is None else _flatten(json.loads(defaults.to_json_best_effort()))
  return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in allowed
                and not (k not in old and k in default and new.get(k) == default[k]))


def start_resumable_run(cfg, may_change: Sequence[str] = ("seeds",)) -> str:
  """`start_run` for a study whose finished parts are kept (`cached`): a folder that holds a
  run of a config differing (`config_changes`) in any field but `may_change` and `results_dir`
  is refused (its parts would not belong to this config), naming the fields."""
  workdir = os.path.join(cfg.results_dir, cfg.run_name)
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    changed = config_changes(path, cfg, allowed=("results_dir", *may_change))
    if changed:
      raise ValueError(f"{workdir} holds a study with a different config ({', '.join(changed)}); "
                       f"a rerun may change only {', '.join(may_change)} (pick another run_name)")
  return start_run(cfg)


def cached(workdir: str, name: str, compute) -> dict:
  """`compute()`'s result (a dict of numbers, strings, lists and dicts), kept in
  `workdir/parts/<name>.json` once computed and read from there afterwards, so that a study
  stopped part-way resumes after its last finished part. The study always continues from the
  JSON form, so a resumed study computes what an uninterrupted one does."""
  path = os.path.join(workdir, "parts", f"{name}.json")
  if not os.path.exists(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(_plain(compute()), f)
    os.replace(tmp, path)
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def save_figure(fig, path: str) -> None:
  """Lays out, writes (110 dpi) and closes a matplotlib figure."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def mean_sd_cell(record: dict, key: str, runs: int) -> str:
  """A table cell for a mean over `runs` runs and its sample sd (`key`, `key + "_sd"` as
  `stats.mean_and_sd` writes them): "m +- sd", just "m" for one run (no sd to show), "-" when
  the record lacks the key."""
  if key not in record:
    return "-"
  return f"{record[key]:.3f}" + (f" +- {record[key + '_sd']:.3f}" if runs > 1 else "")


def seeds_note(seeds: Sequence) -> str:
  """How a report describes its cells: means over the seeds with their sample sd, or one seed."""
  return (f"means over seeds {list(seeds)} (+- sample sd)" if len(seeds) > 1
          else f"one seed ({list(seeds)[0]}), so no spread")


def over_seeds(seeds: Sequence) -> str:
  """A heading's suffix for values averaged over the seeds: " (mean over seeds)", or nothing
  for one seed."""
  return " (mean over seeds)" if len(seeds) > 1 else ""


def plot_curves(records: Sequence[dict], path: str, *, x: str = "step",
                panels: Sequence[tuple[str, Sequence[str]]] = ()) -> None:
  """One panel per (title, keys) with a line per key present in the records."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
  for ax, (title, keys) in zip(axes[0], panels):
    for key in keys:
      pts = [(r[x], r[key]) for r in records if key in r and isinstance(r[key], (int, float))]
      if pts:
        ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, label=key)
    ax.set_title(title)
    ax.set_xlabel(x)
    ax.grid(alpha=0.3)
    ax.legend()
  save_figure(fig, path)


def progress(total: int, initial: int = 0, desc: str = "train") -> tqdm.tqdm:
  """A tqdm bar (to stderr; updated at most every 0.5 s)."""
  return tqdm.tqdm(total=total, initial=initial, desc=desc, mininterval=0.5, dynamic_ncols=True)


def measured(command: str) -> str:
  """"Measured <date> on <machine> (<cores> CPU cores, backend, jax version) with `command`": the
  first words of every benchmark table in BENCHMARKS.md."""
  import datetime  # pylint: disable=import-outside-toplevel
  import platform  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  return (f"Measured {datetime.date.today()} on {platform.machine()} ({os.cpu_count()} CPU "
          f"cores, backend {jax.default_backend()}, jax {jax.__version__}) with `{command}`")


# The repository's benchmark record, which every scripts/benchmark_*.py writes its table into.
BENCHMARKS_MD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "BENCHMARKS.md")


def write_marked_block(path: str, name: str, title: str, body: str) -> None:
  """Replaces the text between `<!-- {name}:begin -->` and `<!-- {name}:end -->` in the Markdown
  file `path` with `body` (appending a `## {title}` section with the markers if absent)."""
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  block = f"{begin}\n{body}\n{end}"
  text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
  if begin in text:
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
  else:
    text = text.rstrip() + f"\n\n## {title}\n\n" + block + "\n"
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
