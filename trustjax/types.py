"""Shared type aliases and the loss-function protocol that ties the library together."""

from typing import Any, Mapping, Protocol

import jax

Params = Any  # A pytree of arrays (flax "params" collection).
PRNGKey = jax.Array
Array = jax.Array
# A batch is a dict of arrays with a leading batch axis. `batch["mask"]` (bool [B]), when present,
# marks the real rows; padded rows contribute nothing to any gradient, loss or metric.
Batch = Mapping[str, Any]


class LossFn(Protocol):
  """`loss_fn(params, batch) -> per_example_loss: [B]` (float)."""

  def __call__(self, params: Params, batch: Batch) -> jax.Array:
    ...


def batch_size_of(batch: Batch) -> int:
  """Returns the leading axis shared by every array of `batch`.

  Raises:
    ValueError: if the batch is empty or its arrays disagree on the batch axis.
  """
  sizes = {k: (v.shape[0] if getattr(v, "ndim", 0) else None) for k, v in batch.items()}
  if not sizes:
    raise ValueError("batch is empty: it has no arrays")
  if any(s is None for s in sizes.values()):
    scalars = sorted(k for k, s in sizes.items() if s is None)
    raise ValueError(f"batch arrays must have a leading batch axis; scalars: {scalars}")
  if len(set(sizes.values())) != 1:
    raise ValueError(f"batch arrays disagree on the batch axis: {sizes}")
  return next(iter(sizes.values()))
