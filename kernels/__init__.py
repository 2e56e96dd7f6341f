"""The reuse math: a plain-torch reference and a Triton kernel per op, one dispatcher (`_dispatch`)."""
