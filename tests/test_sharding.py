"""sharding.one_cpu_device_per_core, in fresh processes (XLA reads the flag when JAX starts), and
sharding.replicated_mesh."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tests.conftest import REPO
from trustjax import sharding

_PROBE = ("import os, jax; from trustjax import sharding; sharding.one_cpu_device_per_core(); "
          "print(jax.device_count(), os.environ['XLA_FLAGS'])")


def _run(xla_flags):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=REPO,
                       env=env, timeout=300, check=True).stdout.split()
  return int(out[0]), out[1:]


@pytest.mark.parametrize("xla_flags", [None, "--xla_cpu_enable_fast_math=false"])
def test_one_device_per_usable_core_other_flags_kept(xla_flags):
  count, flags = _run(xla_flags)
  assert count == len(os.sched_getaffinity(0))
  assert f"--xla_force_host_platform_device_count={count}" in flags
  if xla_flags is not None:
    assert xla_flags in flags


def test_a_device_count_already_in_xla_flags_wins():
  count, flags = _run("--xla_force_host_platform_device_count=3")
  assert count == 3 and flags == ["--xla_force_host_platform_device_count=3"]


def test_replicated_mesh_is_found_only_where_every_array_is_replicated_over_one_mesh():
  tree = {"w": np.ones((6, 2), np.float32), "b": np.zeros(2, np.float32)}
  mesh = sharding.data_mesh(3)
  assert sharding.replicated_mesh(sharding.replicate(tree, mesh)) is mesh
  assert sharding.replicated_mesh(tree) is None  # host arrays
  assert sharding.replicated_mesh(jax.device_put(tree)) is None  # one device
  assert sharding.replicated_mesh(sharding.replicate(tree, sharding.data_mesh(1))) is None
  split = dict(sharding.replicate(tree, mesh), w=sharding.shard_batch(tree["w"], mesh))
  assert sharding.replicated_mesh(split) is None
  other = sharding.data_mesh(2)
  mixed = {"w": sharding.replicate(tree["w"], mesh), "b": sharding.replicate(tree["b"], other)}
  assert sharding.replicated_mesh(mixed) is None
  on_clients = jax.device_put(tree, NamedSharding(sharding.data_mesh(4, axis="clients"), P()))
  assert sharding.replicated_mesh(on_clients).axis_names == ("clients",)
