"""posttrain: a JAX post-training toolkit for Gemma-family language models."""

__version__ = "0.1.0"
