"""How a run lives: the rollout producer (and, later, the fleet and the run lifecycle)."""
