"""Tokenisation shared by every trainer, the cached reference log-probs and the engines.

`prompt_ids` gives a prompt's token ids; SFT, DPO, the cached reference log-probs and
generation (vLLM, transformers) all call it, so a model samples from exactly the ids
it was trained on. The prompt's form (the data, never the device) decides the rendering:
- messages ([{"role", "content"}, ...]): the chat template with a generation prompt; the
  completion is what the template appends for the assistant turn (its text and the
  end-of-turn marker), so the model learns to stop;
- a string: raw text, no template (TRL's standard format); the completion is its text
  plus the EOS token.
The tokenizer never adds special tokens (add_special_tokens=False): a template that wants
a BOS writes it itself (Llama 3's does), and a tokenizer adding one too gives two.

Over-long rows (prompt + longest completion > max_length) lose whole earliest turns of the
prompt until it fits max_prompt_length (a leading system message and the last user turn
are always kept), then completions are cut to what is left. A prompt that cannot fit even
so (its last user turn alone is too long, or it is raw text) is refused: `refused` is set,
the ids are empty, and the caller counts and drops the row. Prompt tokens get label -100.
"""

from __future__ import annotations

IGNORE = -100
# Bumped whenever a row's tokens change (2: turn-boundary truncation, refusals, no added special
# tokens): cached reference log-probs record it, and a trainer refuses caches from another one.
TOKENIZATION = 2


def ids_of(tokenizer, text: str) -> list[int]:
    """Token ids of already-rendered text (never with added special tokens)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_text(tokenizer, prompt: list[dict] | str) -> str:
    """A prompt as the text the model reads: messages through the chat template, raw text as is."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, prompt: list[dict] | str) -> list[int]:
    """The prompt's token ids exactly as training builds them; the engines send these to the model."""
    return ids_of(tokenizer, prompt_text(tokenizer, prompt))


def render(tokenizer, prompt: list[dict] | str, completion: str) -> tuple[str, str]:
    """(prompt text, completion text) such that prompt + completion is the full sequence."""
    p_text = prompt_text(tokenizer, prompt)
    eos = tokenizer.eos_token or ""
    if isinstance(prompt, str):  # TRL's standard format: the completion ends with EOS
        return p_text, completion if completion.endswith(eos) else completion + eos
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": completion}], tokenize=False)
    if not full.startswith(p_text):
        # Templates that rewrite earlier turns (e.g. strip reasoning) break the split; fall back
        # to appending the completion and the end-of-turn token.
        return p_text, completion + eos
    return p_text, full[len(p_text):]


def shorter_prompts(prompt: list[dict]) -> list[list[dict]]:
    """The prompt with its earliest turns dropped, longest first: each candidate keeps a leading
    system message and starts at a user message; the last one starts at the last user turn."""
    head = prompt[:1] if prompt and prompt[0].get("role") == "system" else []
    starts = [i for i in range(len(head) + 1, len(prompt)) if prompt[i].get("role") == "user"]
    return [head + prompt[i:] for i in starts]


def _fit_prompt(tokenizer, prompt, max_prompt_length: int):
    """The longest form of `prompt` (whole earliest turns dropped) within max_prompt_length,
    with its ids; (None, None) when none fits."""
    if isinstance(prompt, list):
        for cand in shorter_prompts(prompt):
            ids = prompt_ids(tokenizer, cand)
            if len(ids) <= max_prompt_length:
                return cand, ids
    return None, None


def _encode(tokenizer, prompt, completions: list[str], max_length: int, max_prompt_length: int):
    """(prompt ids, completion ids per completion, truncated, refused) with one shared prompt."""
    p_ids = prompt_ids(tokenizer, prompt)
    c_ids = [ids_of(tokenizer, render(tokenizer, prompt, c)[1]) for c in completions]
    if len(p_ids) + max(len(c) for c in c_ids) <= max_length:
        return p_ids, c_ids, False, False
    if len(p_ids) > max_prompt_length:
        prompt, p_ids = _fit_prompt(tokenizer, prompt, max_prompt_length)
        if prompt is None:
            return [], [[] for _ in completions], True, True
        # the completion's rendering can depend on the turns before it: render again
        c_ids = [ids_of(tokenizer, render(tokenizer, prompt, c)[1]) for c in completions]
    return p_ids, [c[: max_length - len(p_ids)] for c in c_ids], True, False


def encode_prompt_completion(tokenizer, prompt: list[dict] | str, completion: str, max_length: int,
                             max_prompt_length: int) -> dict:
    """input_ids and labels (-100 on the prompt), `truncated` and `refused` (see the module doc)."""
    p_ids, (c_ids,), truncated, refused = _encode(tokenizer, prompt, [completion], max_length, max_prompt_length)
    return {"input_ids": p_ids + c_ids, "labels": [IGNORE] * len(p_ids) + c_ids, "truncated": truncated,
            "refused": refused}


def encode_pair(tokenizer, prompt: list[dict] | str, chosen: str, rejected: str, max_length: int,
                max_prompt_length: int) -> dict:
    """Chosen and rejected sequences (input_ids, labels) sharing one prompt truncation, so both
    sides of a pair always see the same prompt. The trainer and the cached reference log-probs
    call this same function."""
    p_ids, (c_ids, r_ids), truncated, refused = _encode(tokenizer, prompt, [chosen, rejected], max_length,
                                                        max_prompt_length)
    return {"chosen_ids": p_ids + c_ids, "chosen_labels": [IGNORE] * len(p_ids) + c_ids,
            "rejected_ids": p_ids + r_ids, "rejected_labels": [IGNORE] * len(p_ids) + r_ids,
            "truncated": truncated, "refused": refused}
