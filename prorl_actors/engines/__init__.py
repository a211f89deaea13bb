"""Backends behind small protocols: generation (vLLM | HF generate) and the torch policy."""
