"""Training machinery shared by every stage: optimizers, the train step, checkpoints."""
