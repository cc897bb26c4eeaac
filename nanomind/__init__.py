"""nanomind: train a small language model from scratch, end to end, on one machine."""

__version__ = "0.1.0"
