"""dtype "auto": bf16 only where the device has bf16 units (pipeline.models.precision)."""

import pytest
import torch

from pipeline.models import precision
from pipeline.models.precision import dtype_name, fast_bf16, resolve_bf16, resolve_dtype


@pytest.fixture
def cpu_with(monkeypatch):
    """Pretend the CPU has the given flags (and no GPU)."""
    monkeypatch.delenv("MAHALO_BF16", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def set_flags(*flags):
        monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: "avx512_bf16" in flags)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: "amx_bf16" in flags)
    return set_flags


def test_torch_probe_agrees_with_the_cpu_flags():
    """On this machine, whatever it is: torch's probe and /proc/cpuinfo say the same."""
    flags = precision.cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags here")
    assert precision.cpu_bf16_units() == any(f in flags for f in precision.BF16_CPU_FLAGS)


def test_auto_is_bf16_only_with_bf16_units(cpu_with):
    cpu_with("avx2", "fma")  # AVX2 only: oneDNN has no bf16 kernels
    assert not fast_bf16() and resolve_dtype("auto") == "float32" and resolve_bf16("auto") is False
    cpu_with("avx2", "avx512f", "avx512_bf16")
    assert fast_bf16() and resolve_dtype("auto") == "bfloat16" and resolve_bf16("auto") is True
    cpu_with("amx_bf16")
    assert resolve_dtype("auto", "cpu") == "bfloat16"


def test_explicit_settings_are_kept(cpu_with):
    cpu_with("avx2")
    assert resolve_dtype("bfloat16") == "bfloat16" and resolve_dtype("float16") == "float16"
    assert resolve_bf16(True) is True and resolve_bf16(False) is False
    assert [dtype_name(x) for x in (True, False, "auto")] == ["bfloat16", "float32", "auto"]


def test_env_override(cpu_with, monkeypatch):
    cpu_with("avx2")
    monkeypatch.setenv("MAHALO_BF16", "1")
    assert resolve_dtype("auto") == "bfloat16"
    cpu_with("avx512_bf16")
    monkeypatch.setenv("MAHALO_BF16", "0")
    assert resolve_bf16("auto") is False


def test_deepspeed_config_and_model_loading_resolve_auto(cpu_with, tiny_model_dir):
    from pipeline.config import TrainConfig
    from pipeline.models.checkpoint import load_causal_lm
    from pipeline.train.ds_config import deepspeed_config

    cpu_with("avx2")
    assert deepspeed_config(TrainConfig(), 2)["bf16"]["enabled"] is False
    assert load_causal_lm(tiny_model_dir, "auto").dtype == torch.float32
    cpu_with("avx512_bf16")
    assert deepspeed_config(TrainConfig(), 2)["bf16"]["enabled"] is True
    assert load_causal_lm(tiny_model_dir, "auto").dtype == torch.bfloat16
