"""trustjax.profiling: HLO parsing, trace parsing, attribution to parts and layers, and a real
profile of DP steps; scripts/profile_dp.py end to end."""

import gzip
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.conftest import REPO
from trustjax import models, profiling, training
from trustjax.privacy import DPConfig

# A hand-written optimized-HLO module in XLA's text format: a fusion holding a dot, a fusion
# holding only a transpose, an elementwise fusion, a reduce, a while loop, a tuple-typed
# instruction and a header with an /*index=*/ comment.
_HLO = """HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[4,8]{1,0})->f32[]}

%fused_dot (param_0: f32[4,8], param_1: f32[8,3]) -> f32[4,3] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  %param_1 = f32[8,3]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,3]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_transpose (param_0.1: f32[4,3]) -> f32[3,4] {
  %param_0.1 = f32[4,3]{1,0} parameter(0)
  ROOT %transpose.2 = f32[3,4]{0,1} transpose(%param_0.1), dimensions={1,0}
}

%fused_tanh (param_0.2: f32[3,4], /*index=1*/param_1.2: f32[]) -> f32[3,4] {
  %param_0.2 = f32[3,4]{1,0} parameter(0)
  %param_1.2 = f32[] parameter(1)
  %broadcast.3 = f32[3,4]{1,0} broadcast(%param_1.2), dimensions={}
  %multiply.4 = f32[3,4]{1,0} multiply(%param_0.2, %broadcast.3)
  ROOT %tanh.5 = f32[3,4]{1,0} tanh(%multiply.4)
}

%body (p: (s32[], f32[3,4])) -> (s32[], f32[3,4]) {
  %p = (s32[], f32[3,4]{1,0}) parameter(0)
  ROOT %t = (s32[], f32[3,4]{1,0}) tuple(%p)
}

%region_0.7 (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.8 = f32[] add(%a, %b)
}

ENTRY %main.9 (Arg_0.1: f32[4,8], w: f32[8,3]) -> f32[] {
  %Arg_0.1 = f32[4,8]{1,0} parameter(0)
  %w = f32[8,3]{1,0} parameter(1)
  %mm = f32[4,3]{1,0} fusion(%Arg_0.1, %w), kind=kOutput, calls=%fused_dot, metadata={op_name="jit(step)/transpose(jvp(Model))/block_0/mlp_in/dot_general" source_file="x.py"}
  %tr = f32[3,4]{1,0} fusion(%mm), kind=kLoop, calls=%fused_transpose, metadata={op_name="jit(step)/jvp(Model)/block_0/attn/transpose"}
  %c = f32[] constant(2)
  %act = f32[3,4]{1,0} fusion(%tr, %c), kind=kLoop, calls=%fused_tanh, metadata={op_name="jit(step)/dp_noise/cond/branch_1_fun/tanh"}
  %loop = (s32[], f32[3,4]{1,0}) while((s32[], f32[3,4]{1,0}) %act), condition=%body, body=%body
  ROOT %sum = f32[] reduce(%act, %c), dimensions={0,1}, to_apply=%region_0.7, metadata={op_name="jit(step)/optimizer/reduce_sum"}
}
"""


def test_hlo_ops_kinds_and_metadata_on_handwritten_module():
  ops = profiling.hlo_ops(_HLO)
  assert profiling.module_name(_HLO) == "jit_step"
  assert ops["mm"].kind == "matmul" and ops["mm"].opcode == "fusion"
  assert ops["mm"].op_name == "jit(step)/transpose(jvp(Model))/block_0/mlp_in/dot_general"
  assert ops["tr"].kind == "data movement"
  assert ops["act"].kind == "elementwise"
  assert ops["loop"].kind == "control flow" and ops["loop"].opcode == "while"
  assert ops["sum"].kind == "reduction" and ops["sum"].op_name.endswith("optimizer/reduce_sum")
  assert ops["t"].opcode == "tuple"  # a tuple-typed instruction inside a computation
  assert ops["dot.1"].kind == "matmul"  # instructions inside fused computations are listed too
  with pytest.raises(ValueError, match="HloModule"):
    profiling.module_name("ENTRY %main {}")


