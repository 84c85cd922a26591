"""The correlation remover against fairlearn's CorrelationRemover and the property it gives."""

import numpy as np
import pytest

from trustjax.fairness import preprocessing as pre


def _data(seed: int = 0, n: int = 500):
  rng = np.random.default_rng(seed)
  g = rng.choice(np.array(["a", "b", "c", "d"]), n, p=[0.4, 0.3, 0.2, 0.1])
  shift = np.select([g == "b", g == "c", g == "d"], [1.0, -2.0, 0.5], 0.0)
  X = rng.normal(size=(n, 6)) + shift[:, None] * np.array([1.0, 0.0, 2.0, -1.0, 0.3, 0.0])
  return X, g


@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_equals_fairlearns_correlation_remover(alpha):
  from fairlearn.preprocessing import CorrelationRemover  # pylint: disable=import-outside-toplevel

  X, g = _data()
  remover = pre.fit_correlation_remover(X, sensitive_features=g, alpha=alpha)
  names = np.unique(g)
  onehot = (g[:, None] == names[None, :]).astype(float)
  ref = CorrelationRemover(sensitive_feature_ids=list(range(6, 6 + len(names))), alpha=alpha)
  ref.fit(np.concatenate([X, onehot], axis=1))
  X2, g2 = _data(1, 200)  # new rows transform with the fitted coefficients
  for x, grp in ((X, g), (X2, g2)):
    want = ref.transform(np.concatenate([x, (grp[:, None] == names[None, :]).astype(float)], 1))
    np.testing.assert_allclose(pre.remove_correlation(remover, x, sensitive_features=grp), want,
                               atol=1e-10)


def test_every_group_has_the_overall_mean_afterwards():
  X, g = _data(2)
  out = pre.remove_correlation(pre.fit_correlation_remover(X, sensitive_features=g), X,
                               sensitive_features=g)
  for v in np.unique(g):  # a float64 loop: each group's mean equals everyone's
    np.testing.assert_allclose(out[g == v].mean(0), X.mean(0), atol=1e-10)
    # ... i.e. each row moved by its group's mean offset, nothing else
    np.testing.assert_allclose(out[g == v] - X[g == v],
                               np.broadcast_to(X.mean(0) - X[g == v].mean(0),
                                               X[g == v].shape), atol=1e-10)
  assert np.abs(X[g == "c"].mean(0) - X.mean(0)).max() > 1.0  # there was something to remove


def test_bad_input_is_named():
  X, g = _data()
  with pytest.raises(ValueError, match="alpha must lie"):
    pre.fit_correlation_remover(X, sensitive_features=g, alpha=1.5)
  with pytest.raises(ValueError, match="differ in length"):
    pre.fit_correlation_remover(X[:10], sensitive_features=g)
  with pytest.raises(ValueError, match="examples, features"):
    pre.fit_correlation_remover(X[:, 0], sensitive_features=g)
  remover = pre.fit_correlation_remover(X, sensitive_features=g)
  with pytest.raises(ValueError, match=r"not fitted on: \['e'\]"):
    pre.remove_correlation(remover, X[:2], sensitive_features=["a", "e"])
  with pytest.raises(ValueError, match="do not match"):
    pre.remove_correlation(remover, X[:2, :3], sensitive_features=["a", "b"])
