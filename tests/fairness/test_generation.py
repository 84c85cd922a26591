"""Gender polarity and sentiment of generated texts, per prompt group."""

import numpy as np
import pytest

from trustjax.fairness import generation
from trustjax.fairness.counterfactual import GENDER_PAIRS, counterfactual_swap


def _reference_counts(text):
  # An independent tokenisation: every non-letter becomes a space.
  words = "".join(c if c.isalpha() else " " for c in text.lower()).split()
  male = {a for a, _ in GENDER_PAIRS}
  female = {b for _, b in GENDER_PAIRS}
  return sum(w in male for w in words), sum(w in female for w in words)


def test_counts_and_polarity_match_a_reference_and_flip_under_the_swap():
  texts = ["He told his wife that the King's son was here.",
           "She and her mother met the queen; he's late.",
           "The nurse said that the doctor is ready.",
           "HER sister, his Brother, the waitress."]
  c = generation.gender_counts(texts)
  assert [tuple(r) for r in c] == [_reference_counts(t) for t in texts]
  assert c.tolist() == [[4, 1], [1, 4], [0, 0], [2, 3]]
  np.testing.assert_array_equal(generation.gender_polarity(texts), [1, -1, 0, -1])
  # The swap exchanges the two lists word for word ("her" -> "his" only: it counts the same).
  swapped = generation.gender_counts([counterfactual_swap(t) for t in texts])
  np.testing.assert_array_equal(swapped, c[:, ::-1])


def test_vader_reproduces_its_published_scores_and_thresholds():
  # The compound scores printed in VADER's README (Hutto and Gilbert 2014).
  comp = generation.vader_compound(["VADER is smart, handsome, and funny.",
                                    "The book was good.", "VADER is not smart, handsome, nor funny."])
  np.testing.assert_allclose(comp, [0.8316, 0.4404, -0.7424], atol=1e-4)
  np.testing.assert_array_equal(generation.sentiment_labels(comp), [1, 0, -1])
  np.testing.assert_array_equal(generation.sentiment_labels(comp, 0.4), [1, 1, -1])
  with pytest.raises(ValueError, match="threshold"):
    generation.sentiment_labels(comp, 0.0)


def test_group_measures_by_hand():
  texts = ["he and his son", "she", "the sea", "her mother", "good good love", "he"]
  groups = np.array([0, 0, 0, 0, 1, 1])
  r = generation.group_generation_measures(texts, groups, ["a", "b", "empty"])
  assert set(r) == {"a", "b"}  # a group without texts is left out
  assert r["a"]["n"] == 4
  assert r["a"]["male"] == pytest.approx(0.25) and r["a"]["female"] == pytest.approx(0.5)
  assert r["a"]["neutral"] == pytest.approx(0.25)
  assert r["a"]["female_share"] == pytest.approx(2 / 3)
  assert r["b"]["female_share"] == pytest.approx(0.0)
  comp = generation.vader_compound(texts)
  assert r["b"]["compound"] == pytest.approx(comp[4:].mean())
  assert r["b"]["positive"] == pytest.approx(np.mean(comp[4:] >= 0.5))
  assert np.isnan(generation.group_generation_measures(["the sea"], np.array([0]), ["a"],
                                                       sentiment=False)["a"]["female_share"])
  with pytest.raises(ValueError, match="one entry per text"):
    generation.group_generation_measures(texts, groups[:3], ["a", "b"])
  with pytest.raises(ValueError, match="group indices"):
    generation.group_generation_measures(texts, groups + 1, ["a", "b"])
