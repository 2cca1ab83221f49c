"""DSpark on vLLM's V2 model runner (the CUDA default): our speculator and budget policy."""
