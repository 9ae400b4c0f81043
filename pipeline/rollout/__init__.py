"""The rollout stage: trajectories (trajectories.py) and preference pairs (pairs.py) sampled on
the engines (pipeline.engines)."""
