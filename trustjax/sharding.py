"""Device meshes and batch sharding with jax.sharding (data parallelism).

The same programs run on one device, many local devices, or many hosts: on a multi-host cluster
call `jax.distributed.initialize()` first, then `data_mesh()` spans every process's devices and
each host feeds its own slice of the global batch (see the README).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def one_cpu_device_per_core() -> None:
  """Makes JAX's CPU backend show one device per core this process may use, so that a mesh over
  all devices (e.g. the federated "clients" axis) runs a block on each core. An XLA_FLAGS that
  already sets the device count wins. XLA reads the flag when the backend starts: call this
  before the first JAX computation (importing jax is fine). Accelerator backends are unaffected.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if _DEVICE_COUNT_FLAG.lstrip("-") in flags:
    return
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_COUNT_FLAG}={cores}".strip()


def data_mesh(num_devices: int | None = None, axis: str = "data") -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (default: all)."""
  devices = jax.devices()
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(f"num_devices must lie in [1, {len(devices)}], got {num_devices=}")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (axis,))


def shard_batch(batch, mesh: Mesh, axis: str = "data"):
  """Places every array of `batch` (a dict of arrays, or any pytree of them) split along its
  leading axis over `axis`."""
  n = mesh.shape[axis]
  for path, v in jax.tree_util.tree_leaves_with_path(batch):
    if np.shape(v)[0] % n:
      raise ValueError(f"batch axis of {jax.tree_util.keystr(path)} ({np.shape(v)[0]}) is not "
                       f"divisible by the {n} devices of mesh axis {axis!r}; pad the batch to a "
                       f"multiple of {n}")
  return jax.device_put(batch, NamedSharding(mesh, P(axis)))


def replicate(tree, mesh: Mesh):
  """Places a pytree fully replicated over `mesh`."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def replicated_mesh(tree) -> Mesh | None:
  """The mesh that every array of `tree` is fully replicated over, where that mesh has several
  devices (as after `replicate` or a sharded training step); None otherwise (host arrays, one
  device, arrays split over an axis, or different meshes). Evaluation uses it to split batches
  over the devices that already hold the parameters instead of computing on each of them."""
  mesh = None
  for leaf in jax.tree_util.tree_leaves(tree):
    s = getattr(leaf, "sharding", None)
    if not (isinstance(s, NamedSharding) and s.mesh.size > 1 and s.is_fully_replicated):
      return None
    if mesh is None:
      mesh = s.mesh
    elif s.mesh != mesh:
      return None
  return mesh
