"""Layer 2: a Llama-family decoder over the paged KV pool, and its weights."""
