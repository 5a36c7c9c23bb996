"""What neuronserve knows about model families and tasks, and the artifact contract."""
