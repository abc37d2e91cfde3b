"""Policy optimisation machinery shared by the RL stages: rollouts, setup, training and plots."""
