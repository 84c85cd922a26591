import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustjax import privacy
from tests.privacy.helpers import clipped_grad_sum, tiny_problem


def _loop_grads(loss_fn, params, batch):
  """A Python loop over single examples (one compiled gradient, called per example)."""
  grad_one = jax.jit(jax.grad(lambda p, one: loss_fn(p, one)[0]))
  return [grad_one(params, {k: v[i:i + 1] for k, v in batch.items()})
          for i in range(batch["tokens"].shape[0])]


def _min_norm(loss_fn, params, batch):
  _, aux = clipped_grad_sum(loss_fn, params, dict(batch, mask=jnp.ones_like(
      batch["mask"])), l2_clip=1e9)
  return float(jnp.min(aux["norms"]))


def test_per_example_grads_equal_python_loop():
  loss_fn, params, batch = tiny_problem()
  grads = privacy.per_example_grads(loss_fn, params, batch)
  for i, g in enumerate(_loop_grads(loss_fn, params, batch)):
    chex.assert_trees_all_close(jax.tree_util.tree_map(lambda x: x[i], grads), g, atol=1e-5)


@pytest.mark.parametrize("microbatch_size", [None, 3])
def test_clipped_sum_matches_float64_reference(microbatch_size):
  loss_fn, params, batch = tiny_problem(batch_size=8, scale=2.0)
  clip = 0.5 * _min_norm(loss_fn, params, batch) + 0.5 * float(
      clipped_grad_sum(loss_fn, params, batch, l2_clip=1e9)[1]["norms"].max())
  total, aux = clipped_grad_sum(loss_fn, params, batch, l2_clip=clip,
                                        microbatch_size=microbatch_size)
  mask = np.asarray(batch["mask"])
  ref = None
  for i, g in enumerate(_loop_grads(loss_fn, params, batch)):
    flat = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(g)]
    norm = np.sqrt(sum((x ** 2).sum() for x in flat))
    np.testing.assert_allclose(aux["norms"][i], norm * mask[i], rtol=1e-4)
    w = mask[i] * min(1.0, clip / norm)
    ref = [w * x for x in flat] if ref is None else [r + w * x for r, x in zip(ref, flat)]
  for got, want in zip(jax.tree_util.tree_leaves(total), ref):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=3e-5)  # float32 sums of O(1) terms
  assert float(np.max(aux["norms"])) > clip  # clipping was active


def test_every_clipped_gradient_within_clip():
  loss_fn, params, batch = tiny_problem(batch_size=6, scale=2.0)
  clip = 0.5 * _min_norm(loss_fn, params, batch)  # every example is clipped
  for i in range(6):
    one = {k: v[i:i + 1] for k, v in batch.items()}
    one["mask"] = jnp.ones((1,), bool)
    total, aux = clipped_grad_sum(loss_fn, params, one, l2_clip=clip)
    norm = float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(total))))
    assert float(aux["norms"][0]) > clip
    assert norm == pytest.approx(clip, rel=1e-4)


def test_masked_rows_contribute_nothing():
  loss_fn, params, batch = tiny_problem()
  mask = np.asarray(batch["mask"])
  full, _ = clipped_grad_sum(loss_fn, params, batch, l2_clip=1.0)
  real = {k: v[mask] for k, v in batch.items()}
  only, _ = clipped_grad_sum(loss_fn, params, real, l2_clip=1.0)
  chex.assert_trees_all_close(full, only, atol=1e-5)
  # Changing a padded row's content changes nothing.
  j = int(np.flatnonzero(~mask)[0])
  other = dict(batch, tokens=batch["tokens"].at[j].set(7), label=batch["label"].at[j].set(2))
  chex.assert_trees_all_close(clipped_grad_sum(loss_fn, params, other, l2_clip=1.0)[0],
                              full, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sensitivity_bound_on_neighbouring_batches(seed):
  """Adding or removing one example moves the clipped sum by at most the clip norm."""
  loss_fn, params, batch = tiny_problem(batch_size=10, seed=seed, scale=2.0)
  batch["mask"] = jnp.ones(10, bool)
  clip = 0.5 * _min_norm(loss_fn, params, batch)
  base, _ = clipped_grad_sum(loss_fn, params, batch, l2_clip=clip)
  for i in range(10):
    neighbour = dict(batch, mask=batch["mask"].at[i].set(False))  # example i removed
    other, _ = clipped_grad_sum(loss_fn, params, neighbour, l2_clip=clip)
    diff = jax.tree_util.tree_map(lambda a, b: a - b, base, other)
    dist = float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(diff))))
    assert dist <= clip * (1 + 1e-4)
    assert dist == pytest.approx(clip, rel=1e-3)  # every norm exceeds C: the bound is attained


def test_bad_input():
  loss_fn, params, batch = tiny_problem()
  with pytest.raises(ValueError, match="l2_clip must be positive"):
    privacy.clipped_grad_sum(loss_fn, params, batch, l2_clip=0.0)
  with pytest.raises(ValueError, match="disagree on the batch axis"):
    privacy.clipped_grad_sum(loss_fn, params, dict(batch, label=batch["label"][:3]), l2_clip=1.0)
  with pytest.raises(ValueError, match="unknown clipping"):
    privacy.clipped_grad_sum(loss_fn, params, batch, l2_clip=1.0, method="magic")
  with pytest.raises(ValueError, match="empty"):
    privacy.per_example_grads(loss_fn, params, {})


@pytest.mark.parametrize("method", ["vmap", "bookkeeping"])
def test_auto_s_weights_and_sensitivity(method):
  """AUTO-S: sum_i C g_i / (||g_i|| + gamma); removing one example moves it by less than C."""
  loss_fn, params, batch = tiny_problem(batch_size=8, scale=2.0)
  clip, gamma = 0.7, 0.05
  total, aux = clipped_grad_sum(loss_fn, params, batch, l2_clip=clip, method=method,
                                normalization="auto_s", gamma=gamma)
  mask = np.asarray(batch["mask"])
  ref = None
  for i, g in enumerate(_loop_grads(loss_fn, params, batch)):
    flat = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(g)]
    w = mask[i] * clip / (np.sqrt(sum((x ** 2).sum() for x in flat)) + gamma)
    ref = [w * x for x in flat] if ref is None else [r + w * x for r, x in zip(ref, flat)]
  for got, want in zip(jax.tree_util.tree_leaves(total), ref):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=3e-5)
  i = int(np.flatnonzero(mask)[0])
  other, _ = clipped_grad_sum(loss_fn, params, dict(batch, mask=batch["mask"].at[i].set(False)),
                              l2_clip=clip, method=method, normalization="auto_s", gamma=gamma)
  dist = np.sqrt(sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(
      jax.tree_util.tree_leaves(total), jax.tree_util.tree_leaves(other))))
  norm_i = float(aux["norms"][i])
  assert dist == pytest.approx(clip * norm_i / (norm_i + gamma), rel=1e-3) and dist < clip
  with pytest.raises(ValueError, match="normalization"):
    privacy.clipped_grad_sum(loss_fn, params, batch, l2_clip=1.0, normalization="tanh")
