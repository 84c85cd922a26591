"""Canary helpers and exposure against its definition (classifier and language-model canaries)."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import load_file
from tests.privacy.helpers import checkpoint_with_ledger
from trustjax.attacks import canaries
from trustjax.experiments import canary_bounds
from trustjax.privacy import accounting
from trustjax.data import TextDataset
from trustjax.data.shakespeare import RoleCorpus, lm_examples
from trustjax.experiments import ascii_tokenizer


def test_exposure_rank_form():
  ref = np.arange(1.0, 1024.0)  # 1023 other candidates, |R| = 1024
  assert canaries.exposure(0.5, ref) == pytest.approx(10.0)  # ranked first: log2 |R|
  assert canaries.exposure(2000.0, ref) == pytest.approx(0.0)  # ranked last
  assert canaries.exposure(3.5, ref) == pytest.approx(10 - math.log2(4))  # three below it
  assert canaries.exposure(3.0, ref) == pytest.approx(10 - math.log2(4))  # a tie ranks after
  rng = np.random.default_rng(0)
  for _ in range(20):
    r, s = rng.normal(size=99), rng.normal()
    rank = 1 + sum(v <= s for v in r)
    assert canaries.exposure(s, r) == pytest.approx(math.log2(100) - math.log2(rank))
  with pytest.raises(ValueError, match="empty"):
    canaries.exposure(1.0, [])


def test_secrets_and_templates():
  s = canaries.make_secrets(50, digits=3, seed=1)
  assert len(set(s)) == 50 and all(len(x) == 3 and x.isdigit() for x in s)
  assert s == canaries.make_secrets(50, digits=3, seed=1)
  assert canaries.all_secrets(2)[:3] == ["00", "01", "02"] and len(canaries.all_secrets(3)) == 1000
  assert canaries.fill("pin {} now", ["12"]) == ["pin 12 now"]
  with pytest.raises(ValueError, match="num must lie"):
    canaries.make_secrets(11, digits=1)
  with pytest.raises(ValueError, match="exactly one"):
    canaries.fill("no slot", ["1"])


def test_insert_canaries_appends_repeated_copies():
  ds = TextDataset(texts=["a", "b", "c"], labels=np.array([0, 1, 0]), label_names=("x", "y"),
                   device_ids=np.array([5, 6, 7]))
  out, rows = canaries.insert_canaries(ds, ["s1", "s2"], [1, 0], repeats=3)
  assert len(out) == 9 and rows.shape == (2, 3)
  assert [out.texts[i] for i in rows[0]] == ["s1"] * 3
  assert [out.texts[i] for i in rows[1]] == ["s2"] * 3
  assert out.labels[rows[0]].tolist() == [1, 1, 1] and out.labels[rows[1]].tolist() == [0, 0, 0]
  assert out.device_ids[rows].tolist() == [[-1] * 3] * 2 and list(out.texts[:3]) == ["a", "b", "c"]
  with pytest.raises(ValueError, match="labels must lie"):
    canaries.insert_canaries(ds, ["s"], [2])
  with pytest.raises(ValueError, match="repeats"):
    canaries.insert_canaries(ds, ["s"], [1], repeats=0)


def test_lm_windows_cut_a_canary_as_the_role_streams_are_cut():
  """A canary window equals the window data.lm_examples makes of a role that said only it."""
  tok = ascii_tokenizer()
  texts = ["my pin code is 0427", "x {}"]
  got = canaries.lm_windows(tok, texts, 24)
  for i, text in enumerate(texts):
    want = lm_examples(RoleCorpus(("p/R",), ((text,),), (np.zeros(1),)), tok, 24)
    for k in ("inputs", "targets", "target_mask"):
      np.testing.assert_array_equal(got[k][i], want[k][0], err_msg=k)
  with pytest.raises(ValueError, match="a window holds 2 to 11"):
    canaries.lm_windows(tok, ["my pin code is 0427"], 10)


def _linear_lm(seq_len):
  """A 'language model' whose loss is a fixed linear function of the window's input ids, so
  every candidate's loss is known in numpy: (loss_fn, params, float64 weights)."""
  w = np.random.default_rng(0).normal(size=seq_len)

  def loss_fn(params, batch):
    x = batch["inputs"].astype(jnp.float32)
    return (x * params["w"]).sum(-1) * batch["target_mask"].any(-1)

  return loss_fn, {"w": jnp.asarray(w, jnp.float32)}, w


