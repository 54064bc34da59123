"""Loading a real model: GGUF conversion cache, HF folders, tokenizer, device, dtype, threads."""
