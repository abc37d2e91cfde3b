"""Policy optimisation machinery shared by the RL stages: rollouts and their plots."""