def test_lm_exposures_rank_each_secret_among_the_candidates_not_inserted():
  """A 'model' whose loss is a fixed function of the window (so every rank is known): the
  exposures equal a loop over the candidates that leaves the other inserted secrets out; the
  batch size (the last batch padded) does not matter."""
  tok = ascii_tokenizer()
  loss_fn, params, w = _linear_lm(12)
  secrets = ["017", "342", "999"]
  got = canaries.lm_exposures(loss_fn, params, tok, "pin {}", secrets, digits=3, seq_len=12,
                              batch_size=128)
  windows = canaries.lm_windows(tok, [f"pin {c:03d}" for c in range(1000)], 12)
  loss = (windows["inputs"].astype(np.float32) * w.astype(np.float32)).sum(-1)
  others = np.array([f"{c:03d}" not in secrets for c in range(1000)])
  for s, e in zip(secrets, got):
    rank = 1 + int((loss[others] <= loss[int(s)] + 1e-4).sum())
    assert e == pytest.approx(np.log2(others.sum() + 1) - np.log2(rank)), s
  again = canaries.lm_exposures(loss_fn, params, tok, "pin {}", secrets, digits=3, seq_len=12,
                                batch_size=1000)
  np.testing.assert_array_equal(got, again)
  with pytest.raises(ValueError, match="3-digit strings"):
    canaries.lm_exposures(loss_fn, params, tok, "pin {}", ["12"], digits=3, seq_len=12)


def _lp_bound(eps, deltas, references):
  """The largest expected exposure, and P(rank 1), over every distribution of the inserted
  secret's rank with P(rank <= k) <= e^eps_j k / N + delta_j for all j and k: two linear
  programs (scipy's HiGHS), a reference independent of the closed form."""
  from scipy import optimize  # pylint: disable=import-outside-toplevel
  n = references + 1
  k = np.arange(1, n + 1)
  cum = np.tril(np.ones((n, n)))
  a_ub = np.concatenate([cum] * len(eps))
  b_ub = np.concatenate([np.exp(e) * k / n + d for e, d in zip(eps, deltas)])
  out = []
  for gain in (np.log2(n) - np.log2(k), (k == 1).astype(float)):
    res = optimize.linprog(-gain, A_ub=a_ub, b_ub=b_ub, A_eq=np.ones((1, n)), b_eq=[1.0],
                           bounds=(0, None), method="highs")
    assert res.status == 0
    out.append(-res.fun)
  return out


