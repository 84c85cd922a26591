"""Where a compiled step spends its time: an XLA profile, op by op, attributed to parts of the step.

`profile(compiled, *args)` runs a compiled function under `jax.profiler.trace`, reads the trace's
events (each names the HLO instruction it ran, `hlo_op`, and its module, `hlo_module`), and joins
them with the optimized HLO (`compiled.as_text()`): each instruction's kind (matmul, reduction,
elementwise, data movement, ...) and its `op_name` metadata, the path of named scopes and
transformations that produced it. From the path, `part_of` tells the model's forward and backward
passes from the DP work, which trustjax's DP code marks with named scopes (`privacy.clipping`'s
`*_SCOPE` names: per-example norms, clipped sum, noise; and the optimizer), and `layer_of` gives the
layer (`block_0/attn/query`).

XLA merges identical computations (common-subexpression elimination): ghost clipping's second
backward recomputes the forward pass, XLA keeps one copy, and its ops carry one of the two scopes
(the clipped sum's), so that method's forward pass shows up as part of its clipped sum.

The times are XLA's own per-op spans. On a CPU, XLA runs independent ops at the same time, so the
sum of op times (`busy_ms`) can exceed the step's wall time; both are reported. Tested on the CPU,
where each event is one thunk of XLA's CPU runtime; on GPU the events are kernels with the same
`hlo_op` names. `scripts/profile_dp.py` profiles trustjax's DP step against the non-DP step.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import shutil
import tempfile
import time
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from trustjax.privacy import clipping

PARTS = ("forward", "backward", "per-example norms", "clipped sum", "per-example grads (vmap)",
         "vmap fallback", "noise", "optimizer", "other")
_SCOPED_PARTS = ((clipping.NOISE_SCOPE, "noise"), (clipping.NORMS_SCOPE, "per-example norms"),
                 (clipping.SUM_SCOPE, "clipped sum"),
                 (clipping.PER_EXAMPLE_SCOPE, "per-example grads (vmap)"),
                 (clipping.FALLBACK_SCOPE, "vmap fallback"),
                 (clipping.OPTIMIZER_SCOPE, "optimizer"))
KINDS = ("matmul", "reduction", "elementwise", "data movement", "gather/scatter", "control flow",
         "other")
_MATMUL = {"dot", "convolution"}
_MOVEMENT = {"copy", "transpose", "broadcast", "concatenate", "slice", "dynamic-slice",
             "dynamic-update-slice", "pad", "reshape", "bitcast", "reverse", "iota", "tuple",
             "get-tuple-element", "parameter", "constant", "copy-start", "copy-done"}
_CONTROL = {"while", "conditional", "call", "async-start", "async-done"}
# Scope components that are transformations or control flow, not layers.
_NOT_LAYER = re.compile(r"^(jit\(.*\)|jvp\(.*\)|transpose\(.*\)|vmap\(.*\)|cond|while|body|"
                        r"closed_call|branch_\d+_fun|remat.*|checkpoint|pjit.*)$")
_MODEL = re.compile(r"^(transpose\()?jvp\(\w+\)\)?$")


@dataclasses.dataclass(frozen=True)
class HloOp:
  """One instruction of an optimized HLO module."""
  name: str  # the instruction's name, as the profile's `hlo_op` names it
  opcode: str  # "fusion", "dot", "while", ...
  kind: str  # one of KINDS; a fusion's kind comes from the ops inside it
  op_name: str  # metadata op_name: named scopes and transformations, then the primitive


@dataclasses.dataclass(frozen=True)
class OpTime:
  """One HLO op's mean time per call of the profiled function."""
  name: str
  kind: str
  part: str  # one of PARTS
  layer: str  # module path ("block_0/attn/query"), "" when none
  op_name: str
  us: float  # microseconds per call, summed over the op's events in one call


@dataclasses.dataclass
class StepProfile:
  """A profile of `calls` calls of one compiled function."""
  wall_ms: float  # median wall time of one call, timed outside the trace
  ops: list[OpTime]  # ops that ran, longest first
  unmatched_us: float  # per call: events of the module whose hlo_op is not in the HLO text
  calls: int
  trace_file: str | None = None  # the Perfetto trace (open in ui.perfetto.dev), if kept

  @property
  def busy_ms(self) -> float:
    """Sum of the ops' times per call (can exceed wall_ms: XLA overlaps independent ops)."""
    return sum(o.us for o in self.ops) / 1e3

  def by(self, field: str) -> dict[str, float]:
    """Milliseconds per call grouped by an OpTime field ("part", "kind", "layer"), largest first."""
    out = collections.Counter()
    for o in self.ops:
      out[getattr(o, field)] += o.us / 1e3
    return dict(out.most_common())


