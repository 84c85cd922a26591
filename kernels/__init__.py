"""Hand-written accelerator kernels (Pallas), each beside its jnp reference.

Empty so far: the per-example-norm and weighted clipped-sum kernels belong to the eDP-SGD work
(ghost clipping and book-keeping), which has not landed yet. The library runs everything through
jnp/XLA until then.
"""
