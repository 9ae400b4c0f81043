"""PRM-guided decoding as a batched step search on a generation engine (vLLM, or the transformers engine).

Every problem advances one step per round, all problems together:

    for each round, for every problem still running:
        the engine samples K candidate steps on prompt + accepted steps (token ids; vLLM's prefix
        cache holds prompt + accepted steps from the round before, so they are not encoded again)
    the PRM scores every problem's candidates as the next step after its accepted steps (a running
    PRM cache per problem, PRMPrefix, by default; or all candidates of all problems in one padded
    batch, VectorPRM.score_next); each problem keeps its best candidate under the request's weights
    (`combine`, the choice guided_generate makes)

A candidate step ends where guided_generate's does: at the first token after which the decoded step
shows its boundary (`blank_lines`, `sentences`; `turn`: only the end of sequence), at the end of
sequence, or at the step's token budget. The engine gets stop strings that never fire before that
point (an early exit), and the step is cut at that token exactly. One difference from guided_generate:
a step that opens with a blank line ends there (vLLM's stop string fires; guided_generate ignores
leading newlines).

The policy runs at fixed weights in the engine (an ordinary checkpoint of the merged head,
MultiHeadPolicy.export_merged), so the engine needs no knowledge of heads. guided_generate
(pipeline.decoding.guided: one problem at a time on a continuing KV cache with tree attention) is the
reference this is tested against and the fallback (`guided.backend: transformers`).
"""

from __future__ import annotations

import torch

from pipeline.decoding.guided import BOUNDARIES, GuidedResult, PRMPrefix, _at_boundary, combine

# Stop strings that fire at or after the step's true boundary (never before it): an early exit only.
STOP_HINTS = {"blank_lines": ["\n\n"], "sentences": [". ", "! ", "? ", ".\n", "!\n", "?\n"], "turn": []}


def cut_step(tokenizer, tokens: list[int], boundary: str, eos: set[int], budget: int) -> list[int]:
    """The candidate step in `tokens` as guided_generate would have ended it: through the first token
    that is an end of sequence or after which the decoded text shows the boundary, else the first
    `budget` tokens."""
    out: list[int] = []
    for t in tokens[:budget]:
        out.append(t)
        if t in eos or _at_boundary(tokenizer.decode(out), boundary):
            break
    return out


def guided_search(engine, prm, prm_tokenizer, prompts: list[list[dict]], *, prm_weights: list[float],
                  candidates: int = 4, max_steps: int = 8, max_step_tokens: int = 64, max_new_tokens: int = 256,
                  boundary: str = "blank_lines", temperature: float = 0.7, top_p: float = 1.0, top_k: int = -1,
                  seeds: list[int] | None = None, eos: set[int] | None = None,
                  prm_batch_size: int = 32, prm_cache: bool = True) -> list[GuidedResult]:
    """One GuidedResult per prompt (token_ids without the end of sequence, steps, step_scores, finished).
    `engine` needs `tokenizer` and `sample_tokens` (VLLMEngine, TransformersEngine); `seeds`: one per
    prompt (each round's draws are seeded by it and the round, so a problem's search does not depend on
    the others in its batch on vLLM). `prm_cache`: the PRM keeps a running cache per problem (prompt +
    accepted steps, `PRMPrefix`, as guided_generate does) and encodes only each round's candidates, one
    forward per problem; off (or a PRM without a backbone to cache), all candidates of all problems go
    through one padded batch with their prefixes encoded again (`score_next`)."""
    from pipeline.data.hashing import stable_seed
    from pipeline.models.tokenize import prompt_ids

    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary {boundary!r}: use one of {BOUNDARIES}")
    tok = engine.tokenizer
    eos = eos if eos is not None else engine.eos_ids()
    heads = [prompt_ids(tok, p) for p in prompts]
    seeds = seeds if seeds is not None else list(range(len(prompts)))
    results = [GuidedResult(token_ids=[], steps=[]) for _ in prompts]
    caches: dict[int, PRMPrefix] = {}
    backbone = getattr(prm, "backbone", None)  # PRMPrefix needs a backbone that takes a 4D mask (tree attention)
    prm_cache = (prm_cache and isinstance(backbone, torch.nn.Module)
                 and getattr(backbone.config, "_attn_implementation", None) in ("sdpa", "eager"))
    for rnd in range(max_steps):
        active = [i for i, r in enumerate(results) if not r.finished and len(r.token_ids) < max_new_tokens]
        if not active:
            break
        budgets = [min(max_step_tokens, max_new_tokens - len(results[i].token_ids)) for i in active]
        samples = engine.sample_tokens(
            [heads[i] + results[i].token_ids for i in active], n=candidates, temperature=temperature, top_p=top_p,
            top_k=top_k, stop=STOP_HINTS[boundary], seeds=[stable_seed(seeds[i], "guided", rnd) for i in active],
            max_tokens=budgets)
        steps = [[cut_step(tok, s, boundary, eos, b) for s in outs] for outs, b in zip(samples, budgets)]
        texts = [[tok.decode([x for x in s if x not in eos]).strip() for s in cands] for cands in steps]
        if prm_cache:
            for i in active:
                if i not in caches:
                    caches[i] = PRMPrefix(prm, prm_tokenizer, prompts[i])
            raw = torch.cat([caches[i].score(ts) for i, ts in zip(active, texts)])
        else:
            items = [(prompts[i], results[i].steps, t) for i, ts in zip(active, texts) for t in ts]
            raw = prm.score_next(prm_tokenizer, items, batch_size=prm_batch_size)
        rewards = prm.to_rewards(raw)
        for j, i in enumerate(active):
            scores = combine(rewards[j * candidates:(j + 1) * candidates], prm_weights)
            best = int(torch.argmax(scores))
            if prm_cache:
                caches[i].accept(best)
            r, chosen = results[i], steps[j][best]
            r.token_ids += chosen
            r.steps.append(texts[j][best])
            r.step_scores.append(float(scores[best]))
            if chosen and chosen[-1] in eos:
                r.token_ids = r.token_ids[:-1]
                r.finished = True
    return results