def _split_type(rest: str) -> tuple[str, str]:
  """Splits 'TYPE opcode(...)...' where TYPE may be a parenthesised tuple with spaces."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  typ, _, tail = rest.partition(" ")
  return typ, tail


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)")


def hlo_ops(hlo_text: str) -> dict[str, HloOp]:
  """Every instruction of an optimized HLO module's text (`compiled.as_text()`), by name, with
  its kind: a fusion is a matmul if it holds a dot or convolution, else a reduction if it holds a
  reduce, else gather/scatter if it holds one, else data movement if it only moves data (copy,
  transpose, broadcast, slice, ...), else elementwise."""
  comps: dict[str, list[tuple[str, str, str, str]]] = {}
  current = None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():  # a computation's header, its closing brace, or HloModule
      m = _COMP.match(line)
      current = comps.setdefault(m.group(1), []) if m and line.rstrip().endswith("{") else None
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTR.match(line)
    if m is None or current is None:
      continue
    name, rest = m.groups()
    _, tail = _split_type(rest)
    opcode = re.match(r"[\w\-]+", tail)
    if opcode is None:
      continue
    calls = re.search(r"calls=%?([\w.\-]+)", tail)
    meta = re.search(r'op_name="([^"]*)"', tail)
    current.append((name, opcode.group(0), calls.group(1) if calls else "",
                    meta.group(1) if meta else ""))

  def kind(opcode: str, called: str, seen=()) -> str:
    if opcode in _MATMUL:
      return "matmul"
    if opcode in ("reduce", "reduce-window", "all-reduce", "reduce-scatter"):
      return "reduction"
    if opcode in ("scatter", "gather"):
      return "gather/scatter"
    if opcode in _CONTROL:
      return "control flow"
    if opcode in _MOVEMENT:
      return "data movement"
    if opcode == "fusion" and called in comps and called not in seen:
      inner = {kind(op, c, seen + (called,)) for _, op, c, _ in comps[called]}
      for k in ("matmul", "reduction", "gather/scatter", "elementwise"):
        if k in inner:
          return k
      return "data movement"
    if opcode in ("custom-call", "fusion", "rng", "rng-bit-generator", "sort", "after-all"):
      return "other"
    return "elementwise"

  ops = {}
  for instrs in comps.values():
    for name, opcode, called, op_name in instrs:
      ops[name] = HloOp(name, opcode, kind(opcode, called), op_name)
  return ops


def part_of(op_name: str) -> str:
  """The part of a training step an op belongs to, from its op_name: a DP named scope
  (`privacy.clipping`'s *_SCOPE), else "backward" under a transpose (reverse mode), "forward"
  under a jvp, else "other"."""
  comps = op_name.split("/")
  for scope, part in _SCOPED_PARTS:
    if scope in comps:
      return part
  if "transpose(" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward"
  return "other"


def layer_of(op_name: str, depth: int | None = None) -> str:
  """The module path in an op_name ("jit(step)/transpose(jvp(Model))/block_0/mlp_in/dot_general"
  -> "block_0/mlp_in"): the components after the model's jvp (or after a DP scope), without
  transformations, control flow and the final primitive; `depth` keeps the first components.
  "" for the noise, the optimizer and unscoped ops, which belong to no layer."""
  if part_of(op_name) in ("noise", "optimizer", "other"):  # not a layer's work
    return ""
  comps = op_name.split("/")[:-1]  # the last component is the primitive
  start = 0
  for i, c in enumerate(comps):
    if _MODEL.match(c) or c in {s for s, _ in _SCOPED_PARTS}:
      start = i + 1
  names = [c for c in comps[start:] if not _NOT_LAYER.match(c) and re.match(r"^[A-Za-z_]\w*$", c)]
  if depth is not None:
    names = names[:depth]
  return "/".join(names)


def read_trace(path: str) -> list[dict]:
  """The complete events ("ph": "X") of a Chrome/Perfetto JSON trace (gzipped or not)."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  return [e for e in events if e.get("ph") == "X"]


def op_times(events: Sequence[dict], module: str) -> tuple[dict[str, float], int]:
  """Total microseconds per `hlo_op` over the events of HLO module `module`, and the number of
  distinct executions (`run_id`s) they came from. When the module ran on several devices (a
  sharded step), only the lowest device ordinal's events count: the times are one device's."""
  mine = [e for e in events
          if (e.get("args") or {}).get("hlo_module") == module and "hlo_op" in e["args"]]
  ordinal = lambda e: str(e["args"].get("device_ordinal", ""))
  first = min((ordinal(e) for e in mine), key=lambda o: (len(o), o), default="")  # "2" < "10"
  total = collections.Counter()
  runs = set()
  for e in mine:
    if ordinal(e) == first:
      total[e["args"]["hlo_op"]] += float(e["dur"])
      runs.add(e["args"].get("run_id"))
  return dict(total), len(runs)


def module_name(hlo_text: str) -> str:
  m = re.search(r"^HloModule\s+([\w.\-]+)", hlo_text, re.M)
  if m is None:
    raise ValueError("no 'HloModule <name>' line in the HLO text")
  return m.group(1)


def profile(compiled: Callable, *args, calls: int = 5, warmup: int = 2,
            trace_dir: str | None = None, layer_depth: int | None = None,
            wall_ms: float | None = None) -> StepProfile:
  """Profiles `calls` calls of `compiled(*args)`, a `jax.stages.Compiled` (from
  `jax.jit(f).lower(*args).compile()`), after `warmup` calls.

  The wall time is `wall_ms` when the caller measured it (`profile_steps` times its steps
  interleaved), else the median of `calls` timed calls outside the trace. Control-flow ops
  (while, conditional, call) are left out of the op times, since the ops they run are traced on
  their own. With `trace_dir`, the Perfetto trace is kept there as `trace.json.gz`.
  """
  if calls < 1:
    raise ValueError(f"calls must be >= 1, got {calls=}")
  text = compiled.as_text()
  module = module_name(text)
  ops = hlo_ops(text)
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  if wall_ms is None:
    wall = []
    for _ in range(calls):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      wall.append(time.perf_counter() - t0)
    wall_ms = float(np.median(wall)) * 1e3
  tmp = tempfile.mkdtemp(prefix="trustjax_profile_")
  try:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(compiled(*args))
    found = sorted(glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not found:
      raise RuntimeError(f"jax.profiler.trace wrote no Perfetto trace under {tmp}")
    events = read_trace(found[-1])
    kept = None
    if trace_dir is not None:
      os.makedirs(trace_dir, exist_ok=True)
      kept = os.path.join(trace_dir, "trace.json.gz")
      shutil.copyfile(found[-1], kept)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  totals, runs = op_times(events, module)
  if runs == 0:
    raise RuntimeError(f"the trace holds no op events of module {module!r}")
  out, unmatched = [], 0.0
  for name, us in totals.items():
    op = ops.get(name)
    if op is None:
      unmatched += us
      continue
    if op.kind == "control flow":
      continue
    out.append(OpTime(name, op.kind, part_of(op.op_name), layer_of(op.op_name, layer_depth),
                      op.op_name, us / runs))
  out.sort(key=lambda o: -o.us)
  return StepProfile(wall_ms=wall_ms, ops=out, unmatched_us=unmatched / runs,
                     calls=runs, trace_file=kept)


def compare(profiles: Mapping[str, StepProfile], field: str = "part",
            order: Sequence[str] | None = None) -> tuple[list[str], list[list]]:
  """A table (header, rows) of milliseconds per call grouped by `field`, one column per profile,
  then the busy total and the wall time. Groups in `order` first (those that occur), then the
  rest by their largest time."""
  names = list(profiles)
  grouped = {n: p.by(field) for n, p in profiles.items()}
  keys = [k for k in (order or ()) if any(k in g for g in grouped.values())]
  rest = collections.Counter()
  for g in grouped.values():
    for k, v in g.items():
      if k not in keys:
        rest[k] = max(rest[k], v)
  keys += [k for k, _ in rest.most_common()]
  rows = [[k or "(none)"] + [grouped[n].get(k, 0.0) for n in names] for k in keys]
  rows.append(["sum of op times"] + [profiles[n].busy_ms for n in names])
  rows.append(["wall time (median)"] + [profiles[n].wall_ms for n in names])
  return [field] + [f"{n} ms" for n in names], rows


def layer_excess(profiles: Mapping[str, StepProfile], base: str, top: int = 12,
                 depth: int = 2) -> tuple[list[str], list[list]]:
  """A table (header, rows) of the DP parts' milliseconds per (layer, part), one column per
  profile other than `base`, largest first: where each DP method's extra work goes."""
  dp_parts = set(PARTS) - {"forward", "backward", "optimizer", "other"}
  others = [n for n in profiles if n != base]
  totals = {n: collections.Counter() for n in others}
  for n in others:
    for o in profiles[n].ops:
      if o.part in dp_parts:
        totals[n][("/".join(o.layer.split("/")[:depth]) or "(none)", o.part)] += o.us / 1e3
  keys = collections.Counter()
  for n in others:
    for k, v in totals[n].items():
      keys[k] = max(keys[k], v)
  rows = [[layer, part] + [totals[n].get((layer, part), 0.0) for n in others]
          for (layer, part), _ in keys.most_common(top)]
  return ["layer", "DP part"] + [f"{n} ms" for n in others], rows


def plot_parts(profiles: Mapping[str, StepProfile], path: str) -> None:
  """Stacked horizontal bars: each profile's op time by part, with its wall time marked."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from trustjax import reporting  # pylint: disable=import-outside-toplevel
  names = list(profiles)
  by_part = {n: profiles[n].by("part") for n in names}
  fig, ax = plt.subplots(figsize=(8.5, 1.2 + 0.6 * len(names)))
  left = [0.0] * len(names)
  cmap = plt.get_cmap("tab10")
  for i, part in enumerate(PARTS):
    widths = [by_part[n].get(part, 0.0) for n in names]
    if not any(widths):
      continue
    ax.barh(names, widths, left=left, color=cmap(i % 10), label=part)
    left = [l + w for l, w in zip(left, widths)]
  ax.scatter([profiles[n].wall_ms for n in names], names, marker="|", s=300, color="black",
             label="wall time", zorder=3)
  ax.set_xlabel("ms per step (sum of XLA op times)")
  ax.invert_yaxis()
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  reporting.save_figure(fig, path)


def write_report(profiles: Mapping[str, StepProfile], folder: str, *, title: str,
                 base: str | None = None, top: int = 12) -> str:
  """Writes `folder`/report.md (tables by part and by kind; with `base`, the other profiles'
  DP parts by layer), ops.csv (every op of every profile) and parts.png; returns the tables as
  Markdown."""
  import csv  # pylint: disable=import-outside-toplevel
  from trustjax import reporting  # pylint: disable=import-outside-toplevel
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "ops.csv"), "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["step", "op", "kind", "part", "layer", "us_per_call", "op_name"])
    for label, p in profiles.items():
      for o in p.ops:
        w.writerow([label, o.name, o.kind, o.part, o.layer, f"{o.us:.1f}", o.op_name])
  plot_parts(profiles, os.path.join(folder, "parts.png"))
  unmatched = max(p.unmatched_us for p in profiles.values()) / 1e3
  calls = min(p.calls for p in profiles.values())
  body = (f"{title}; {calls} traced calls per step. Milliseconds per step; the op times are "
          f"XLA's per-op spans, which overlap on a multi-core CPU, so their sum can exceed the "
          f"wall time (the interleaved median of untraced calls). Largest time in trace events "
          f"that matched no HLO op: {unmatched:.3f} ms.\n\nBy part of the step:\n\n"
          f"{reporting.markdown_table(*compare(profiles, 'part', PARTS))}\n\n"
          f"By kind of op:\n\n{reporting.markdown_table(*compare(profiles, 'kind', KINDS))}")
  if base is not None and len(profiles) > 1:
    body += (f"\n\nThe DP parts by layer (largest first):\n\n"
             f"{reporting.markdown_table(*layer_excess(profiles, base, top))}")
  with open(os.path.join(folder, "report.md"), "w", encoding="utf-8") as f:
    f.write(f"# Step profile\n\n{body}\n\n![op time by part](parts.png)\n")
  return body


def profile_steps(steps: Mapping[str, Callable], args: Sequence, *, calls: int = 5,
                  folder: str | None = None) -> dict[str, StepProfile]:
  """Profiles several jitted steps on the same arguments (e.g. {"non-DP": ..., "bookkeeping":
  ...}): compiles each, times them interleaved (the wall times, before any tracing), then traces
  each in turn; with `folder`, each trace is kept under folder/traces/<label>/."""
  from trustjax import training  # pylint: disable=import-outside-toplevel
  compiled = {k: s.lower(*args).compile() for k, s in steps.items()}
  wall = training.time_interleaved({k: (lambda c=c: c(*args)) for k, c in compiled.items()},
                                   repeats=max(calls, 5))
  trace_dir = lambda label: None if folder is None else os.path.join(folder, "traces", label)
  return {label: profile(c, *args, calls=calls, wall_ms=wall[label] * 1e3,
                         trace_dir=trace_dir(label))
          for label, c in compiled.items()}
