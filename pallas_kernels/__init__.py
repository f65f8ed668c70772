"""Paged-attention kernels for GPU (Pallas) with pure-JAX references.

Layer 0 of symphony-jax: imports ``jax`` only, never ``symphony_jax``.
"""
