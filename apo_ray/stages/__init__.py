"""`apo-ray sft` and `apo-ray rm`: the offline stages before the game, as Ray Train jobs (cursor, task, worker,
runner, cli)."""
