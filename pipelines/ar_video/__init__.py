"""Autoregressive (Self-Forcing style) video generation with a KV cache."""
