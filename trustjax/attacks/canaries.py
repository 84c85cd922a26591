"""Canaries: secrets planted in a training set, and their exposure.

Reference: Carlini, Liu, Erlingsson, Kos and Song, "The Secret Sharer: Evaluating and Testing
Unintended Memorization in Neural Networks", USENIX Security 2019.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import jax
import numpy as np
from scipy import integrate, special, stats

from trustjax.data.batching import padded_batches
from trustjax.data.corpus import TextDataset


def make_secrets(num: int, *, digits: int = 4, seed: int = 0) -> list[str]:
  """`num` distinct random secrets of `digits` decimal digits (the canaries' random part)."""
  space = 10 ** digits
  if not 0 < num <= space:
    raise ValueError(f"num must lie in [1, {space}] for {digits} digits, got {num=}")
  picks = np.random.default_rng(seed).choice(space, size=num, replace=False)
  return [f"{int(p):0{digits}d}" for p in picks]


def all_secrets(digits: int) -> list[str]:
  """The whole secret space of `digits` decimal digits (exposure's reference set)."""
  if not 1 <= digits <= 6:
    raise ValueError(f"digits must lie in [1, 6] (10**digits candidates are scored), got {digits=}")
  return ["".join(t) for t in itertools.product("0123456789", repeat=digits)]


def fill(template: str, secrets: Sequence[str]) -> list[str]:
  """Canary texts: `template` with "{}" replaced by each secret."""
  if template.count("{}") != 1:
    raise ValueError(f"template must hold exactly one '{{}}', got {template!r}")
  return [template.format(s) for s in secrets]


def insert_canaries(dataset: TextDataset, texts: Sequence[str], labels: Sequence[int], *,
                    repeats: int = 1) -> tuple[TextDataset, np.ndarray]:
  """Appends every canary `repeats` times to `dataset`.

  Returns:
    (the new dataset, int [len(texts), repeats] the rows of each canary's copies).
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats=}")
  if len(texts) != len(labels) or not len(texts):
    raise ValueError(f"need as many canary labels as texts (at least one), got {len(texts)} "
                     f"texts and {len(labels)} labels")
  labels = np.asarray(labels, dataset.labels.dtype)
  if labels.min() < 0 or labels.max() >= dataset.num_classes:
    raise ValueError(f"canary labels must lie in [0, {dataset.num_classes})")
  n, k = len(dataset), len(texts)
  rows = n + np.arange(k * repeats).reshape(repeats, k).T
  extra = lambda v, fillv: None if v is None else np.concatenate(
      [v, np.full(k * repeats, fillv, v.dtype)])
  out = TextDataset(
      texts=list(dataset.texts) + list(texts) * repeats,
      labels=np.concatenate([dataset.labels, np.tile(labels, repeats)]),
      label_names=dataset.label_names,
      device_ids=extra(dataset.device_ids, -1),
      timestamps=extra(dataset.timestamps, np.nan),
      slots=None if dataset.slots is None else list(dataset.slots) + [[]] * (k * repeats))
  return out, rows


def exposure(secret_perplexity, reference_perplexities) -> float:
  """Exposure in bits, the rank form of Carlini et al. 2019 (Def. 4):
  log2 |R| - log2 rank(secret), where R is the candidate set (the references plus the secret)
  and rank 1 is the lowest perplexity (or loss).

  Ties are ranked against the secret (it is placed after every reference with the same value),
  so a flat model does not show exposure.

  Args:
    secret_perplexity: the model's perplexity (or any loss) on the inserted secret.
    reference_perplexities: [r] the same on the other candidates (not containing the secret).
  """
  ref = np.asarray(reference_perplexities, np.float64).reshape(-1)
  s = float(secret_perplexity)
  if not ref.size:
    raise ValueError("reference_perplexities is empty")
  if not (math.isfinite(s) and np.isfinite(ref).all()):
    raise ValueError("perplexities must be finite")
  rank = 1 + int((ref <= s).sum())
  return math.log2(ref.size + 1) - math.log2(rank)


def _skewnorm_logcdf(z: np.ndarray, shape: float) -> np.ndarray:
  """log CDF of the standard skew-normal: scipy's (accurate to float64's smallest numbers), and
  past its underflow the log of 2 * integral phi(t) Phi(shape t) over t < z by quadrature
  relative to the integrand's value at z."""
  out = np.asarray(stats.skewnorm.logcdf(z, shape), np.float64)
  for i in np.flatnonzero(~np.isfinite(out)):
    log_f = lambda t: stats.norm.logpdf(t) + special.log_ndtr(shape * t)
    top = log_f(z[i])
    rest = integrate.quad(lambda u: math.exp(log_f(z[i] - u) - top), 0.0, math.inf)[0]
    out[i] = math.log(2.0) + top + math.log(rest)
  return out


