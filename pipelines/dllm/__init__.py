"""Diffusion language models (LLaDA, Dream): model classes, generation and KV caching."""
