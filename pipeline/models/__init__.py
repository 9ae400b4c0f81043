"""Models: checkpoint IO (safetensors only), the built-in models, tokenisation helpers."""

from pipeline.models.checkpoint import UnsafeCheckpointError, check_safetensors, load_causal_lm, load_tokenizer, save_pretrained
from pipeline.models.registry import SMOLLM2, materialise_smollm2, resolve_model, tiny_model

__all__ = [
    "SMOLLM2", "UnsafeCheckpointError", "check_safetensors", "load_causal_lm", "load_tokenizer",
    "materialise_smollm2", "resolve_model", "save_pretrained", "tiny_model",
]
