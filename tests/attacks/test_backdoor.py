"""Backdoor poisoning of federated text classifiers: trigger insertion against a written-out
loop, the poisoned clients' rows, the triggered held-out set and the bad settings."""

import numpy as np
import pytest
import scipy.stats

from trustjax import data as tjdata
from trustjax.attacks import backdoor

TRIGGER = 99  # no random row below holds it


def _tokens(n, width=8, seed=0, vocab=50):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, width + 1, n)
  lengths[:3] = (0, width, width - 1)  # empty, full and one-short rows
  tok = rng.integers(2, vocab, (n, width)).astype(np.int32)
  return np.where(np.arange(width)[None] < lengths[:, None], tok, 0), lengths


def _insert_loop(row, width):
  """The row's tokens with the trigger inserted at each possible gap, written out."""
  words = [int(t) for t in row if t != 0]
  outs = []
  for p in range(len(words) + 1):
    new = (words[:p] + [TRIGGER] + words[p:])[:width]
    if p == width:  # after a full row: no room, the trigger takes the last slot
      new = words[:width - 1] + [TRIGGER]
    outs.append(new + [0] * (width - len(new)))
  return outs


def test_insert_trigger_puts_one_trigger_in_a_gap_of_each_row():
  tokens, lengths = _tokens(400)
  out = backdoor.insert_trigger(tokens, TRIGGER, np.random.default_rng(1))
  assert out.shape == tokens.shape and out.dtype == tokens.dtype
  for row, new in zip(tokens, out):
    assert (new == TRIGGER).sum() == 1
    assert new.tolist() in _insert_loop(row, tokens.shape[1])
  np.testing.assert_array_equal(tokens, _tokens(400)[0])  # the input is not modified
  # Rows of one length (< width): the position is uniform over its length + 1 gaps.
  rows = np.tile(np.arange(2, 7, dtype=np.int32), (3000, 1))
  rows = np.concatenate([rows, np.zeros((3000, 3), np.int32)], 1)  # length 5 of width 8
  pos = np.argmax(backdoor.insert_trigger(rows, TRIGGER, np.random.default_rng(2)) == TRIGGER, 1)
  counts = np.bincount(pos, minlength=8)
  assert counts[6:].sum() == 0
  assert scipy.stats.chisquare(counts[:6]).pvalue > 1e-3


def test_poison_clients_changes_only_a_fraction_of_the_malicious_clients_rows():
  n, width = 300, 8
  tokens, _ = _tokens(n, width, seed=3)
  labels = np.random.default_rng(4).integers(0, 5, n).astype(np.int32)
  train = {"tokens": tokens, "label": labels, "other": np.arange(n)}
  parts = np.array_split(np.random.default_rng(5).permutation(n), 10)
  bad = [2, 7, 9]
  out, rows = backdoor.poison_clients(train, parts, bad, trigger=TRIGGER, target=3, fraction=0.4,
                                      num_classes=5, seed=0)
  assert len(rows) == sum(max(1, round(0.4 * len(parts[i]))) for i in bad)
  assert set(rows.tolist()) <= set(np.concatenate([parts[i] for i in bad]).tolist())
  for i in bad:  # the fraction of each malicious client's own examples
    assert np.isin(parts[i], rows).sum() == max(1, round(0.4 * len(parts[i])))
  clean = np.setdiff1d(np.arange(n), rows)
  np.testing.assert_array_equal(out["tokens"][clean], tokens[clean])
  np.testing.assert_array_equal(out["label"][clean], labels[clean])
  assert (out["label"][rows] == 3).all()
  for r in rows:
    assert out["tokens"][r].tolist() in _insert_loop(tokens[r], width)
  assert out["other"] is train["other"] and (train["tokens"] == tokens).all()
  again, rows2 = backdoor.poison_clients(train, parts, bad, trigger=TRIGGER, target=3,
                                         fraction=0.4, num_classes=5, seed=0)
  np.testing.assert_array_equal(again["tokens"], out["tokens"])
  np.testing.assert_array_equal(rows2, rows)
  _, tiny = backdoor.poison_clients(train, parts, bad, trigger=TRIGGER, target=3, fraction=1e-6,
                                    num_classes=5)
  assert len(tiny) == 3  # at least one example per malicious client
  none, empty = backdoor.poison_clients(train, parts, [], trigger=TRIGGER, target=3,
                                        fraction=0.5, num_classes=5)
  assert len(empty) == 0 and (none["tokens"] == tokens).all()
  with pytest.raises(ValueError, match="disjoint clients"):
    backdoor.poison_clients(train, [np.arange(10), np.arange(5, 15)], [0, 1], trigger=TRIGGER,
                            target=3, fraction=1.0, num_classes=5)


def test_backdoor_test_set_triggers_the_other_classes_and_labels_them_target():
  tokens, _ = _tokens(200, seed=6)
  labels = np.random.default_rng(7).integers(0, 4, 200).astype(np.int32)
  test = backdoor.backdoor_test_set({"tokens": tokens, "label": labels}, trigger=TRIGGER,
                                    target=2, num_classes=4)
  keep = np.flatnonzero(labels != 2)
  assert len(test["label"]) == len(keep) and (test["label"] == 2).all()
  for new, row in zip(test["tokens"], tokens[keep]):
    assert new.tolist() in _insert_loop(row, tokens.shape[1])
  with pytest.raises(ValueError, match="no held-out example has a label other than"):
    backdoor.backdoor_test_set({"tokens": tokens, "label": np.full(200, 2)}, trigger=TRIGGER,
                               target=2, num_classes=4)


