"""`apo-ray serve`: the trained policy and RM behind Ray Serve (requests, batching, targets, deployments, app)."""
