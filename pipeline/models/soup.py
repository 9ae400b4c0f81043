"""DPO soup: single-head policies (one per objective) merged by a weighted average of their
parameters. Used by evaluation and by anything that serves a soup at a weight vector."""

from __future__ import annotations

import torch

from pipeline.models.checkpoint import load_tokenizer
from pipeline.models.multihead import MultiHeadPolicy


def merge_soup(dirs: list[str], weights: list[float], out_dir: str | None = None) -> MultiHeadPolicy:
    """DPO soup: the weighted average of single-head policies' parameters (one per objective)."""
    from pipeline.models.multihead import validate_weights

    w = validate_weights(weights, [str(i) for i in range(len(dirs))])
    models = [MultiHeadPolicy.load(d) for d in dirs]
    merged = models[0]
    states = [m.state_dict() for m in models]
    with torch.no_grad():
        avg = {k: sum(wi * s[k].float() for wi, s in zip(w, states)).to(states[0][k].dtype) for k in states[0]}
    merged.load_state_dict(avg)
    if out_dir:
        merged.save(out_dir, tokenizer=load_tokenizer(dirs[0]))
    return merged
