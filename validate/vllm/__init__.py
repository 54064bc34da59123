"""Real vLLM (its CPU build) as a third executor: the simulator's runs served and measured."""
