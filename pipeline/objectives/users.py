"""Simulated users for dialogue objectives: given the dialogue so far (the user's
turns are "user", the policy's are "assistant"), produce the user's next turn.

- CallableUser: fn(dialogue, meta) -> str, named in config.
- LLMUser: a model playing the user from a persona prompt; the roles are swapped
  so the model speaks as the assistant of its own conversation.
"""

from __future__ import annotations

from pipeline.objectives.judges import import_callable


class CallableUser:
    def __init__(self, target: str):
        self.target, self.fn = target, import_callable(target)

    def reply_batch(self, dialogues: list[list[dict]], metas: list[dict]) -> list[str]:
        return [str(self.fn(d, m or {})) for d, m in zip(dialogues, metas)]


class LLMUser:
    def __init__(self, persona: str, engine, *, max_tokens: int = 128, temperature: float = 0.7):
        self.persona, self.engine = persona, engine
        self.sampling = {"max_tokens": max_tokens, "temperature": temperature}

    def prompt(self, dialogue: list[dict]) -> list[dict]:
        swapped = [{"role": {"user": "assistant", "assistant": "user"}.get(m["role"], m["role"]), "content": m["content"]}
                   for m in dialogue if m["role"] != "system"]
        return [{"role": "system", "content": self.persona}] + swapped

    def reply_batch(self, dialogues: list[list[dict]], metas: list[dict]) -> list[str]:
        if self.engine is None:
            raise RuntimeError("this LLM user has no generation engine")
        return [s[0].strip() for s in self.engine.generate([self.prompt(d) for d in dialogues], **self.sampling)]
