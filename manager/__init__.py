"""The reference Manager: node registry, update records, pushes and staged rollouts."""
