"""A tiny random Llama with a locally trained byte-level BPE tokenizer and a ChatML
chat template: what tests train, serve and generate with. head_dim is 64 because
vLLM's CPU attention rejects smaller heads. Embeddings are tied, as in SmolLM2,
so tests meet the same weight-tying the real model has.
"""

from __future__ import annotations

import random
from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS = "<|begin_of_text|>"

_WORDS = (
    "the a an of to and in is was it that for on with as at by from this be are or have not but had "
    "they you we he she his her their what which who how why when where there here one two three four "
    "five six seven eight nine ten hundred step first then next so total answer each more less than "
    "apples books coins pages students tutor question think explain because add subtract multiply divide "
    "equals number left right yes no good great let us check again therefore boxed sum difference product"
).split()


def _corpus(seed: int, n: int = 3000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        nums = [str(rng.randint(0, 999)) for _ in range(rng.randint(0, 3))]
        lines.append(" ".join(words + nums) + rng.choice([".", "?", "!", ":", " =", ","]))
    return lines + ["\\boxed{42}", "Step 1:", "\n\n", "user", "assistant", "system"]


def build_tiny_model(out_dir: str | Path, *, seed: int = 0, vocab_size: int = 1024, hidden: int = 128,
                     layers: int = 2, heads: int = 2, max_positions: int = 2048, bos: bool = False) -> Path:
    """Build, save (safetensors) and return the directory of a tiny random causal LM.

    bos=True: a Llama-3-like tokenizer whose post-processor adds a BOS to any text it
    encodes with special tokens, and whose chat template writes the BOS itself, so a
    rendered chat tokenised with special tokens gets two (what tests of that check)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pipeline.models.checkpoint import save_pretrained

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL + ([BOS] if bos else []),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_corpus(seed), trainer=trainer)
    if bos:
        bos_id = bpe.token_to_id(BOS)
        bpe.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, bos_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=BOS if bos else None, unk_token=None)
    tok.chat_template = ("{{ bos_token }}" if bos else "") + CHATML

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=hidden // heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
    )
    if config.head_dim != 64:
        raise ValueError(f"head_dim must be 64 for vLLM on CPU, got {config.head_dim}")
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return save_pretrained(model, tok, out_dir)
