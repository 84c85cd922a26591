"""Hand-written accelerator kernels (Pallas), each beside its jnp reference.

`kernels.dp_products`: the per-example squared norm of a sequence Dense layer's weight gradient
and the weighted clipped-sum product of book-keeping. `trustjax.privacy.ghost` calls the
dispatching functions, which run the kernels on GPU/TPU and the references on CPU.
"""

from kernels.dp_products import (seq_dense_sq_norms, seq_dense_sq_norms_pallas,
                                 seq_dense_sq_norms_reference, use_kernels, weighted_outer_sum,
                                 weighted_outer_sum_pallas, weighted_outer_sum_reference)
