"""Evaluation: metrics computed on sampled text (the language-error rate's language ID first)."""
