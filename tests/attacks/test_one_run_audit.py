"""The one-run audit (Steinke et al. 2023) end to end: DP-SGD as trustjax runs it stays below its
accounted epsilon, and the same code with a hundredth of the noise, accounted as if it had all of
it (a bug of the kind audits exist for), is caught: its bound exceeds the claimed epsilon."""

import jax.numpy as jnp
import numpy as np
import optax

from trustjax.attacks import metrics, shadow
from trustjax.models import BagOfEmbeddings, classification_loss
from trustjax.privacy import accounting, sampling
from trustjax.privacy.dp_sgd import DPConfig


def test_one_run_bound_holds_for_dp_sgd_and_catches_a_hundredth_of_the_noise():
  rng = np.random.default_rng(0)
  n = 500  # every example a canary: random tokens, random labels (memorised or not at all)
  arrays = {"tokens": rng.integers(1, 300, size=(n, 8)).astype(np.int32),
            "label": rng.integers(0, 4, n).astype(np.int32)}
  model = BagOfEmbeddings(vocab_size=300, num_classes=4, embed_dim=16, hidden_dim=64)
  init = lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"]
  # 2 models: in each, every example independently with probability 1/2 (one run each)
  is_in = shadow.membership_masks(2, n, seed=1)
  q, steps, delta, sigma = 0.5, 60, 1e-5, 20.0
  claimed = accounting.epsilon(noise_multiplier=sigma, sampling_rate=q, steps=steps,
                               delta=delta)
  members = int(is_in.sum(1).max())
  batch = sampling.default_max_batch_size(members, q, steps, multiple_of=8)

  def bound(noise_multiplier):
    cfg = DPConfig(l2_clip=1.0, noise_multiplier=noise_multiplier, sampling_rate=q,
                   num_examples=members, max_batch_size=batch, method="bookkeeping")
    got = shadow.train_in_parallel(init, classification_loss(model), optax.adam(0.1), arrays,
                                   is_in, num_steps=steps, sampling_rate=q, batch_size=batch,
                                   seed=0, dp_config=cfg, chunk_steps=steps, show_progress=False)
    logits = shadow.logits_of_all(lambda p, t: model.apply({"params": p}, t), got.params,
                                  arrays["tokens"])
    loss = np.asarray(optax.softmax_cross_entropy_with_integer_labels(
        jnp.asarray(logits), jnp.asarray(arrays["label"])[None]))
    # each model's own loss, the confidence split over the 2 models
    return max(metrics.one_run_epsilon_lower_bound(is_in[t], -loss[t], delta=delta,
                                                   confidence=1 - 0.05 / 2) for t in range(2))

  assert 0.5 < claimed < 0.9
  assert bound(sigma) <= claimed
  assert bound(sigma / 100) > 1.5 * claimed  # the bug: the audit refutes the claim
