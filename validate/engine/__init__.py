"""The paged KV engine: the real model over a page store, driven by the core scheduler."""
