"""Hand-written accelerator kernels (Pallas), each beside its jnp reference.

Empty so far. Ghost clipping and book-keeping (`trustjax.privacy.ghost`) run as jnp einsums on
every backend; Pallas kernels for the sequence-Dense per-example norm and the weighted clipped-sum
product are planned, with the einsums as their references.
"""
