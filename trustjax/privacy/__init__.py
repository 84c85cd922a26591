"""Differential privacy: per-example clipping, noise, Poisson sampling, accounting, DP-SGD,
DP-FTRL and DP-MF (also amplified by cyclic Poisson sampling)."""

from trustjax.privacy import accounting
from trustjax.privacy.clipping import check_rules, clipped_grad_sum, per_example_grads
from trustjax.privacy.dp_ftrl import (DPFTRLConfig, add_residual_noise, dp_ftrl_step,
                                      residual_noise)
from trustjax.privacy.dp_mf import (AmplifiedMFConfig, DPMFConfig, MFState, bsr_coefficients,
                                    correlated_noise, dp_mf_step)
from trustjax.privacy.dp_sgd import (DPConfig, VirtualBatch, dp_sgd_step, virtual_batch_accumulate,
                                     virtual_batch_apply, virtual_batch_init)
from trustjax.privacy.ghost import fallback_leaves
from trustjax.privacy.noise import privatize
from trustjax.privacy.sampling import (PoissonBatch, cyclic_poisson_batch, default_max_batch_size,
                                       overflow_probability, poisson_batch, poisson_batches)
