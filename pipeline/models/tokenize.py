"""Chat-template tokenisation shared by every trainer.

The prompt is rendered with the model's chat template and a generation prompt; the
completion is whatever the template appends for the assistant turn (its text plus
the end-of-turn marker), so the model learns to stop. Prompt tokens get label -100.
"""

from __future__ import annotations

IGNORE = -100


def render(tokenizer, prompt: list[dict], completion: str) -> tuple[str, str]:
    """(prompt text, completion text) such that prompt + completion is the full chat."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": completion}], tokenize=False)
    if not full.startswith(prompt_text):
        # Templates that rewrite earlier turns (e.g. strip reasoning) break the split; fall back
        # to appending the completion and the end-of-turn token.
        return prompt_text, completion + (tokenizer.eos_token or "")
    return prompt_text, full[len(prompt_text):]


def encode_prompt_completion(tokenizer, prompt: list[dict], completion: str, max_length: int,
                             max_prompt_length: int) -> dict:
    """input_ids and labels (-100 on the prompt). Over-long rows keep the end of the prompt
    (up to max_prompt_length) and the start of the completion; `truncated` says so."""
    p_text, c_text = render(tokenizer, prompt, completion)
    p_ids = tokenizer(p_text, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(c_text, add_special_tokens=False)["input_ids"]
    truncated = len(p_ids) + len(c_ids) > max_length
    if truncated:
        p_ids = p_ids[-max_prompt_length:] if len(p_ids) > max_prompt_length else p_ids
        c_ids = c_ids[: max_length - len(p_ids)]
    return {
        "input_ids": p_ids + c_ids,
        "labels": [IGNORE] * len(p_ids) + c_ids,
        "truncated": truncated,
    }


def encode_pair(tokenizer, prompt: list[dict], chosen: str, rejected: str, max_length: int,
                max_prompt_length: int) -> dict:
    """Chosen and rejected sequences (input_ids, labels) sharing one prompt truncation.

    When prompt + the longer response exceeds max_length, the prompt keeps its last
    max_prompt_length tokens, then both responses are cut to what is left, so both
    sides of a pair always see the same prompt. The trainer and the cached
    reference log-probs call this same function.
    """
    p_text, c_text = render(tokenizer, prompt, chosen)
    _, r_text = render(tokenizer, prompt, rejected)
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    p_ids, c_ids, r_ids = enc(p_text), enc(c_text), enc(r_text)
    truncated = len(p_ids) + max(len(c_ids), len(r_ids)) > max_length
    if truncated:
        p_ids = p_ids[-max_prompt_length:]
        c_ids, r_ids = c_ids[: max_length - len(p_ids)], r_ids[: max_length - len(p_ids)]
    return {"chosen_ids": p_ids + c_ids, "chosen_labels": [IGNORE] * len(p_ids) + c_ids,
            "rejected_ids": p_ids + r_ids, "rejected_labels": [IGNORE] * len(p_ids) + r_ids, "truncated": truncated}
