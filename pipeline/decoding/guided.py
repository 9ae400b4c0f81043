"""PRM-guided decoding with a continuing KV cache (the paper's algorithm, made runnable).

At each step boundary: K candidate steps are sampled from a copy of the running
cache (batched, one row per candidate); the vectorized PRM scores every candidate
as the next step; rewards are combined with the request's weights; the winner is
kept together with its cache rows (cropped to its own length), so the policy never
re-encodes the text. The PRM keeps a running cache of its own (prompt + accepted
steps, each closed by its separator), so it too encodes only the K candidates'
tokens. The mix of heads is merged once per request: one projection per token.
Boundaries per domain: `blank_lines` (math), `sentences`
(prose), `turn` (the whole turn: turn-level best-of-K, as the paper does for
tutoring dialogues). Limits: `max_steps`, `max_step_tokens`, `max_new_tokens`.

`reencode=True` runs the same search the way `model.generate(prefix,
num_return_sequences=K)` does it at every step: the accepted tokens (prompt + steps
so far) are encoded again for each of the K candidates, by the policy and by the
PRM (`score_last`). It is the baseline the cache is measured against. (It
re-encodes token ids, not decoded text, so both see the same tokens; the PRM's
input is built step by step in both, so both score the same ids.) Both consume
the random generator identically, so they produce the same tokens up to
floating-point ties; with greedy sampling exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from pipeline.decoding.mixing import eos_ids, sample

BOUNDARIES = ("blank_lines", "sentences", "turn")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(\s|$)")


@dataclass
class GuidedResult:
    token_ids: list[int]
    steps: list[str]
    step_scores: list[float] = field(default_factory=list)  # the winner's combined PRM score per step
    finished: bool = False  # ended by end-of-sequence (not by a limit)
    policy_forward_tokens: int = 0  # tokens the policy processed (prefill + decode), for the benchmark


def _at_boundary(text: str, boundary: str) -> bool:
    if boundary == "blank_lines":
        return "\n\n" in text.lstrip("\n")
    if boundary == "sentences":  # a heuristic: "3." ends a step even if "5" was to follow
        return bool(_SENTENCE_END.search(text.strip()))
    return False  # turn: only the end of sequence ends a step


def combine(rewards: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """[K, n_objectives] PRM rewards -> [K] scores; a NaN reward (cut by truncation) ranks last."""
    s = (rewards * torch.tensor(weights, dtype=rewards.dtype)).sum(-1)
    return torch.nan_to_num(s, nan=float("-inf"))


@torch.no_grad()
def guided_generate(policy, tokenizer, prm, prm_tokenizer, prompt: list[dict], *, weights, prm_weights: list[float],
                    candidates: int = 4, max_steps: int = 8, max_step_tokens: int = 64, max_new_tokens: int = 256,
                    boundary: str = "blank_lines", temperature: float = 0.7, top_p: float = 1.0, seed: int = 0,
                    reencode: bool = False) -> GuidedResult:
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary {boundary!r}: use one of {BOUNDARIES}")
    dev = policy.device
    merged, _ = policy.merge_rows(torch.as_tensor([weights], dtype=policy.heads.dtype, device=dev))
    run = lambda ids, **kw: policy(ids, head_ids=0, heads=merged, **kw)  # noqa: E731
    eos = eos_ids(tokenizer, policy.config)
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    gen = torch.Generator().manual_seed(seed)
    res = GuidedResult(token_ids=[], steps=[])
    cache, last_logits = None, None

    def prefill(ids: list[int], rows: int = 1):
        c = DynamicCache()
        out = run(torch.tensor([ids] * rows, device=dev), past_key_values=c, use_cache=True, logits_to_keep=1)
        res.policy_forward_tokens += len(ids) * rows
        return c, out.logits[:, -1].float().cpu()

    prm_cache = None
    if not reencode:
        cache, last_logits = prefill(prompt_ids)
        prm_cache = PRMPrefix(prm, prm_tokenizer, prompt) if isinstance(getattr(prm, "backbone", None), torch.nn.Module) else None
    k = candidates
    while len(res.steps) < max_steps and len(res.token_ids) < max_new_tokens and not res.finished:
        if reencode:  # the baseline: the whole prefix encoded again, once per candidate
            cand, logits = prefill(prompt_ids + res.token_ids, rows=k)
            base_len = cand.get_seq_length()
        else:
            base_len = cache.get_seq_length()
            cand = _repeat_cache(cache, k)  # a copy of the running cache, one row per candidate
            logits = last_logits.repeat(k, 1)
        toks: list[list[int]] = [[] for _ in range(k)]
        done = [False] * k
        end_logits: list[torch.Tensor | None] = [None] * k
        budget = min(max_step_tokens, max_new_tokens - len(res.token_ids))
        for t in range(budget):
            nxt = sample(logits, temperature, top_p, gen)
            newly = []
            for i in range(k):
                if done[i]:
                    continue
                toks[i].append(int(nxt[i]))
                if int(nxt[i]) in eos or _at_boundary(tokenizer.decode(toks[i]), boundary) or t + 1 == budget:
                    done[i] = True
                    newly.append(i)
            if all(done) and all(toks[i][-1] in eos for i in newly):
                break  # nothing to feed: every newly finished candidate ended with end-of-sequence
            feed = torch.tensor([[toks[i][-1] if toks[i] else 0] for i in range(k)], device=dev)
            pos = torch.tensor([[base_len + min(t, len(toks[i]) - 1)] for i in range(k)], device=dev)
            out = run(feed, past_key_values=cand, use_cache=True, position_ids=pos)
            res.policy_forward_tokens += k
            logits = out.logits[:, -1].float().cpu()
            for i in newly:
                end_logits[i] = logits[i]
            if all(done):
                break
        texts = [tokenizer.decode([x for x in tk if x not in eos]).strip() for tk in toks]
        rewards = prm_cache.score(texts) if prm_cache else prm.score_last(prm_tokenizer, prompt, res.steps, texts)
        scores = combine(rewards, prm_weights)
        best = int(torch.argmax(scores))
        if prm_cache:
            prm_cache.accept(best)
        res.token_ids += toks[best]
        res.steps.append(texts[best])
        res.step_scores.append(float(scores[best]))
        if toks[best] and toks[best][-1] in eos:
            res.token_ids = res.token_ids[:-1]
            res.finished = True
            break
        if not reencode:
            cand.batch_select_indices(torch.tensor([best]))
            excess = cand.get_seq_length() - (base_len + len(toks[best]))
            if excess > 0:  # drop what was fed after the winner had finished
                cand.crop(-excess)
            cache, last_logits = cand, end_logits[best].unsqueeze(0)
    return res


class PRMPrefix:
    """The PRM's running KV cache: the prompt and the accepted steps, each followed by its separator,
    tokenized piece by piece exactly as `encode_steps` does. Candidates are scored by encoding only
    their own tokens (+ separator) on a K-row copy; the winner's rows become the new prefix."""

    @torch.no_grad()
    def __init__(self, prm, tokenizer, prompt: list[dict]):
        self.prm, self.tok = prm, tokenizer
        self.dev = next(prm.parameters()).device
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        self.cache = DynamicCache()
        prm.backbone(input_ids=torch.tensor([ids], device=self.dev), past_key_values=self.cache, use_cache=True)
        self.length, self._cand, self._pieces = len(ids), None, None

    @torch.no_grad()
    def score(self, candidates: list[str]) -> torch.Tensor:
        """[K, n_objectives]: each candidate's reward as the next step (read at its separator)."""
        pieces = [self.tok(c, add_special_tokens=False)["input_ids"] + [self.prm.sep_id] for c in candidates]
        width = max(len(p) for p in pieces)
        # right padding: a candidate's tokens never attend to the padding after them
        ids = torch.tensor([p + [p[-1]] * (width - len(p)) for p in pieces], device=self.dev)
        pos = torch.arange(self.length, self.length + width, device=self.dev).expand(len(pieces), -1)
        cand = _repeat_cache(self.cache, len(pieces))
        h = self.prm.backbone(input_ids=ids, past_key_values=cand, position_ids=pos, use_cache=True).last_hidden_state
        last = torch.tensor([len(p) - 1 for p in pieces], device=self.dev)
        rewards = self.prm.head(h[torch.arange(len(pieces), device=self.dev), last].to(self.prm.head.weight.dtype))
        self._cand, self._pieces = cand, pieces
        return rewards.float().cpu()

    def accept(self, best: int) -> None:
        n = len(self._pieces[best])
        self._cand.batch_select_indices(torch.tensor([best], device=self.dev))
        excess = self._cand.get_seq_length() - (self.length + n)
        if excess > 0:
            self._cand.crop(-excess)
        self.cache, self.length, self._cand, self._pieces = self._cand, self.length + n, None, None


def _repeat_cache(cache: DynamicCache, k: int) -> DynamicCache:
    """A copy of a batch-1 cache with k rows (the running cache itself stays untouched)."""
    import copy

    c = copy.deepcopy(cache)
    c.batch_repeat_interleave(k)
    return c
