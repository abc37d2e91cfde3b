"""Rewards: rule-based scores now; reward models, preambles and WARM arrive with issue 5."""
