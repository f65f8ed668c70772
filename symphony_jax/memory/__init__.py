"""Memory layer: the paged-KV block table (and, later, the KV pool and host tier)."""
