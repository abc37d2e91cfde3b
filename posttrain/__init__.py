"""posttrain: a JAX post-training toolkit for Gemma-family language models."""

from posttrain.checkpoints import load_hf_model
from posttrain.models import Model

__all__ = ["Model", "load_hf_model"]
__version__ = "0.1.0"