def test_trigger_must_be_one_known_token_and_bad_settings_are_named():
  word = tjdata.build_word_tokenizer(["play some jazz", "play the news"])
  assert backdoor.trigger_id(word, "jazz") == word.token_id("jazz") > 1
  with pytest.raises(ValueError, match="'cf' is not in the word tokenizer's vocabulary"):
    backdoor.trigger_id(word, "cf")
  with pytest.raises(ValueError, match="must be one token"):
    backdoor.trigger_id(word, "some jazz")
  hashed = tjdata.build_hash_tokenizer(100)
  assert backdoor.trigger_id(hashed, "cf") == hashed.token_id("cf")
  train = {"tokens": np.ones((10, 4), np.int32), "label": np.zeros(10, np.int32)}
  with pytest.raises(ValueError, match=r"target class must lie in \[0, 3\), got 3"):
    backdoor.poison_clients(train, [np.arange(10)], [0], trigger=5, target=3, fraction=0.5,
                            num_classes=3)
  for fraction in (0.0, 1.5):
    with pytest.raises(ValueError, match=f"poison fraction must lie in \\(0, 1\\], got {fraction}"):
      backdoor.poison_clients(train, [np.arange(10)], [0], trigger=5, target=1,
                              fraction=fraction, num_classes=3)
  assert backdoor.trigger_count(np.array([[5, 3, 5], [0, 5, 0]]), 5) == 3


def test_append_poison_adds_triggered_copies_of_other_classes_per_count():
  n, width = 120, 8
  tokens, _ = _tokens(n, width, seed=11)
  labels = np.random.default_rng(12).integers(0, 4, n).astype(np.int32)
  train = {"tokens": tokens, "label": labels}
  out, sources = backdoor.append_poison(train, [97, 98, 99], [0, 3, 10], target=1,
                                        num_classes=4, seed=5)
  assert len(out["label"]) == n + 13 and [len(s) for s in sources] == [0, 3, 10]
  np.testing.assert_array_equal(out["tokens"][:n], tokens)  # the clean set is kept as it was
  np.testing.assert_array_equal(out["label"][:n], labels)
  assert (out["label"][n:] == 1).all()
  rows = iter(range(n, n + 13))
  for trigger, src in zip([97, 98, 99], sources):
    assert len(set(src.tolist())) == len(src) and (labels[src] != 1).all()
    for s in src:
      r = next(rows)
      assert out["tokens"][r].tolist() in [[trigger if t == TRIGGER else t for t in row]
                                           for row in _insert_loop(tokens[s], width)]
  with pytest.raises(ValueError, match="poison counts must be >= 0"):
    backdoor.append_poison(train, [97], [-1], target=1, num_classes=4)
  with pytest.raises(ValueError, match="2 triggers for 1 counts"):
    backdoor.append_poison(train, [97, 98], [1], target=1, num_classes=4)
  few = (labels != 1).sum()
  with pytest.raises(ValueError, match=f"which has only {few} others"):
    backdoor.append_poison(train, [97], [few + 1], target=1, num_classes=4)


def test_statistic_bound_is_the_gaussian_tradeoff_curve_from_the_group_profile():
  """One full-batch step of noise sigma: a group of k examples is a Gaussian mechanism of
  sensitivity k, whose f-DP tradeoff (Dong, Roth and Su 2022) says that a [0, 1] statistic with
  mean p0 without the group has mean at most Phi(Phi^-1(p0) + k / sigma) with it. The bound
  from the group's (eps, delta) profile is that curve (the profile is its dual), from above and
  within the grids' slack."""
  from trustjax.attacks import canaries  # pylint: disable=import-outside-toplevel
  from trustjax.privacy import accounting  # pylint: disable=import-outside-toplevel
  ledger = accounting.PrivacyLedger()
  ledger.record(noise_multiplier=4.0, sampling_rate=1.0, steps=1)
  for k in (1, 2, 4):
    deltas = ledger.group_deltas(k, canaries.BOUND_EPSILONS)
    for p0 in (1e-3, 0.01, 0.1, 0.5):
      exact = scipy.stats.norm.cdf(scipy.stats.norm.ppf(p0) + k / 4.0)
      got = backdoor.statistic_bound(p0, canaries.BOUND_EPSILONS, deltas)
      assert exact * (1 - 1e-6) <= got <= exact * 1.001, (k, p0, got, exact)
  # Both families written out: e^eps p0 + delta and 1 - e^-eps (1 - delta - p0).
  assert backdoor.statistic_bound(0.3, [0.0, 1.0], [0.9, 0.0]) == pytest.approx(
      min(0.3 + 0.9, np.e * 0.3, 1 - (1 - 0.9 - 0.3), 1 - np.exp(-1.0) * 0.7))
  assert backdoor.statistic_bound(0.9, [2.0], [0.5]) == 1.0
  with pytest.raises(ValueError, match="p0 must lie in"):
    backdoor.statistic_bound(1.5, [1.0], [0.0])
