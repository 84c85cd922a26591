"""Adversarial debiasing (Zhang et al. 2018): the update direction against a float64 reference,
one training step against fairlearn's AdversarialFairnessClassifier (PyTorch engine) from the
same weights, and the parity it buys on data where the label follows the group."""

import warnings

import flax.linen as nn
import jax
import numpy as np
import pytest

from trustjax.fairness import adversarial as adv, group


def _data(seed: int = 0, n: int = 1500):
  """Two groups; the label depends on the features, one of which is mostly the group, so an
  unconstrained model selects group b far more often."""
  rng = np.random.default_rng(seed)
  g = rng.choice(np.array(["a", "b"]), n)
  X = rng.normal(size=(n, 4))
  X[:, 0] += 1.5 * (g == "b")
  y = (X[:, 0] + 0.5 * X[:, 1] + 0.5 * rng.normal(size=n) > 0.75).astype(int)
  return X.astype(np.float32), y, g


@pytest.mark.parametrize("per_leaf", [False, True])
def test_debias_gradient_is_zhang_et_als_direction(per_leaf):
  rng = np.random.default_rng(1)
  gp = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=2)}
  ga = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=2)}
  alpha = 0.7
  got = adv.debias_gradient(jax.tree.map(np.float32, gp), jax.tree.map(np.float32, ga), alpha,
                            per_leaf=per_leaf)
  # float64 reference: the whole tree (or each leaf) as one flat vector
  groups = [["w", "b"]] if not per_leaf else [["w"], ["b"]]
  for keys in groups:
    p = np.concatenate([gp[k].ravel() for k in keys])
    a = np.concatenate([ga[k].ravel() for k in keys])
    want = p - (p @ a) / (a @ a) * a - alpha * a
    have = np.concatenate([np.asarray(got[k], np.float64).ravel() for k in keys])
    np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6)
    # no component along the adversary's gradient but -alpha times it
    assert have @ a / np.linalg.norm(a) == pytest.approx(-alpha * np.linalg.norm(a), rel=1e-4)
  zero = adv.debias_gradient(gp, jax.tree.map(np.zeros_like, ga), alpha, per_leaf=per_leaf)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), zero, gp)
  plain = adv.debias_gradient(gp, ga, alpha, per_leaf=per_leaf, project=False)
  jax.tree.map(lambda x, p, a: np.testing.assert_allclose(x, p - alpha * a, rtol=1e-5,
                                                          atol=1e-6), plain, gp, ga)


@pytest.mark.parametrize("constraint", adv.CONSTRAINTS)
def test_one_step_equals_fairlearns_pytorch_engine(constraint):
  """A logistic predictor and a logistic adversary, full batch, plain SGD, one epoch: both
  players' weights after fairlearn's step and ours (leaf by leaf, fairlearn's projection; its
  leaves here are a [1, d] matrix and vectors, where its per-tensor inner product is the dot
  product)."""
  import torch  # pylint: disable=import-outside-toplevel
  from fairlearn.adversarial import (  # pylint: disable=import-outside-toplevel
      AdversarialFairnessClassifier)

  X, y, g = _data(2, n=64)
  pass_y = constraint == "equalized_odds"
  predictor, adversary = nn.Dense(1), nn.Dense(1)
  params = predictor.init(jax.random.PRNGKey(0), X[:1])["params"]
  adv_params = adversary.init(jax.random.PRNGKey(1), np.zeros((1, 2 if pass_y else 1)))["params"]
  adv_params = jax.tree.map(lambda v: v + 0.3, adv_params)  # (a non-zero adversary bias)

  def torch_logistic(p):
    lin = torch.nn.Linear(p["kernel"].shape[0], 1)
    with torch.no_grad():
      lin.weight.copy_(torch.tensor(np.asarray(p["kernel"]).T))
      lin.bias.copy_(torch.tensor(np.asarray(p["bias"])))
    return torch.nn.Sequential(lin, torch.nn.Sigmoid())

  tp, ta = torch_logistic(params), torch_logistic(adv_params)
  lr, alpha = 0.5, 2.0
  clf = AdversarialFairnessClassifier(
      backend="torch", predictor_model=tp, adversary_model=ta, predictor_optimizer="SGD",
      adversary_optimizer="SGD", constraints=constraint, learning_rate=lr, alpha=alpha,
      epochs=1, batch_size=len(y), shuffle=False)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    clf.fit(X, y, sensitive_features=g)
  res = adv.fit_adversarial(predictor, X, y, sensitive_features=g, constraint=constraint,
                            alpha=alpha, adversary=adversary, epochs=1, batch_size=len(y),
                            learning_rate=lr, optimizer="sgd", per_leaf=True, shuffle=False,
                            params=params, adversary_params=adv_params)
  for ours, theirs in ((res.params, tp[0]), (res.adversary_params, ta[0])):
    np.testing.assert_allclose(np.asarray(ours["kernel"]).T, theirs.weight.detach().numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["bias"], theirs.bias.detach().numpy(), rtol=1e-5,
                               atol=1e-6)
  # and the step moved both players (the comparison is not of two unchanged initialisations)
  assert np.abs(np.asarray(res.params["kernel"]) - np.asarray(params["kernel"])).max() > 1e-3
  assert np.abs(np.asarray(res.adversary_params["kernel"])
                - np.asarray(adv_params["kernel"])).max() > 1e-3


