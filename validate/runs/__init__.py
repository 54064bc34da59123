"""What ``memshare validate`` measures: the simulator's run folders, and workload-only traces
(Mooncake, Azure, BurstGPT, token ids) made runnable on the real engine with token ids."""
