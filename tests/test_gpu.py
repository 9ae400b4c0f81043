"""CUDA-only branches, run where a GPU is lent: `pytest -m gpu tests/test_gpu.py` (skipped without
CUDA by the hook in conftest.py). They need torch and transformers only: no Ray, vLLM or DeepSpeed.

Covered: the bf16 screening of the head projection (and the switch that turns it off when CUDA may
reduce bf16 products in bf16), decoding on the GPU against the float32 path, and the device every
in-process model picks by default (cuda when available)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture
def reduced_precision():
    """Sets torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction for a test, then restores it."""
    flag = torch.backends.cuda.matmul
    before = flag.allow_bf16_reduced_precision_reduction

    def set_(value: bool) -> None:
        flag.allow_bf16_reduced_precision_reduction = value

    yield set_
    flag.allow_bf16_reduced_precision_reduction = before


def _prompt_ids(tok, text):
    s = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tok(s, add_special_tokens=False)["input_ids"]


def test_screening_on_cuda_only_with_float32_accumulation(reduced_precision):
    from pipeline.decoding.mixing import can_screen

    W = torch.zeros(2, 8, 4, device="cuda")
    reduced_precision(False)
    assert can_screen(W, 1.0) and not can_screen(W, 0.9) and not can_screen(W.bfloat16(), 1.0)
    reduced_precision(True)  # cuBLAS may then sum bf16 products in bf16: the error bound no longer holds
    assert not can_screen(W, 1.0)
    assert can_screen(W.cpu(), 1.0)  # the CPU accumulates in float32 whatever the flag says


def test_screened_tokens_on_cuda_are_the_exact_float32_tokens(reduced_precision):
    """As tests/test_decoding.py's CPU test, on the GPU: near-ties bf16 alone gets wrong."""
    from pipeline.decoding.mixing import screen_copy, screened_tokens

    reduced_precision(False)
    g = torch.Generator().manual_seed(0)
    M, V, D, B = 3, 4000, 256, 64
    u = torch.randn(D, generator=g)
    W = torch.randn(M, V, D, generator=g) * 0.1
    W[:, 0] = u
    W[:, 1] = u + 1e-3 * torch.randn(M, D, generator=g)
    h = u + 0.05 * torch.randn(B, D, generator=g)
    coef = torch.rand(B, M, generator=g)
    W, h, coef = W.cuda(), h.cuda(), coef.cuda()
    exact = sum(coef[:, m, None] * (h @ W[m].T) for m in range(M)).cpu()
    low, norms = screen_copy(W)
    assert low.device.type == "cuda" and low.dtype == torch.bfloat16
    assert torch.equal(screened_tokens(h, W, coef, low, norms, 0.0, None), exact.argmax(-1))
    got = screened_tokens(h, W, coef, low, norms, 0.8, torch.Generator().manual_seed(3))
    gumbel = -torch.empty(B, V).exponential_(generator=torch.Generator().manual_seed(3)).log()
    assert torch.equal(got, (exact / 0.8 + gumbel).argmax(-1))


def test_decoding_on_cuda_screened_equals_float32(tiny_model_dir, reduced_precision):
    """stream_tokens on the GPU: with screening (flag off) and without (flag on, the float32 logits
    path) the tokens are the same, for both mixing strategies; rows with other weights differ."""
    from pipeline.decoding.mixing import generate
    from pipeline.models.checkpoint import load_tokenizer
    from pipeline.models.multihead import MultiHeadPolicy

    policy = MultiHeadPolicy.from_sft(tiny_model_dir, ["a", "b", "c"], noise_std=0.5).eval().to("cuda")
    tok = load_tokenizer(tiny_model_dir)
    prompts = [_prompt_ids(tok, "What is 2 + 3?"), _prompt_ids(tok, "Say hello to the whole team today.")]
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.3, 0.7]])
    kw = dict(max_new_tokens=8, eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id)
    runs = {}
    for flag in (False, True):
        reduced_precision(flag)
        for strategy in ("merged", "per_token"):
            runs[flag, strategy] = generate(policy, prompts, weights, strategy=strategy, **kw)
    assert len({str(v) for v in runs.values()}) == 1, runs
    assert all(len(r) == 8 for r in runs[False, "merged"])  # eos id never sampled by this random model


def test_in_process_models_default_to_cuda(tiny_model_dir, tmp_path):
    """TransformersEngine, RefLogps and PRMScorer pick cuda when no device is given, and their
    results there match the CPU's."""
    from pipeline.engines.hf_engine import TransformersEngine
    from pipeline.models.prm import PRMScorer, build_prm
    from pipeline.models.ref_logps import RefLogps

    eng = TransformersEngine(tiny_model_dir, dtype="bfloat16")
    assert eng.device == "cuda" and eng.model.device.type == "cuda"
    hi = [{"role": "user", "content": "Hi."}]
    out = eng.generate([hi, [{"role": "user", "content": "Count to three, slowly."}], hi], max_tokens=4, temperature=0.0)
    assert len(out) == 3 and out[0] == out[2]  # greedy, left-padded batch: the same prompt, the same text

    ref = RefLogps(tiny_model_dir, max_length=64, max_prompt_length=32)
    assert ref.device == "cuda" and next(ref.model.parameters()).device.type == "cuda"

    model, tok = build_prm(tiny_model_dir, ["acc"], {"acc": "soft"})
    prompt, steps = [{"role": "user", "content": "Q?"}], ["one", "two"]
    on_cpu = model.eval().rewards(tok, prompt, steps)
    model.save(tmp_path / "prm", tok)
    scorer = PRMScorer(str(tmp_path / "prm"))
    assert scorer.device == "cuda" and next(scorer.model.parameters()).device.type == "cuda"
    on_gpu = scorer.model.rewards(scorer.tok, prompt, steps)
    assert on_gpu.shape == on_cpu.shape and torch.allclose(on_gpu.float().cpu(), on_cpu.float(), atol=1e-3)
