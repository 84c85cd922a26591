"""sharding.one_cpu_device_per_core, in fresh processes (XLA reads the flag when JAX starts)."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

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
