"""Training: typed config, streamed cached views, optimiser and schedule, checkpoints, the loop."""
