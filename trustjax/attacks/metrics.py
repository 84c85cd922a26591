"""How well an attack's scores separate members from non-members, and what that says about epsilon.

Host-side numpy in float64 (attack scores are small arrays); arguments follow scikit-learn's order
`(labels, scores)`, with "higher score = more likely a member".
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from trustjax.stats import check_binary_scores, roc_auc, roc_curve  # pylint: disable=unused-import


def tpr_at_fpr(is_member, scores, fpr: float) -> float:
  """The highest true-positive rate over thresholds whose false-positive rate is <= `fpr`
  (the low-FPR operating point that Carlini et al. 2022 argue MIAs should report)."""
  if not 0.0 <= fpr <= 1.0:
    raise ValueError(f"fpr must lie in [0, 1], got {fpr=}")
  f, t, _ = roc_curve(is_member, scores)
  return float(t[f <= fpr].max())


def clopper_pearson(successes: np.ndarray, trials: np.ndarray, confidence: float):
  """Two-sided Clopper-Pearson interval (lower, upper) for a binomial proportion, elementwise."""
  k, n = np.asarray(successes, np.float64), np.asarray(trials, np.float64)
  a = (1.0 - confidence) / 2
  with np.errstate(invalid="ignore"):
    lo = np.where(k > 0, stats.beta.ppf(a, k, n - k + 1), 0.0)
    hi = np.where(k < n, stats.beta.ppf(1 - a, k + 1, n - k), 1.0)
  return lo, hi


def _epsilon_bounds(is_member, scores, delta: float, confidence: float):
  """Per threshold of the ROC curve: the epsilon lower bound from upper confidence limits on
  the false-positive and false-negative rates."""
  y, s = check_binary_scores(is_member, scores)
  f, t, thr = roc_curve(y, s)
  n0, n1 = (~y).sum(), y.sum()
  fp, fn = np.rint(f * n0), np.rint((1.0 - t) * n1)
  _, fpr_hi = clopper_pearson(fp, np.full_like(fp, n0), confidence)
  _, fnr_hi = clopper_pearson(fn, np.full_like(fn, n1), confidence)
  with np.errstate(divide="ignore", invalid="ignore"):
    a = np.log(np.maximum(1.0 - delta - fpr_hi, 0.0) / fnr_hi)
    b = np.log(np.maximum(1.0 - delta - fnr_hi, 0.0) / fpr_hi)
  eps = np.nan_to_num(np.maximum(a, b), nan=0.0, neginf=0.0, posinf=0.0)
  return np.maximum(eps, 0.0), thr


def empirical_epsilon_lower_bound(is_member, scores, *, delta: float = 0.0,
                                  confidence: float = 0.95,
                                  threshold: float | None = None) -> float:
  """A statistical lower bound on epsilon from an attack's errors (Jagielski et al., "Auditing
  Differentially Private Machine Learning: How Private is Private SGD?", NeurIPS 2020).

  An (epsilon, delta)-DP mechanism forces every membership test to satisfy
  FPR + e^eps FNR >= 1 - delta and FNR + e^eps FPR >= 1 - delta. With upper Clopper-Pearson
  limits on both rates at `confidence`, eps >= log((1 - delta - FPR_hi) / FNR_hi) (and the
  symmetric term) holds with that confidence for the test "member iff score >= threshold".

  Args:
    is_member: bool [n], the truth.
    scores: float [n], higher = more likely a member.
    delta: the mechanism's delta.
    confidence: the confidence of the Clopper-Pearson limits.
    threshold: the test's threshold. Choose it on separate scores (`best_threshold`) for a valid
      bound. None takes the best threshold on these same scores, which is optimistic (a
      selection effect): report it only as a diagnostic.

  Returns:
    The bound (>= 0).

  The bound treats each score as an independent trial. Scores pooled over many examples of the
  same trained models are not independent, so on such pools it is an estimate in the spirit of
  the audit, not a certificate; a certificate needs one model per trial.
  """
  if not 0.0 <= delta < 1.0:
    raise ValueError(f"delta must lie in [0, 1), got {delta=}")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must lie in (0, 1), got {confidence=}")
  eps, thr = _epsilon_bounds(is_member, scores, delta, confidence)
  if threshold is None:
    return float(eps.max())
  # the ROC point of "score >= threshold": the last distinct score still >= threshold
  i = int(np.searchsorted(-thr, -threshold, side="right")) - 1
  return float(eps[max(i, 0)])


def best_threshold(is_member, scores, *, delta: float = 0.0, confidence: float = 0.95) -> float:
  """The threshold that maximises `empirical_epsilon_lower_bound` on these scores (to be applied
  to other scores)."""
  eps, thr = _epsilon_bounds(is_member, scores, delta, confidence)
  t = thr[int(np.argmax(eps))]
  return float(t) if math.isfinite(t) else float("inf")


def one_run_p_value(num_canaries: int, num_guesses: int, num_correct: int, epsilon: float,
                    delta: float) -> float:
  """The chance of `num_correct` or more correct membership guesses out of `num_guesses`, when
  each of `num_canaries` canaries was included independently with probability 1/2 in one run
  of an (epsilon, delta)-DP algorithm (Steinke, Nasr and Jagielski, "Privacy Auditing with One
  (1) Training Run", NeurIPS 2023, Theorem 3.3 with Proposition 5.7's delta term).

  With delta = 0 the correct guesses are dominated by Binomial(r, p), p = e^eps / (1 + e^eps),
  so the value is P[Binomial(r, p) >= v]; delta adds 2 m delta max_{i=1..v} P[v - i <=
  Binomial(r, p) < v] / i.
  """
  m, r, v = int(num_canaries), int(num_guesses), int(num_correct)
  if not 0 <= v <= r <= m:
    raise ValueError(f"need 0 <= num_correct <= num_guesses <= num_canaries, got {v=}, {r=}, "
                     f"{m=}")
  if epsilon < 0 or not 0.0 <= delta <= 1.0:
    raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon=}, {delta=}")
  p = 1.0 / (1.0 + math.exp(-epsilon))
  tail = float(stats.binom.sf(v - 1, r, p))  # P[B >= v]
  if delta == 0.0 or v == 0:
    return min(tail, 1.0)
  i = np.arange(1, v + 1)
  # P[v - i <= B < v] = P[B >= v - i] - P[B >= v], for i = 1..v
  window = stats.binom.sf(v - i - 1, r, p) - tail
  return min(tail + 2.0 * m * delta * float(np.max(window / i)), 1.0)


def one_run_epsilon_lower_bound(is_member, scores, *, delta: float, confidence: float = 0.95,
                                num_guesses=None, tol: float = 1e-6) -> float:
  """An epsilon lower bound from one trained model (Steinke, Nasr and Jagielski 2023): the
  auditor guesses "member" for the canaries with the k highest scores, and epsilon is ruled
  out where `one_run_p_value` of its correct guesses is at most 1 - confidence.

  Valid (at `confidence`) when every canary was included independently with probability 1/2
  and the scores depend on the trained model and public data only, never on which canaries
  were included (the loss of the model alone, for example; not shadow models whose training
  sets were drawn together with this one's).

  Args:
    is_member: bool [m], the truth.
    scores: float [m], higher = more likely a member.
    delta: the algorithm's delta.
    confidence: the bound's confidence.
    num_guesses: the k to try: an int, a sequence (the confidence is split over them,
      Bonferroni), or None for 1, 2, 4, ... up to m. Ties at the k-th score are all guessed.
    tol: the bisection's tolerance on epsilon.

  Returns:
    The largest epsilon the guesses rule out (>= 0).
  """
  y, s = check_binary_scores(is_member, scores)
  m = y.size
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must lie in (0, 1), got {confidence=}")
  if not 0.0 <= delta < 1.0:
    raise ValueError(f"delta must lie in [0, 1), got {delta=}")
  if num_guesses is None:
    ks = [2 ** j for j in range(int(math.log2(m)) + 1)]
  else:
    ks = [int(num_guesses)] if np.ndim(num_guesses) == 0 else [int(k) for k in num_guesses]
  if not ks or any(not 1 <= k <= m for k in ks):
    raise ValueError(f"num_guesses must lie in [1, {m}], got {num_guesses}")
  significance = (1.0 - confidence) / len(ks)
  desc = np.sort(s)[::-1]
  best = 0.0
  for k in ks:
    guessed = s >= desc[k - 1]
    r, v = int(guessed.sum()), int((guessed & y).sum())
    rejects = lambda e, r=r, v=v: one_run_p_value(m, r, v, e, delta) <= significance
    if not rejects(best):
      continue
    lo, hi = best, max(1.0, 2.0 * best)
    while rejects(hi):
      lo, hi = hi, 2.0 * hi
    while hi - lo > tol:
      mid = 0.5 * (lo + hi)
      lo, hi = (mid, hi) if rejects(mid) else (lo, mid)
    best = lo
  return float(best)
