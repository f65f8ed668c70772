"""Layer 3: one node's serving engine (scheduler + model + sampling on one JAX device)."""