def test_the_adversary_narrows_the_parity_gap():
  """Against alpha = 0 (the projection only), the default adversary with alpha = 1 shrinks the
  demographic parity gap of the thresholded predictions several-fold, at a cost in accuracy;
  the adversary's loss ends near chance. (One seed; the game is not stable for every seed:
  see the README.)"""
  X, y, g = _data()
  model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(1)])
  kw = dict(epochs=40, batch_size=128, learning_rate=3e-3)
  plain = adv.fit_adversarial(model, X, y, sensitive_features=g, alpha=0.0, **kw)
  fair = adv.fit_adversarial(model, X, y, sensitive_features=g, alpha=1.0, **kw)
  gaps, accs = [], []
  for res in (plain, fair):
    pred = (adv.adversarial_probabilities(res, X) > 0.5).astype(int)
    gaps.append(group.demographic_parity_difference(y, pred, sensitive_features=g))
    accs.append(np.mean(pred == y))
  # (the plain model's gap, by a loop, for scale)
  pred = (adv.adversarial_probabilities(plain, X) > 0.5)
  assert gaps[0] == pytest.approx(abs(pred[g == "a"].mean() - pred[g == "b"].mean()), abs=1e-6)
  assert gaps[0] > 0.3 and accs[0] > 0.85
  assert gaps[1] < gaps[0] / 4 and accs[1] < accs[0] and accs[1] > 0.6
  # the adversary, unable to read the group from the output, ends near its entropy ln 2
  assert fair.adversary_loss[-1] > 0.95 * np.log(2) > plain.adversary_loss[-1]
  assert fair.predictor_loss.shape == (40,)
  # With no projection and alpha 0 the adversary changes nothing: the predictor equals one
  # trained by a loop of plain Adam steps on the same shuffled batches (same key split).
  alone = adv.fit_adversarial(model, X[:200], y[:200], sensitive_features=g[:200], alpha=0.0,
                              project=False, epochs=3, batch_size=64, learning_rate=3e-3)
  import optax  # pylint: disable=import-outside-toplevel
  key_p, _, key_order = jax.random.split(jax.random.PRNGKey(0), 3)
  params = model.init(key_p, X[:1])["params"]
  opt = optax.adam(3e-3)
  state = opt.init(params)
  for key in jax.random.split(key_order, 3):
    order = np.asarray(jax.random.permutation(key, 200))
    for start in range(0, 200, 64):
      rows = order[start:start + 64]
      loss = lambda p, rows=rows: optax.sigmoid_binary_cross_entropy(
          model.apply({"params": p}, X[rows])[:, 0], y[rows].astype(np.float32)).mean()
      up, state = opt.update(jax.grad(loss)(params), state, params)
      params = optax.apply_updates(params, up)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
               alone.params, params)


def test_more_groups_padding_and_bad_input():
  X, y, _ = _data(3, n=301)  # (301 rows: the last batch of 64 is padded)
  g3 = np.random.default_rng(4).choice(np.array(["x", "y", "z"]), len(y))
  res = adv.fit_adversarial(nn.Dense(2), X, y, sensitive_features=g3,
                            constraint="equalized_odds", epochs=3)
  assert list(res.groups) == ["x", "y", "z"]
  assert res.adversary_params["layers_0"]["kernel"].shape == (2, 16)  # [p, y] in
  assert res.adversary_params["layers_2"]["kernel"].shape == (16, 3)  # one logit per group
  p = adv.adversarial_probabilities(res, X)
  assert p.shape == (len(y),) and np.all((p > 0) & (p < 1))
  args = dict(sensitive_features=g3)
  for kw, message in [({"constraint": "parity"}, "constraint must be one of"),
                      ({"alpha": -1.0}, "alpha must be"), ({"epochs": 0}, "epochs"),
                      ({"optimizer": "rmsprop"}, "optimizer must be"),
                      ({"sensitive_features": np.array(["x"] * len(y))}, "at least two groups"),
                      ({"sensitive_features": g3[:5]}, "differ in length")]:
    with pytest.raises(ValueError, match=message):
      adv.fit_adversarial(nn.Dense(1), X, y, **{**args, **kw})
  with pytest.raises(ValueError, match="1 or 2 logits"):
    adv.fit_adversarial(nn.Dense(3), X, y, sensitive_features=g3, epochs=1)
  with pytest.raises(ValueError, match="0/1 labels"):
    adv.fit_adversarial(nn.Dense(1), X, y + 1, sensitive_features=g3, epochs=1)


def test_schedules_of_the_step_count():
  """alpha and the learning rate as functions of the step count: a constant schedule equals
  the constant, and alpha(t) = 0 at step 0 and 5 after acts as alpha 0 for the first step
  only."""
  import optax  # pylint: disable=import-outside-toplevel

  X, y, g = _data(5, n=200)
  kw = dict(sensitive_features=g, batch_size=200, shuffle=False)
  run = lambda **k: adv.fit_adversarial(nn.Dense(1), X, y, **{**kw, **k}).params
  same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
  same(run(alpha=lambda t: 2.0, epochs=3), run(alpha=2.0, epochs=3))
  same(run(learning_rate=optax.constant_schedule(3e-3), epochs=3),
       run(learning_rate=3e-3, epochs=3))
  late = lambda t: jax.numpy.where(t < 1, 0.0, 5.0)
  same(run(alpha=late, epochs=1), run(alpha=0.0, epochs=1))
  differ = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(),
                        run(alpha=late, epochs=2), run(alpha=0.0, epochs=2))
  assert max(jax.tree.leaves(differ)) > 1e-6