def test_exposure_bound_against_linear_programs_and_its_ends():
  refs = 63
  n = refs + 1
  chance = np.mean(np.log2(n) - np.log2(np.arange(1, n + 1)))
  b = canaries.exposure_bound([0.0], [0.0], refs)  # perfect privacy: chance, as if not inserted
  assert b["mean"] == pytest.approx(chance) and b["rank_one"] == pytest.approx(1 / n)
  assert canaries.chance_exposure(n) == pytest.approx(chance, rel=1e-12)
  b = canaries.exposure_bound([3.0], [1.0], refs)  # no guarantee: the top rank
  assert b["mean"] == pytest.approx(math.log2(n)) and b["rank_one"] == 1.0
  for eps, deltas in [([1.0], [0.0]), ([0.5, 1.0, 2.0], [0.05, 0.01, 0.0]),
                      ([0.0, 0.3, 4.0], [0.2, 0.1, 1e-4])]:
    b = canaries.exposure_bound(eps, deltas, refs)
    mean, rank_one = _lp_bound(eps, deltas, refs)
    assert b["mean"] == pytest.approx(mean, rel=1e-7)
    assert b["rank_one"] == pytest.approx(rank_one, rel=1e-7)
    assert chance < b["mean"] < math.log2(n)
  # An eps-DP "model": the secret ranks first with probability e^eps / (e^eps + N - 1), else
  # uniformly among the other ranks (each rank's probability within e^eps of 1 / N); its mean
  # exposure must stay under the bound.
  eps = 2.0
  p1 = math.exp(eps) / (math.exp(eps) + n - 1)
  probs = np.concatenate([[p1], np.full(n - 1, (1 - p1) / (n - 1))])
  assert np.all(probs <= math.exp(eps) / n) and np.all(1 / n <= math.exp(eps) * probs)
  model = probs @ (np.log2(n) - np.log2(np.arange(1, n + 1)))
  assert model < canaries.exposure_bound([eps], [0.0], refs)["mean"]
  with pytest.raises(ValueError, match="as many deltas as epsilons"):
    canaries.exposure_bound([1.0, 2.0], [0.0], refs)
  with pytest.raises(ValueError, match="deltas in"):
    canaries.exposure_bound([1.0], [1.5], refs)
  with pytest.raises(ValueError, match="references must be a positive integer"):
    canaries.exposure_bound([1.0], [0.0], 0)


def test_exposure_bound_in_blocks_for_large_spaces():
  """Past 2^14 candidates the bound is summed in blocks of 0.1%: never below the exact sum (a
  rank-by-rank loop here) and within 0.01 bits of it; at 10^12 candidates perfect privacy gives
  chance, 1 / ln 2 in the limit, to 1e-3."""
  eps, deltas = [0.0, 0.5, 1.0, 2.0, 4.0], [0.3, 0.1, 0.03, 0.004, 1e-5]
  refs = 49_999
  n = refs + 1
  k = np.arange(1, n + 1)
  cdf = np.minimum(1.0, np.min([np.exp(e) * k / n + d for e, d in zip(eps, deltas)], axis=0))
  exact = np.diff(np.concatenate([[0.0], cdf])) @ (np.log2(n) - np.log2(k))
  got = canaries.exposure_bound(eps, deltas, refs)
  assert exact <= got["mean"] <= exact + 0.01
  assert got["rank_one"] == pytest.approx(cdf[0])
  chance = canaries.exposure_bound([0.0], [0.0], 10 ** 12)["mean"]
  assert canaries.chance_exposure(10 ** 12 + 1) <= chance <= 1 / math.log(2) + 1e-3
  assert canaries.chance_exposure(10 ** 12 + 1) == pytest.approx(1 / math.log(2), abs=1e-9)


