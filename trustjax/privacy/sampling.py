"""Poisson sampling with static shapes.

Each step includes every example independently with probability q (the sampling the privacy
accountant assumes). The realised batch size varies; batches are padded to `max_batch_size` with
`mask`, so the DP step compiles once.

Overflow. If a draw has more than `max_batch_size` examples, a uniformly random subset of
`max_batch_size` of them is kept and the rest are dropped (counted in `PoissonBatch.overflow`).
This truncated mechanism differs from the untruncated one only on the overflow event, so by a
coupling argument an (eps, delta) guarantee for Poisson sampling becomes
(eps, delta + (1 + e^eps) * sum_t p_t) for the truncated run, where p_t = P[Binomial(N + 1, q) >
max_batch_size] (taken at N + 1, the larger neighbour). `accounting.PrivacyLedger` records p_t for
every step and reports the total delta. `default_max_batch_size` picks a bound whose overflow
probability is negligible (1e-12 per run by default).

Cyclic Poisson sampling (`cyclic_poisson_batch`, for amplified DP-MF). Every example is put in
one of `groups` groups, independently and uniformly at random (once per run, from the seed), and
step t samples only group t mod groups, each of its examples independently with probability q:
an example can be in steps g, g + groups, g + 2 groups, ... only. The realised batch size is
Binomial(N, q / groups) over the assignment and the sampling together, so the overflow bound is
`overflow_probability(N, q / groups, max_batch_size)`.

References: Chua et al., "Scalable DP-SGD: Shuffling vs. Poisson Subsampling", NeurIPS 2024
(truncated Poisson subsampling with static shapes); Choquette-Choo, Ganesh, McKenna, McMahan,
Rush, Thakurta and Xu, "(Amplified) Banded Matrix Factorization: A unified approach to private
training", NeurIPS 2023 (cyclic Poisson sampling).
"""

from __future__ import annotations

import functools
import math
from typing import Iterator, NamedTuple

import numpy as np
import scipy.stats


class PoissonBatch(NamedTuple):
  indices: np.ndarray  # int32 [max_batch_size]; rows where mask is False are padding
  mask: np.ndarray  # bool [max_batch_size]
  size: int  # realised (kept) batch size
  overflow: int  # examples sampled but dropped because size exceeded max_batch_size


def _check(num_examples: int, sampling_rate: float, max_batch_size: int | None = None):
  if num_examples <= 0:
    raise ValueError(f"num_examples must be positive (empty dataset?), got {num_examples=}")
  if not 0.0 < sampling_rate <= 1.0:
    raise ValueError(f"sampling_rate must lie in (0, 1], got {sampling_rate=}")
  if max_batch_size is not None and max_batch_size <= 0:
    raise ValueError(f"max_batch_size must be positive, got {max_batch_size=}")


def overflow_probability(num_examples: int, sampling_rate: float, max_batch_size: int) -> float:
  """P[Binomial(num_examples + 1, q) > max_batch_size]: per-step overflow bound (larger neighbour)."""
  _check(num_examples, sampling_rate, max_batch_size)
  return float(scipy.stats.binom.sf(max_batch_size, num_examples + 1, sampling_rate))


def default_max_batch_size(num_examples: int, sampling_rate: float, num_steps: int, *,
                           total_overflow_probability: float = 1e-12, multiple_of: int = 8) -> int:
  """Smallest multiple of `multiple_of` whose overflow probability over `num_steps` steps is at most
  `total_overflow_probability`."""
  _check(num_examples, sampling_rate)
  mean = num_examples * sampling_rate
  b = max(1, int(mean))
  per_step = total_overflow_probability / max(num_steps, 1)
  step = max(1, int(math.sqrt(mean)) // 4)
  while b < num_examples + 1 and overflow_probability(num_examples, sampling_rate, b) > per_step:
    b += step
  b = min(b, num_examples + 1)
  return int(-(-b // multiple_of) * multiple_of)


def poisson_batch(seed: int, step: int, num_examples: int, sampling_rate: float,
                  max_batch_size: int) -> PoissonBatch:
  """The Poisson sample of step `step`: a pure function of (seed, step), so runs resume exactly.

  Drawing the size from Binomial(N, q) and then a uniform subset of that size has exactly the
  distribution of independent inclusion with probability q.
  """
  _check(num_examples, sampling_rate, max_batch_size)
  return _padded_sample(np.random.default_rng([seed, step]), num_examples, sampling_rate,
                        max_batch_size)


def _padded_sample(rng: np.random.Generator, population, sampling_rate: float,
                   max_batch_size: int) -> PoissonBatch:
  """Each of `population` (a count N, meaning 0 .. N - 1, or an index array) with probability
  q, padded to max_batch_size (a uniformly random subset kept on overflow)."""
  size = int(rng.binomial(population if np.ndim(population) == 0 else len(population),
                          sampling_rate))
  kept = min(size, max_batch_size)
  idx = np.zeros(max_batch_size, np.int32)
  idx[:kept] = np.sort(rng.choice(population, size=kept, replace=False))
  mask = np.zeros(max_batch_size, bool)
  mask[:kept] = True
  return PoissonBatch(idx, mask, kept, size - kept)


def poisson_batches(rng: int, num_examples: int, sampling_rate: float, max_batch_size: int, *,
                    start_step: int = 0, num_steps: int | None = None) -> Iterator[PoissonBatch]:
  """Yields Poisson-sampled padded index batches for steps start_step, start_step + 1, ...

  Args:
    rng: integer seed; step t's sample depends only on (rng, t).
    num_examples: N.
    sampling_rate: q in (0, 1].
    max_batch_size: static padded batch size (see the module docstring for overflow).
    start_step: first step (for resume).
    num_steps: number of batches; None = forever.
  """
  _check(num_examples, sampling_rate, max_batch_size)
  step = start_step
  while num_steps is None or step < start_step + num_steps:
    yield poisson_batch(rng, step, num_examples, sampling_rate, max_batch_size)
    step += 1


@functools.lru_cache(maxsize=4)
def cyclic_groups(seed: int, num_examples: int, groups: int) -> np.ndarray:
  """Each example's group (int32 [num_examples], uniform on 0 .. groups - 1, independent):
  a pure function of the seed, drawn from a stream no step's sample uses. Read-only."""
  if groups < 1 or int(groups) != groups:
    raise ValueError(f"groups must be a positive integer, got {groups=}")
  _check(num_examples, 1.0)
  out = np.random.default_rng([seed, 0, int(groups)]).integers(0, groups, num_examples,
                                                                dtype=np.int32)
  out.flags.writeable = False
  return out


def cyclic_poisson_batch(seed: int, step: int, num_examples: int, sampling_rate: float,
                         groups: int, max_batch_size: int) -> PoissonBatch:
  """Step `step`'s cyclic Poisson sample: each example of group step mod `groups`
  (`cyclic_groups`) independently with probability `sampling_rate`, padded as `poisson_batch`'s
  (a uniformly random subset of max_batch_size kept on overflow). A pure function of
  (seed, step)."""
  _check(num_examples, sampling_rate, max_batch_size)
  members = np.flatnonzero(cyclic_groups(seed, num_examples, groups) == step % groups)
  return _padded_sample(np.random.default_rng([seed, step]), members, sampling_rate,
                        max_batch_size)