def extrapolated_exposure(secret_losses, reference_losses) -> np.ndarray:
  """Exposure by extrapolation, for secret spaces too big to score whole (Carlini et al. 2019,
  Sec. 4.3, "approximation by distribution modeling"): a skew-normal fitted by maximum likelihood
  to the losses of candidates drawn at random from the space (`scipy.stats.skewnorm.fit`), and
  each secret's exposure read as -log2 of the fitted CDF at its loss, an estimate of the rank
  form's log2 |R| - log2 rank over the whole space. Unlike the rank form it is not capped at
  log2 |R| (a loss below every sampled one still gets a finite value from the fitted tail), and
  it is only as good as the fit in that tail.

  Args:
    secret_losses: [s] the model's losses (or log-perplexities) on the inserted secrets.
    reference_losses: [r >= 100] the same on random candidates that were not inserted.

  Returns:
    float64 [s] exposures in bits.
  """
  ref = np.asarray(reference_losses, np.float64).reshape(-1)
  sec = np.asarray(secret_losses, np.float64).reshape(-1)
  if ref.size < 100:
    raise ValueError(f"a skew-normal fit needs at least 100 reference losses, got {ref.size}")
  if not (np.isfinite(ref).all() and np.isfinite(sec).all()):
    raise ValueError("losses must be finite")
  if ref.std() == 0:
    raise ValueError("the reference losses are all equal: nothing to fit")
  shape, loc, scale = stats.skewnorm.fit(ref)
  return -_skewnorm_logcdf((sec - loc) / scale, shape) / math.log(2.0)


_EXACT_BELOW = 2 ** 14  # exposure_bound sums rank by rank up to here

# Epsilons at which `exposure_bound` reads a privacy profile: every (eps, delta(eps)) pair is a
# valid guarantee, so a grid only loosens the bound; 0 and 600 log-spaced points to 700.
BOUND_EPSILONS = np.concatenate([[0.0], np.geomspace(1e-3, 700.0, 600)])


def exposure_bound(epsilons, deltas, references: int) -> dict[str, float]:
  """What (epsilon, delta)-DP for a canary's copies allows its rank exposure (`exposure`) to be.

  If the canary's secret had not been inserted, its rank among the N = references + 1 candidates
  would be uniform (it is a random draw from them) or worse (ties), so P[rank <= k] <= k / N;
  DP for the group of its copies turns that into P[rank <= k] <= F(k) = min(1, min_j
  e^eps_j k / N + delta_j) for the inserted one (the hypothesis-testing reading of DP; Carlini
  et al. 2019, Sec. 9, relate exposure to DP in the same way). Exposure falls with the rank, so
  its expectation is largest when rank has exactly the CDF F: the bound is sum_k (F(k) -
  F(k - 1)) log2(N / k), summed exactly below 2^14 candidates and bounded from above in blocks
  of 0.1% beyond (so spaces of 10^18 secrets take milliseconds). Without DP (delta 1) it is
  log2 N, the maximum; at (0, 0) it is chance.

  Args:
    epsilons, deltas: pairs (eps_j, delta_j), each a guarantee the run meets for the group of the
      canary's copies (`PrivacyLedger.group_deltas` at `BOUND_EPSILONS`, with truncation).
    references: candidates other than the secret (the reference set's size).

  Returns:
    {"mean": the bound on the expected exposure in bits, "rank_one": the bound on the
    probability that the secret ranks first, i.e. is the model's most likely completion}.
  """
  eps = np.asarray(epsilons, np.float64).reshape(-1)
  dlt = np.asarray(deltas, np.float64).reshape(-1)
  if eps.shape != dlt.shape or not eps.size:
    raise ValueError(f"need as many deltas as epsilons (at least one), got {eps.size} and "
                     f"{dlt.size}")
  if np.any(eps < 0) or np.any(dlt < 0) or np.any(dlt > 1) or np.isnan(eps).any():
    raise ValueError("epsilons must be >= 0 and deltas in [0, 1]")
  if int(references) != references or references < 1:
    raise ValueError(f"references must be a positive integer, got {references=}")
  n = int(references) + 1
  # Summation by parts: E = sum_{k=1}^{N-1} F(k) log2(1 + 1/k). F rises while the weights
  # telescope, so a block a <= k < b adds at most F(b - 1) log2(b / a): blocks of one below
  # 2^14 (exact), then blocks growing by 0.1% to N (an upper bound, looser by less than F's rise
  # over a block; spaces of 10^18 take about 4 * 10^4 blocks).
  edges = np.arange(1, min(n, _EXACT_BELOW) + 1, dtype=np.float64)
  if n > _EXACT_BELOW:
    grown = np.unique(np.round(np.geomspace(_EXACT_BELOW, n, 2 + int(
        math.log(n / _EXACT_BELOW) / math.log1p(1e-3)))))
    edges = np.concatenate([edges, grown[grown > _EXACT_BELOW]])
  ends = edges[1:] - 1.0  # each block's last k
  cdf = np.ones(ends.size)
  rank_one = 1.0
  for e, d in zip(eps, dlt):
    if d < 1 and e < 700:
      np.minimum(cdf, math.exp(e) * ends / n + d, out=cdf)
      rank_one = min(rank_one, math.exp(e) / n + d)
  return {"mean": float(cdf @ np.log2(edges[1:] / edges[:-1])), "rank_one": float(rank_one)}


