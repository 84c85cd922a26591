"""Counterfactual swaps by example and the distillation loss against a float64 reference."""

import jax
import numpy as np
import pytest

from trustjax import fairness
from trustjax.data import TextDataset


def test_swap_keeps_case_punctuation_and_other_words():
  swap = fairness.counterfactual_swap
  assert swap("He met his sister.") == "She met her brother."
  assert swap("HE said: the King and the queen!") == "SHE said: the Queen and the king!"
  assert swap("history of mankind, his-story") == "history of mankind, her-story"
  assert swap("no gendered words here") == "no gendered words here"
  # unambiguous words round-trip; "her" maps to the possessive "his"
  text = "The boy asked his father and her uncle"
  assert swap(swap("The boy asked his father")) == "The boy asked his father"
  assert swap(text) == "The girl asked her mother and his aunt"


def test_augment_adds_a_swapped_copy_of_each_changed_text():
  ds = TextDataset(texts=["she is a doctor", "the weather is nice", "his car"],
                   labels=np.array([1, 0, 1]), label_names=("a", "b"),
                   device_ids=np.array([7, 8, 9]))
  out = fairness.counterfactual_augment(ds)
  assert list(out.texts) == ["she is a doctor", "the weather is nice", "his car",
                             "he is a doctor", "her car"]
  assert out.labels.tolist() == [1, 0, 1, 1, 1] and out.device_ids.tolist() == [7, 8, 9, 7, 9]


def _reference(s, t, y, temperature, alpha):
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  soft = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(
      z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
  pt, ps = soft(t / temperature), soft(s / temperature)
  kl = (pt * (np.log(pt) - np.log(ps))).sum(-1)
  ce = -np.log(soft(s)[np.arange(len(y)), y])
  return alpha * ce + (1 - alpha) * temperature ** 2 * kl


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 0.3), (4.0, 1.0), (2.0, 0.0)])
def test_distillation_loss_matches_float64(temperature, alpha):
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(6, 11)) * 2, rng.normal(size=(6, 11)) * 2
  y = rng.integers(0, 11, 6)
  got = fairness.distillation_loss(s, t, labels=y, temperature=temperature, alpha=alpha)
  np.testing.assert_allclose(got, _reference(s, t, y, temperature, alpha), rtol=1e-5, atol=1e-6)
  # a student equal to its teacher has no soft loss and no soft gradient
  g = jax.grad(lambda z: fairness.distillation_loss(z, t, temperature=temperature,
                                                    alpha=0.0).sum())(t)
  np.testing.assert_allclose(g, 0.0, atol=1e-5)


def test_distillation_bad_input_is_named():
  z = np.zeros((2, 3))
  with pytest.raises(ValueError, match="pass labels"):
    fairness.distillation_loss(z, z)
  with pytest.raises(ValueError, match="temperature"):
    fairness.distillation_loss(z, z, alpha=0.0, temperature=0.0)
  with pytest.raises(ValueError, match="differ in shape"):
    fairness.distillation_loss(z, np.zeros((2, 4)), alpha=0.0)
