"""MAHALO on Ray: multi-objective alignment (MAH-DPO, vectorized PRMs, steerable serving)."""
