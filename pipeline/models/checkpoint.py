"""Checkpoints are safetensors only. A pickle checkpoint (`*.bin`, `*.pt`, `*.pth`,
`*.pkl`) can run arbitrary code when loaded, so it is refused with a message that
says how to convert it, never loaded "just this once".
"""

from __future__ import annotations

from pathlib import Path

import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class UnsafeCheckpointError(ValueError):
    pass


def gathered(param: torch.nn.Parameter, modifier_rank: int | None = None):
    """A context in which a parameter partitioned by ZeRO-3's zero.Init holds its whole value (and,
    with modifier_rank, that rank's changes reach every partition); for any other parameter, nothing."""
    import contextlib

    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=modifier_rank)


def check_safetensors(path: str | Path) -> Path:
    """The checkpoint directory, if it holds safetensors weights; else a clear error."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: checkpoint directory not found")
    if any(p.glob("*.safetensors")):
        return p
    pickles = sorted(f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeCheckpointError(
            f"{p}: holds only pickle weights ({', '.join(pickles)}); pickle checkpoints are refused "
            "because loading one can run arbitrary code. Convert it once, where you trust the file: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir, safe_serialization=True)"
        )
    raise FileNotFoundError(f"{p}: no *.safetensors weights in this directory")


def load_causal_lm(path: str | Path, dtype: str = "bfloat16", **kwargs):
    """Load a Hugging Face causal LM from a safetensors checkpoint directory. dtype "auto": bfloat16
    where this process's device has bf16 units, else float32 (pipeline.models.precision)."""
    from transformers import AutoModelForCausalLM

    from pipeline.models.precision import resolve_dtype

    p = check_safetensors(path)
    return AutoModelForCausalLM.from_pretrained(str(p), dtype=DTYPES[resolve_dtype(dtype)], use_safetensors=True,
                                                **kwargs)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise ValueError(f"{path}: the tokenizer has no chat template; set one before training on chat data")
    return tok


def save_pretrained(model, tokenizer, out_dir: str | Path, state_dict: dict | None = None, extra=None) -> Path:
    """Save model (safetensors) and tokenizer into `out_dir`, atomically (temp dir + rename).
    `extra(tmp_dir)` writes any further files before the rename."""
    import os
    import shutil
    import tempfile

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if extra is not None:
        extra(tmp)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():  # moved aside, not deleted first: a kill between the two renames leaves both copies
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out
