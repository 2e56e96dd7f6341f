"""Model-family adapters for diffusers models, generation loops diffusers lacks, and the reference models."""
