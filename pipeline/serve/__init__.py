"""Ray Serve application for the steerable policy (app.py)."""
