"""memshare core: block pool, policies, sketches and metrics (numpy + stdlib only)."""

__version__ = "0.1.0"
