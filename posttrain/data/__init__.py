"""Data: synthetic corpora the project generates itself (more loaders arrive with SFT)."""