def test_hlo_ops_on_a_compiled_function():
  def f(x, w):
    with jax.named_scope("layer_a"):
      y = jnp.tanh(x @ w)
    return (y * 2.0).sum(axis=1)

  x, w = jnp.ones((16, 32)), jnp.ones((32, 8))
  ops = profiling.hlo_ops(jax.jit(f).lower(x, w).compile().as_text())
  scoped = [o for o in ops.values() if "layer_a" in o.op_name]
  assert any(o.kind == "matmul" for o in scoped)
  assert any(o.kind == "reduction" for o in ops.values())


@pytest.mark.parametrize("op_name, part, layer", [
    ("jit(step)/jvp(TransformerClassifier)/block_1/mlp_in/dot_general", "forward",
     "block_1/mlp_in"),
    ("jit(step)/transpose(jvp(TransformerClassifier))/block_0/attn/...qhd,...khd->...hqk/"
     "dot_general", "backward", "block_0/attn"),
    ("jit(step)/dp_norms/block_0/mlp_out/bts,bts->b/dot_general", "per-example norms",
     "block_0/mlp_out"),
    ("jit(step)/dp_clipped_sum/block_1/mlp_in/bti,bto->io/dot_general", "clipped sum",
     "block_1/mlp_in"),
    ("jit(step)/dp_noise/cond/branch_0_fun/cond/branch_1_fun/jit(_where)/select_n", "noise", ""),
    ("jit(step)/optimizer/mul", "optimizer", ""),
    ("jit(step)/dp_per_example_grads/vmap(transpose(jvp(TransformerClassifier)))/block_0/attn/"
     "query/dot_general", "per-example grads (vmap)", "block_0/attn/query"),
    ("jit(step)/jvp(TransformerClassifier)/block_0/attn/jit(_where)/select_n", "forward",
     "block_0/attn"),
    ("jit(step)/jit(_threefry_fold_in)/make_train_step.<locals>.step/while/body/add", "other",
     ""),
    ("", "other", ""),
])
def test_part_and_layer_of_op_names(op_name, part, layer):
  assert profiling.part_of(op_name) == part
  assert profiling.layer_of(op_name) == layer


def test_layer_depth():
  name = "jit(step)/jvp(M)/block_0/attn/query/dot_general"
  assert profiling.layer_of(name, depth=2) == "block_0/attn"
  assert profiling.layer_of(name, depth=1) == "block_0"


def test_read_trace_and_op_times(tmp_path):
  events = [
      {"ph": "M", "name": "thread_name", "args": {"name": "python"}},
      {"ph": "X", "name": "dot.1", "dur": 10.0, "args": {"hlo_module": "jit_step",
                                                         "hlo_op": "dot.1", "run_id": "1"}},
      {"ph": "X", "name": "dot.1", "dur": 14.0, "args": {"hlo_module": "jit_step",
                                                         "hlo_op": "dot.1", "run_id": "2"}},
      {"ph": "X", "name": "add.2", "dur": 3.0, "args": {"hlo_module": "jit_step",
                                                        "hlo_op": "add.2", "run_id": "2"}},
      {"ph": "X", "name": "dot.1", "dur": 99.0, "args": {"hlo_module": "jit_other",
                                                         "hlo_op": "dot.1", "run_id": "3"}},
      {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 50.0},
  ]
  path = tmp_path / "t.trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  read = profiling.read_trace(str(path))
  assert len(read) == 5  # the complete ("X") events only
  totals, runs = profiling.op_times(read, "jit_step")
  assert totals == {"dot.1": 24.0, "add.2": 3.0} and runs == 2
  # A sharded step: only the lowest device ordinal counts ("2" before "10").
  sharded = [{"ph": "X", "dur": d, "args": {"hlo_module": "m", "hlo_op": "dot.1", "run_id": "1",
                                            "device_ordinal": o}}
             for d, o in ((5.0, "10"), (7.0, "2"), (9.0, "2"), (11.0, "3"))]
  assert profiling.op_times(sharded, "m") == ({"dot.1": 16.0}, 1)


