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


Generators = torch.Generator | list[torch.Generator] | None


def row_generators(seeds: list[int | None]) -> list[torch.Generator]:
    """One generator per row, so a row's draws depend on its own seed only, not on its batch.
    An unseeded row gets a fresh random seed (its own stream all the same)."""
    gens = []
    for s in seeds:
        g = torch.Generator(device="cpu")
        if s is None:
            g.seed()
        else:
            g.manual_seed(s)
        gens.append(g)
    return gens


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: Generators) -> torch.Tensor:
    """Greedy at temperature 0; else nucleus sampling. logits [B, V] -> [B]. `generator`: one for the
    whole batch, or a list of one per row (each row drawn from its own)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p  # always keeps the most likely token
        sp = sp * keep
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    probs = probs / probs.sum(-1, keepdim=True)
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):], att[i, width - len(s):] = torch.tensor(s), 1
    return ids.to(device), att.to(device)


_U = 2.0 ** -8  # bfloat16's unit roundoff


def screen_copy(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A bfloat16 copy of heads [M, V, D] and their rows' float32 norms [M, V], for screened_tokens."""
    return W.to(torch.bfloat16), W.float().norm(dim=-1)


def screened_tokens(h: torch.Tensor, W: torch.Tensor, coef: torch.Tensor, low: torch.Tensor, norms: torch.Tensor,
                    temperature: float, generator: Generators) -> torch.Tensor:
    """The next token of each row under the exact mixed logits z_b = sum_m coef_bm W_m h_b: the argmax of
    z (temperature 0) or of z / T + Gumbel noise (a sample of softmax(z / T)), found while reading the
    heads in bfloat16, half the bytes of float32. The bf16 pass is off by at most
    c ||h_b|| sum_m |coef_bm| ||W_mv|| per token v (rounding of h and W, float32 accumulation); every v
    whose bound reaches the best lower bound is recomputed exactly, so the token is the float32 one.
    h [B, D], W [M, V, D] (float32), coef [B, M]; low, norms from screen_copy(W); `generator` as in sample."""
    used = [m for m in range(W.shape[0]) if bool((coef[:, m] != 0).any())]
    hf, cf = h.float(), coef.float()
    hl = h.to(low.dtype)
    approx = sum(cf[:, m, None] * (hl @ low[m].T).float() for m in used)
    c = 2 * _U + _U ** 2 + 2 * h.shape[-1] * 2.0 ** -24
    slack = c * hf.norm(dim=-1, keepdim=True) * (cf[:, used].abs() @ norms[used])
    if temperature > 0:
        if isinstance(generator, list):  # each row's noise from its own generator
            g = torch.stack([torch.empty(approx.shape[-1], dtype=torch.float32).exponential_(generator=r)
                             for r in generator])
        else:
            g = torch.empty(approx.shape, dtype=torch.float32).exponential_(generator=generator)
        g = -g.log().to(h.device)
        score, slack = approx / temperature + g, slack / temperature
    else:
        g, score = None, approx
    floor = (score - slack).max(-1, keepdim=True).values
    out = []
    for b in range(h.shape[0]):
        idx = (score[b] + slack[b] >= floor[b]).nonzero().squeeze(1)  # a handful of tokens, not the vocabulary
        exact = sum(cf[b, m] * (W[m].index_select(0, idx).float() @ hf[b]) for m in used)
        out.append(idx[(exact / temperature + g[b, idx] if g is not None else exact).argmax()])
    return torch.stack(out).cpu()


def can_screen(W: torch.Tensor, top_p: float) -> bool:
    """Screening needs float32 heads (bf16 halves what is read), the whole distribution (top_p 1: the
    Gumbel trick samples without it), float32 accumulation of bf16 products (CUDA may reduce in bf16)
    and bf16 units: without them (an AVX2-only CPU) a bf16 matmul is ~100x slower than the float32 one."""
    from pipeline.models.precision import fast_bf16

    return W.dtype == torch.float32 and top_p >= 1.0 and fast_bf16(W.device) and (
        W.device.type == "cpu" or not torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction)


def mix_strategy(n_unique: int, n_heads_used: int, head_bytes: int, budget_bytes: int) -> str:
    """'merged' when the U distinct mixes' merged heads are no more to read per token than the
    heads in use (and fit the budget), else 'per_token'."""
    return "merged" if n_unique <= n_heads_used and n_unique * head_bytes <= budget_bytes else "per_token"


