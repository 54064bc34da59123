"""Validation on a real model with a paged KV engine on torch (later issue)."""
