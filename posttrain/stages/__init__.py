"""Stages: each wires data, model, loss and trainer for one step of a pipeline."""