@torch.no_grad()
def stream_tokens(model, prompts: list[list[int]], weights: torch.Tensor, *, max_new_tokens: list[int] | int,
                  eos_ids: set[int], pad_id: int, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int | None = None, seeds: list[int | None] | None = None, merge_budget_bytes: int = 2 << 30,
                  strategy: str = "auto") -> Iterator[list[int | None]]:
    """Yields, per decoding step, each request's new token (None once it has finished).

    Decoding reads every head it projects on, every token, so it takes whichever reads fewer:
    each distinct weight vector's merged head sum_i w_i W_i, built once (U heads for U distinct
    mixes: one projection per token for a batch that shares its weights), or the per-token
    mix of the H heads in use (when U exceeds them, e.g. every request its own weights, or
    when U merged heads would exceed `merge_budget_bytes`). Both give the same tokens.
    `strategy` ("merged" / "per_token") overrides the choice. With float32 heads and top_p 1 the
    projection reads them in bfloat16 and recomputes the few tokens that could win exactly
    (`screened_tokens`): the same tokens as float32, half the bytes per step; sampling then uses
    Gumbel noise from `seed` (with top_p < 1, nucleus sampling on the float32 logits).
    `seeds` (one per row, None: a fresh random seed) gives each row its own generator, so a row's
    tokens depend only on its prompt, weights, settings and seed, never on the rest of its batch
    (the server's per-request seeds); `seed` is one stream for the whole batch (exclusive with `seeds`)."""
    b = len(prompts)
    limits = torch.tensor([max_new_tokens] * b if isinstance(max_new_tokens, int) else max_new_tokens)
    if seeds is not None:
        if seed is not None or len(seeds) != b:
            raise ValueError(f"seeds: give either `seed` or one seed per prompt ({len(seeds)} seeds, {b} prompts)")
        gen: Generators = row_generators(seeds)
    else:
        gen = None if seed is None else torch.Generator(device="cpu").manual_seed(seed)
    dev = model.device
    ids, att = left_pad(prompts, pad_id, dev)
    w = weights.to(dev, dtype=model.heads.dtype)
    if strategy == "auto":
        strategy = mix_strategy(len(torch.unique(w, dim=0)), int((w != 0).any(0).sum()),
                                model.heads[0].numel() * model.heads.element_size(), merge_budget_bytes)
    if strategy == "merged":  # W: the U merged heads, each row on its own
        W, rows = model.merge_rows(w)
        coef = torch.nn.functional.one_hot(rows, W.shape[0]).to(w.dtype)
    else:  # W: the H heads, mixed per row
        W, coef = model.heads.detach(), w
    screen = None
    if can_screen(W, top_p):
        if strategy == "merged":  # this batch's merged heads
            screen = screen_copy(W)
        else:  # the model's own heads: converted once per model (and again if they change), not per batch
            key = (W.data_ptr(), W._version)
            if getattr(model, "_screen", (None,))[0] != key:
                model._screen = (key, screen_copy(W))
            screen = model._screen[1]

    def next_tokens(h: torch.Tensor) -> torch.Tensor:
        if screen is not None:
            return screened_tokens(h, W, coef, *screen, temperature, gen)
        logits = sum(coef[:, m, None] * (h @ W[m].T) for m in range(W.shape[0]) if bool((coef[:, m] != 0).any()))
        return sample(logits.float().cpu(), temperature, top_p, gen)

    pos = (att.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    h = model.hidden(ids, att, past_key_values=cache, use_cache=True, position_ids=pos).last_hidden_state[:, -1]
    done = torch.zeros(b, dtype=torch.bool)
    for t in range(int(limits.max())):
        nxt = next_tokens(h)
        step = [None if done[i] else int(nxt[i]) for i in range(b)]
        yield step
        done |= torch.tensor([x is not None and x in eos_ids for x in step]) | (t + 1 >= limits)
        if bool(done.all()):
            return
        nxt = torch.where(done, torch.tensor(pad_id), nxt)
        att = torch.cat([att, (~done).long().to(dev).unsqueeze(1)], 1)
        pos = pos[:, -1:] + 1
        h = model.hidden(nxt.to(dev).unsqueeze(1), att, past_key_values=cache, use_cache=True,
                         position_ids=pos).last_hidden_state[:, -1]


def generate(model, prompts: list[list[int]], weights: torch.Tensor, **kw) -> list[list[int]]:
    """New token ids per request (without the end-of-sequence token)."""
    out: list[list[int]] = [[] for _ in prompts]
    eos = kw["eos_ids"]
    for step in stream_tokens(model, prompts, weights, **kw):
        for i, x in enumerate(step):
            if x is not None and x not in eos:
                out[i].append(x)
    return out
