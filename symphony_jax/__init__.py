"""symphony-jax: KV-cache memory management for multi-turn LLM serving, in JAX.

Layers (imports only point down): ``pallas_kernels`` (attention kernels),
``symphony_jax.config`` and ``symphony_jax.memory`` (configs, block table, KV pool),
then model, scheduler, engine, cluster and simulator (README, "Layout").
"""

__version__ = "0.1.0"
