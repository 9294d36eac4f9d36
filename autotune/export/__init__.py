"""A plan as the config files other training tools read."""
