"""Generation with per-request objective weights: every request in the batch has its own
mix of heads (logits sum_i w_i W_i h), so requests with different weights share one batch.

Left-padded batch, one KV cache, position ids from the attention mask (so padding does
not shift positions). `stream_tokens` yields each step's new tokens (for streaming
responses); `generate` collects them.
"""

from __future__ import annotations

from typing import Iterator

import torch
from transformers import DynamicCache


def eos_ids(tokenizer, config) -> set[int]:
    """The tokenizer's end of sequence and every one the model config names (chat models often list several)."""
    cfg_eos = config.eos_token_id
    return {tokenizer.eos_token_id} | (set(cfg_eos) if isinstance(cfg_eos, list) else {cfg_eos} - {None})


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy at temperature 0; else nucleus sampling. logits [B, V] -> [B]."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p  # always keeps the most likely token
        sp = sp * keep
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):], att[i, width - len(s):] = torch.tensor(s), 1
    return ids.to(device), att.to(device)


def mix_strategy(n_unique: int, n_heads_used: int, head_bytes: int, budget_bytes: int) -> str:
    """'merged' when the U distinct mixes' merged heads are no more to read per token than the
    heads in use (and fit the budget), else 'per_token'."""
    return "merged" if n_unique <= n_heads_used and n_unique * head_bytes <= budget_bytes else "per_token"


@torch.no_grad()
def stream_tokens(model, prompts: list[list[int]], weights: torch.Tensor, *, max_new_tokens: list[int] | int,
                  eos_ids: set[int], pad_id: int, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int | None = None, merge_budget_bytes: int = 2 << 30,
                  strategy: str = "auto") -> Iterator[list[int | None]]:
    """Yields, per decoding step, each request's new token (None once it has finished).

    Decoding reads every head it projects on, every token, so it takes whichever reads fewer:
    each distinct weight vector's merged head sum_i w_i W_i, built once (U heads for U distinct
    mixes: one projection per token for a batch that shares its weights), or the per-token
    mix of the H heads in use (when U exceeds them, e.g. every request its own weights, or
    when U merged heads would exceed `merge_budget_bytes`). Both give the same tokens.
    `strategy` ("merged" / "per_token") overrides the choice."""
    b = len(prompts)
    limits = torch.tensor([max_new_tokens] * b if isinstance(max_new_tokens, int) else max_new_tokens)
    gen = None if seed is None else torch.Generator(device="cpu").manual_seed(seed)
    dev = model.device
    ids, att = left_pad(prompts, pad_id, dev)
    w = weights.to(dev, dtype=model.heads.dtype)
    if strategy == "auto":
        strategy = mix_strategy(len(torch.unique(w, dim=0)), int((w != 0).any(0).sum()),
                                model.heads[0].numel() * model.heads.element_size(), merge_budget_bytes)
    if strategy == "merged":
        merged, rows = model.merge_rows(w)
        mix = {"head_ids": rows, "heads": merged}
    else:
        mix = {"weights": w}
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(ids, att, past_key_values=cache, use_cache=True, position_ids=pos, logits_to_keep=1, **mix)
    done = torch.zeros(b, dtype=torch.bool)
    for t in range(int(limits.max())):
        nxt = sample(out.logits[:, -1].float().cpu(), temperature, top_p, gen)
        step = [None if done[i] else int(nxt[i]) for i in range(b)]
        yield step
        done |= torch.tensor([x is not None and x in eos_ids for x in step]) | (t + 1 >= limits)
        if bool(done.all()):
            return
        nxt = torch.where(done, torch.tensor(pad_id), nxt)
        att = torch.cat([att, (~done).long().to(dev).unsqueeze(1)], 1)
        pos = pos[:, -1:] + 1
        out = model(nxt.to(dev).unsqueeze(1), att, past_key_values=cache, use_cache=True, position_ids=pos, **mix)


def generate(model, prompts: list[list[int]], weights: torch.Tensor, **kw) -> list[list[int]]:
    """New token ids per request (without the end-of-sequence token)."""
    out: list[list[int]] = [[] for _ in prompts]
    eos = kw["eos_ids"]
    for step in stream_tokens(model, prompts, weights, **kw):
        for i, x in enumerate(step):
            if x is not None and x not in eos:
                out[i].append(x)
    return out
