"""Per-family adapters: where the blocks are, what they return, which modules are the expensive sites."""
