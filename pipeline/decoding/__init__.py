"""Steerable decoding of the multi-head policy: per-request head weights (mixing.py) and
PRM-guided decoding with a continuing KV cache (guided.py)."""
