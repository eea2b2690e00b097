"""Training: state, sharded step, optimizer and schedules, loop, checkpoints, metrics, DPO."""
