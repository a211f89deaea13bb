"""How a run lives: the rollout producer, the consumer of its batches, and the run's lifecycle."""