def test_extrapolated_exposure_estimates_the_rank_form_from_a_sample():
  """Losses of a million candidates from a skew-normal; a fit to 10,000 of them gives each
  secret's exposure within 0.3 bits of its rank among all million (Carlini et al.'s 4.3)."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  population = stats.skewnorm.rvs(4.0, loc=2.0, scale=0.5, size=1_000_000, random_state=1)
  sample = np.random.default_rng(0).choice(population, 10_000, replace=False)
  secrets = np.quantile(population, [0.5, 1e-2, 1e-3, 1e-4, 1e-5])
  got = canaries.extrapolated_exposure(secrets, sample)
  want = [canaries.exposure(s, population) for s in secrets]
  np.testing.assert_allclose(got, want, atol=0.3)
  # Past float64's CDF (scipy's log CDF is -inf there) the tail is integrated in logs: finite,
  # and steeper than linear in the distance (a Gaussian-like tail).
  far = canaries.extrapolated_exposure([-20.0, -40.0], sample)
  assert np.all(np.isfinite(far)) and far[1] > 3 * far[0] > 3000
  with pytest.raises(ValueError, match="at least 100 reference losses"):
    canaries.extrapolated_exposure([1.0], sample[:99])
  with pytest.raises(ValueError, match="all equal"):
    canaries.extrapolated_exposure([1.0], np.ones(200))
  with pytest.raises(ValueError, match="finite"):
    canaries.extrapolated_exposure([np.nan], sample)


def test_skewnorm_log_cdf_in_the_far_tail_against_mpmath():
  """The quadrature branch (where scipy's log CDF underflows to -inf) against mpmath's 50-digit
  integral of 2 phi(t) Phi(a t), split ever finer towards z where the mass sits, and for a = 0
  against mpmath's normal CDF."""
  import mpmath  # pylint: disable=import-outside-toplevel
  mpmath.mp.dps = 50
  for shape, z in [(3.0, -25.0), (0.0, -40.0), (-2.0, -39.0)]:
    got = canaries._skewnorm_logcdf(np.array([z]), shape)[0]  # pylint: disable=protected-access
    f = lambda t, a=shape: 2 * mpmath.npdf(t) * mpmath.ncdf(a * t)
    pieces = [-mpmath.inf] + [z - d for d in (10, 3, 1, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)] + [z]
    assert got == pytest.approx(float(mpmath.log(mpmath.quad(f, pieces))), rel=1e-9)
  got = canaries._skewnorm_logcdf(np.array([-40.0]), 0.0)[0]  # pylint: disable=protected-access
  assert got == pytest.approx(float(mpmath.log(mpmath.ncdf(-40))), rel=1e-12)


def test_sample_candidates_and_lm_exposures_by_extrapolation():
  s = canaries.sample_candidates(500, digits=12, exclude=["000000000001"], seed=3)
  assert len(set(s)) == 500 and all(len(x) == 12 and x.isdigit() for x in s)
  assert s == canaries.sample_candidates(500, digits=12, exclude=["000000000001"], seed=3)
  assert s != canaries.sample_candidates(500, digits=12, seed=4)
  small = canaries.sample_candidates(998, digits=3, exclude=["017", "342"])
  assert sorted(small) == sorted(f"{i:03d}" for i in range(1000) if i not in (17, 342))
  with pytest.raises(ValueError, match=r"references must lie in \[100, 998\]"):
    canaries.sample_candidates(999, digits=3, exclude=["017", "342"])
  with pytest.raises(ValueError, match=r"digits must lie in \[1, 18\]"):
    canaries.sample_candidates(100, digits=19)
  # The driver's call: the sampled candidates' losses are the references of the fit.
  tok = ascii_tokenizer()
  loss_fn, params, w = _linear_lm(16)
  secrets = ["00000017", "12345678"]
  got = canaries.lm_exposures(loss_fn, params, tok, "pin {}", secrets, digits=8, seq_len=16,
                              references=300, seed=5)
  loss = lambda texts: (canaries.lm_windows(tok, canaries.fill("pin {}", texts), 16)[
      "inputs"].astype(np.float32) * w.astype(np.float32)).sum(-1)
  refs = canaries.sample_candidates(300, digits=8, exclude=secrets, seed=5)
  np.testing.assert_allclose(got, canaries.extrapolated_exposure(loss(secrets), loss(refs)),
                             rtol=1e-4)
  with pytest.raises(ValueError, match="all_secrets|digits must lie in"):
    canaries.lm_exposures(loss_fn, params, tok, "pin {}", secrets, digits=8, seq_len=16)


def test_canary_tables_script(tmp_path, capsys):
  """scripts/canary_tables.py on three run folders: non-DP, DP with the bounds in its summary,
  and DP from before them (bounds computed from its checkpoint's ledger, equal to
  `experiments.canary_bounds`); counts in numeric order; ranked first = exposure at the maximum."""
  script = load_file("scripts/canary_tables.py")
  top = math.log2(996)
  base = {"canary_exposure_max": top, "canary_exposure_chance": canaries.chance_exposure(996),
          "canary_exposure_method": "rank"}
  ledger = accounting.PrivacyLedger()
  ledger.record(noise_multiplier=1.0, sampling_rate=0.02, steps=100)
  bounds = canary_bounds(ledger, (1, 16), 1e-5, 995)
  runs = {
      "nondp": dict(base, canary_exposure={"x16": 10.0, "x1": 1.0},
                    canary_exposures={"x16": [top, 6.0], "x1": [1.5, 0.5]},
                    canary_beam_positions={"x16": [1, 0], "x1": [0, 0]}),
      "dp_new": dict(base, epsilon=2.0, delta=1e-5, canary_exposure={"x1": 1.2, "x16": 2.0},
                     canary_exposures={"x1": [1.2, 1.2], "x16": [2.0, 2.0]}, **bounds),
      "dp_old": dict(base, epsilon=2.0, delta=1e-5, canary_exposure={"x1": 0.9, "x16": 1.1},
                     canary_exposures={"x1": [0.9, 0.9], "x16": [1.1, 1.1]})}
  for name, summary in runs.items():
    (tmp_path / name).mkdir()
    (tmp_path / name / "summary.json").write_text(json.dumps(summary))
  checkpoint_with_ledger(tmp_path / "dp_old" / "checkpoints", ledger)
  plot = tmp_path / "plots" / "exposure.png"
  script.main([str(tmp_path / n) for n in runs] + ["--plot", str(plot)])
  out = capsys.readouterr().out
  rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
          if line.startswith("| ") and not line.startswith("| run")]
  assert [r[:3] for r in rows] == [["nondp", "-", "1"], ["nondp", "-", "16"],
                                   ["dp_new", "2", "1"], ["dp_new", "2", "16"],
                                   ["dp_old", "2", "1"], ["dp_old", "2", "16"]]
  assert rows[1][3:6] == ["10.00 (6.0-10.0)", "1 of 2", "1 of 2"] and rows[0][5] == "0 of 2"
  assert rows[0][6:] == ["-", "-", "-"] and rows[2][5] == "-"  # no bounds; no beam search
  for r in rows[2:]:
    k = f"x{r[2]}"
    assert float(r[6]) == pytest.approx(bounds["canary_group_epsilon"][k], rel=1e-3)
    assert float(r[7]) == pytest.approx(bounds["canary_exposure_bound"][k], abs=5e-3)
  assert plot.stat().st_size > 0
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "summary.json").write_text(json.dumps({"epsilon": 1.0}))
  with pytest.raises(SystemExit):
    script.main([str(tmp_path / "nondp"), str(tmp_path / "other")])
  assert "has no canaries" in capsys.readouterr().err


def test_beam_search_returns_the_exhaustive_top_k_of_a_separable_model():
  """With a loss that adds one term per character (the linear 'model'), every top-k secret's
  prefixes are among the top-k prefixes, so a beam of width k returns exactly the k best of all
  10^4 candidates, in order (the reference: every candidate scored in numpy)."""
  tok = ascii_tokenizer()
  loss_fn, params, w = _linear_lm(16)
  space = canaries.all_secrets(4)
  inputs = canaries.lm_windows(tok, canaries.fill("pin {} ok", space), 16)["inputs"]
  scores = (inputs.astype(np.float32) * w.astype(np.float32)).sum(-1)
  best = [space[i] for i in np.argsort(scores, kind="stable")]
  for k in (1, 7):
    got = canaries.beam_search_secrets(loss_fn, params, tok, "pin {} ok", digits=4, seq_len=16,
                                       beam=k, batch_size=64)
    assert got == best[:k]
  with pytest.raises(ValueError, match="beam must be a positive integer"):
    canaries.beam_search_secrets(loss_fn, params, tok, "pin {}", digits=4, seq_len=16, beam=0)
