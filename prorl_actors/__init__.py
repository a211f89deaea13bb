"""prorl-actors: prolonged RL (ProRL) for reasoning LLMs on long-lived Ray actors."""
__version__ = "0.1.0"