def chance_exposure(candidates: int) -> float:
  """The mean rank exposure of a secret the model knows nothing about, ranked uniformly among
  `candidates` N (itself included): the mean of log2(N / k) over k = 1 .. N, log2 N - log2(N!) / N
  (1 / ln 2 = 1.4427 bits as N grows)."""
  if int(candidates) != candidates or candidates < 1:
    raise ValueError(f"candidates must be a positive integer, got {candidates=}")
  n = int(candidates)
  return math.log2(n) - math.lgamma(n + 1) / (n * math.log(2.0))


def lm_windows(tokenizer, texts: Sequence[str], seq_len: int) -> dict[str, np.ndarray]:
  """One next-token window per text, as `data.lm_examples` cuts a role's stream: inputs are tokens
  0..L-1, targets 1..L, the rest padded (target_mask False); a character tokenizer's text ends
  with "\n", as every speech does. A text longer than seq_len + 1 tokens is an error.

  Returns {"inputs": int32 [n, L], "targets": int32 [n, L], "target_mask": bool [n, L]}."""
  n = len(texts)
  out = {"inputs": np.zeros((n, seq_len), np.int32), "targets": np.zeros((n, seq_len), np.int32),
         "target_mask": np.zeros((n, seq_len), bool)}
  for i, text in enumerate(texts):
    toks = tokenizer.split(text + "\n") if tokenizer.kind == "char" else tokenizer.split(text)
    ids = np.asarray([tokenizer.token_id(t) for t in toks], np.int32)
    if not 2 <= len(ids) <= seq_len + 1:
      raise ValueError(f"canary {text!r} has {len(ids)} tokens; a window holds 2 to "
                       f"{seq_len + 1}")
    out["inputs"][i, :len(ids) - 1] = ids[:-1]
    out["targets"][i, :len(ids) - 1] = ids[1:]
    out["target_mask"][i, :len(ids) - 1] = True
  return out


def _window_losses(step: Callable, params, windows: dict, batch_size: int) -> np.ndarray:
  """float64 [n]: the jitted per-window loss `step` of each of `windows`' n rows, in batches of
  `batch_size` (the last one padded, its padding dropped)."""
  return np.concatenate([np.asarray(step(params, b), np.float64)[b["mask"]]
                         for b in padded_batches(windows, batch_size)])


