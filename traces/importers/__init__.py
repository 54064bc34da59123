"""Workload importers (Mooncake, Azure LLM 2023, BurstGPT) into workload-only traces."""
