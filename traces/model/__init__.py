"""Loading a real model: where it comes from, GGUF conversion cache, device, threads, loader."""
