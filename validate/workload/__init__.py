"""Workload-only traces (Mooncake, Azure, BurstGPT, token ids) made runnable on the real engine."""