def lm_exposures(loss_fn: Callable, params, tokenizer, template: str, secrets: Sequence[str], *,
                 digits: int, seq_len: int, batch_size: int = 1024, references: int = 0,
                 seed: int = 0) -> np.ndarray:
  """Each inserted secret's exposure in a language model (Carlini et al. 2019, Sec. 4), scored
  by `loss_fn` (the model's per-window mean next-token loss: every candidate has the same number
  of tokens, so this ranks as the log-perplexity does).

  references=0 (the rank form): every candidate secret of `digits` digits (at most 6) is filled
  into `template` and scored, and a secret's rank is among the candidates that were not inserted
  (the other canaries' secrets are left out of every reference set). references=R > 0
  (extrapolation, `extrapolated_exposure`; up to 18 digits): R candidates drawn at random without
  replacement (stream `seed`) from those not inserted are scored instead, and a skew-normal fitted
  to their losses gives each secret's exposure.

  Returns float64 [len(secrets)] exposures in bits (the rank form's at most log2 of the
  references + 1; about 1/ln 2 = 1.44 on average for a model that learned nothing about them)."""
  if not len(secrets) or any(len(s) != digits or not s.isdigit() for s in secrets):
    raise ValueError(f"secrets must be {digits}-digit strings (at least one), got "
                     f"{[s for s in secrets if len(s) != digits or not s.isdigit()] or secrets}")
  step = jax.jit(loss_fn)
  losses = lambda texts: _window_losses(step, params, lm_windows(
      tokenizer, fill(template, texts), seq_len), batch_size)
  if references:
    return extrapolated_exposure(losses(list(secrets)), losses(sample_candidates(
        references, digits=digits, exclude=secrets, seed=seed)))
  candidates = all_secrets(digits)
  index = {c: i for i, c in enumerate(candidates)}
  scores = losses(candidates)
  inserted = np.zeros(len(candidates), bool)
  inserted[[index[s] for s in secrets]] = True
  refs = scores[~inserted]
  return np.asarray([exposure(scores[index[s]], refs) for s in secrets])


def beam_search_secrets(loss_fn: Callable, params, tokenizer, template: str, *, digits: int,
                        seq_len: int, beam: int, batch_size: int = 1024) -> list[str]:
  """Extraction by search (Carlini et al. 2019, Sec. 8, whose exact shortest-path search this
  approximates): the model's `beam` most likely secrets of `digits` digits after the template's
  prefix, found digit by digit. Each partial secret is scored by `loss_fn` on the template's text
  up to it (the prefix and the partial digits, no end of line), the `beam` best are extended by
  every digit, and the complete candidates are scored in the whole template, as `lm_exposures`
  scores them. With beam >= 10^(digits - 1) the search is exhaustive.

  Returns the final beam, best first (at most `beam` secrets)."""
  if not 1 <= digits <= 18:
    raise ValueError(f"digits must lie in [1, 18], got {digits=}")
  if int(beam) != beam or beam < 1:
    raise ValueError(f"beam must be a positive integer, got {beam=}")
  fill(template, ["0"])  # exactly one "{}"
  step = jax.jit(loss_fn)
  head = template[:template.index("{}")]

  def losses(texts, partial):
    windows = lm_windows(tokenizer, texts, seq_len)
    if partial and tokenizer.kind == "char":  # drop the end of line lm_windows adds
      last = windows["target_mask"].sum(1) - 1
      windows["target_mask"][np.arange(len(texts)), last] = False
    return _window_losses(step, params, windows, batch_size)

  kept = [""]
  for j in range(digits):
    grown = [p + c for p in kept for c in "0123456789"]
    complete = j == digits - 1
    scores = losses(fill(template, grown) if complete else [head + g for g in grown],
                    not complete)
    order = np.argsort(scores, kind="stable")[:beam]
    kept = [grown[i] for i in order]
  return kept


def sample_candidates(num: int, *, digits: int, exclude: Sequence[str] = (),
                      seed: int = 0) -> list[str]:
  """`num` distinct random secrets of `digits` digits (at most 18) outside `exclude`: the
  reference sample of exposure by extrapolation."""
  if not 1 <= digits <= 18:
    raise ValueError(f"digits must lie in [1, 18], got {digits=}")
  space, skip = 10 ** digits, {int(s) for s in exclude}
  if not 100 <= num <= space - len(skip):
    raise ValueError(f"references must lie in [100, {space - len(skip)}] (the candidates not "
                     f"inserted), got {num}")
  rng = np.random.default_rng([seed, 1])
  picks = [int(p) for p in rng.choice(space, size=min(space, num + len(skip)), replace=False)
           if int(p) not in skip]
  return [f"{p:0{digits}d}" for p in picks[:num]]