def test_compare_table():
  ops = lambda *rows: [profiling.OpTime(f"op{i}", k, p, "", "", us)
                       for i, (k, p, us) in enumerate(rows)]
  a = profiling.StepProfile(10.0, ops(("matmul", "forward", 4000.0),
                                      ("matmul", "backward", 5000.0)), 0.0, 3)
  b = profiling.StepProfile(12.0, ops(("matmul", "forward", 4000.0),
                                      ("elementwise", "noise", 2000.0),
                                      ("matmul", "per-example norms", 3000.0)), 0.0, 3)
  header, rows = profiling.compare({"non-DP": a, "DP": b}, "part", profiling.PARTS)
  assert header == ["part", "non-DP ms", "DP ms"]
  assert [r[0] for r in rows] == ["forward", "backward", "per-example norms", "noise",
                                  "sum of op times", "wall time (median)"]
  assert rows[1][1:] == [5.0, 0.0] and rows[3][1:] == [0.0, 2.0]
  assert rows[-2][1:] == [9.0, 9.0] and rows[-1][1:] == [10.0, 12.0]
  assert b.by("kind") == {"matmul": 7.0, "elementwise": 2.0}


def test_profile_of_one_matmul_matches_its_wall_time():
  """The only op of a big matmul takes about the call's wall time, timed independently.

  A timing comparison on a shared machine: under the parallel test workers, the traced calls
  and the timed ones can land on different loads (CI once saw 2.29x), so up to three
  measurements are taken and one must fall within [0.3, 2.0]. The trace arithmetic itself
  (per-op sums, runs, devices) is checked exactly on written events above; this test checks
  the units and that the trace times the real calls."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(768, 768)), jnp.float32)
  compiled = jax.jit(lambda a: a @ a).lower(x).compile()
  ratios = []
  for _ in range(3):
    p = profiling.profile(compiled, x, calls=5)
    assert p.calls == 5 and p.unmatched_us == 0.0
    dots = [o for o in p.ops if o.kind == "matmul"]
    assert len(dots) == 1
    walls = []
    for _ in range(7):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(x))
      walls.append(time.perf_counter() - t0)
    ratios.append(dots[0].us / 1e6 / np.median(walls))
    if 0.3 < ratios[-1] < 2.0:
      break
  assert 0.3 < ratios[-1] < 2.0, ratios


def _tiny():
  model = models.BagOfEmbeddings(vocab_size=50, num_classes=2, embed_dim=8, hidden_dim=8)
  rng = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(rng.integers(1, 50, (4, 8)), jnp.int32),
           "label": jnp.asarray(rng.integers(0, 2, 4), jnp.int32),
           "mask": jnp.asarray([True, True, True, False])}
  params = model.init(jax.random.key(0), batch["tokens"][:1])["params"]
  return models.classification_loss(model), params, batch


@pytest.mark.parametrize("method, dp_parts", [
    (None, set()),
    ("bookkeeping", {"per-example norms", "clipped sum", "noise"}),
    ("ghost", {"per-example norms", "clipped sum", "noise"}),
    ("vmap", {"per-example grads (vmap)", "clipped sum", "noise"}),
])
def test_profile_attributes_a_train_step(method, dp_parts):
  loss_fn, params, batch = _tiny()
  opt = optax.adam(1e-3)
  state = training.create_state(params, opt, jax.random.key(1))
  cfg = None if method is None else DPConfig(l2_clip=1.0, noise_multiplier=1.0,
                                             sampling_rate=0.1, num_examples=40,
                                             max_batch_size=4, method=method)
  compiled = training.make_train_step(loss_fn, opt, cfg, donate=False).lower(
      state, batch).compile()
  p = profiling.profile(compiled, state, batch, calls=2)
  assert p.calls == 2 and p.unmatched_us == 0.0 and p.busy_ms > 0 and p.wall_ms > 0
  parts = set(p.by("part"))
  all_dp = {"per-example norms", "clipped sum", "noise", "per-example grads (vmap)",
            "vmap fallback"}
  assert parts & all_dp == dp_parts
  assert "optimizer" in parts
  if method != "vmap":  # vmap's backward passes are its per-example gradients
    assert "backward" in parts
  if method in (None, "bookkeeping"):  # ghost's forward is merged into its second backward
    assert "forward" in parts
  # Every layer's work is found under its module name; noise and optimizer under none.
  assert set(p.by("layer")) == {"", "embed", "hidden", "out"}
  if method in ("bookkeeping", "ghost"):
    assert {o.layer for o in p.ops if o.part == "per-example norms"} >= {"embed", "hidden", "out"}
  assert {o.layer for o in p.ops if o.part in ("noise", "optimizer")} <= {""}
  assert sum(p.by("kind").values()) == pytest.approx(p.busy_ms)


def test_profile_rejects_zero_calls():
  x = jnp.ones((2, 2))
  with pytest.raises(ValueError, match="calls"):
    profiling.profile(jax.jit(lambda a: a + 1).lower(x).compile(), x, calls=0)


def _script(*args, cwd):
  return subprocess.run([sys.executable, str(REPO / "scripts" / "profile_dp.py"), *args],
                        capture_output=True, text=True, cwd=cwd, check=False, timeout=600)


def test_profile_dp_script_end_to_end(tmp_path):
  out = _script("--case", "mlp", "--methods", "bookkeeping", "--calls", "2", "--out",
                str(tmp_path), cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]
  (run,) = list(tmp_path.iterdir())
  report = (run / "report.md").read_text()
  for row in ("| forward |", "| per-example norms |", "| clipped sum |", "| noise |",
              "| wall time (median) |", "| matmul |"):
    assert row in report
  lines = (run / "ops.csv").read_text().splitlines()
  steps = {line.split(",")[0] for line in lines[1:]}
  assert steps == {"non-DP", "bookkeeping"}
  assert (run / "traces" / "non-DP" / "trace.json.gz").exists()
  assert (run / "traces" / "bookkeeping" / "trace.json.gz").exists()
  assert (run / "parts.png").stat().st_size > 0
  assert not (REPO / "results" / "profile_dp" / run.name).exists()


def test_profile_dp_script_bad_arguments(tmp_path):
  out = _script("--case", "nope", cwd=tmp_path)
  assert out.returncode == 2 and "unknown --case 'nope'" in out.stderr
  out = _script("--methods", "fast", cwd=tmp_path)
  assert out.returncode == 2 and "--methods" in out.stderr


def test_named_scopes_leave_the_compiled_step_unchanged(monkeypatch):
  """The DP code's named scopes are metadata: without them the optimized HLO is the same, but
  for op metadata and source locations."""
  import contextlib  # pylint: disable=import-outside-toplevel
  import re  # pylint: disable=import-outside-toplevel

  loss_fn, params, batch = _tiny()
  opt = optax.adam(1e-3)
  state = training.create_state(params, opt, jax.random.key(1))
  cfg = DPConfig(l2_clip=1.0, noise_multiplier=1.0, sampling_rate=0.1, num_examples=40,
                 max_batch_size=4, method="bookkeeping")

  def hlo():
    return training.make_train_step(loss_fn, opt, cfg, donate=False).lower(
        state, batch).compile().as_text()

  def computation(text):
    text = re.sub(r", metadata=\{[^}]*\}", "", text)
    return [line for line in text.splitlines() if "file_name_id" not in line]

  scoped = hlo()
  assert "dp_norms" in scoped and "dp_clipped_sum" in scoped and "dp_noise" in scoped
  monkeypatch.setattr(jax, "named_scope", lambda name: contextlib.nullcontext())
  plain = hlo()
  assert "dp_norms" not in plain
  assert computation(plain) == computation(scoped)
