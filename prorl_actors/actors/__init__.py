"""One role per class. Each is a plain Python class that `ActorGroup` turns into Ray
actors, so the same code runs in-process in unit tests and remotely in a run."""
