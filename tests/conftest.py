"""Shared fixtures. Eight host CPU devices are forced before JAX starts, for the sharding tests."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pathlib  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_data(name: str) -> pathlib.Path:
  """A dataset of ../shared/data (or $TRUSTJAX_SHARED_DATA); skipped outside CI when absent."""
  root = pathlib.Path(os.environ.get("TRUSTJAX_SHARED_DATA", REPO.parent / "shared" / "data"))
  path = root / name
  if not path.exists():
    if os.environ.get("CI"):
      raise FileNotFoundError(f"{path} is required in CI")
    pytest.skip(f"shared dataset {path} not present")
  return path


@pytest.fixture
def snips_dir():
  return shared_data("snips")


def override(cfg, **overrides):
  """Sets dotted config fields ("fl.rounds"=3) on `cfg` itself (unlocked, then locked again) and
  returns it."""
  cfg.unlock()
  for key, value in overrides.items():
    node = cfg
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  cfg.lock()
  return cfg
