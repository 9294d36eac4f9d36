"""Planning: the search space, the Optuna search, alternatives, measured trials and the plan record."""
