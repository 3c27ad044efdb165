"""Ray actor classes: thin wrappers that hold models and call apo_ray's functions."""
