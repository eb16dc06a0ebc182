"""Tiny causal LMs built from config, for tests and benchmarks (no hub, no internet).

Each model is saved with ``save_pretrained`` together with an offline tokenizer, so it
loads through ``TransformerBridge.boot_transformers(dir)`` exactly like a hub model.
"""

from __future__ import annotations

from pathlib import Path

from .vocab import build_bpe_tokenizer

_CORPUS = [
    "Which is larger: 847 or 839? Answer: 847",
    "Which is larger: 12 or 71? Answer: 71",
    "The Eiffel Tower is located in Paris.",
    "The capital of France is Paris.",
    "Answer minimally: Given the numbers 25 and 9 calculate the sum",
    "Answer minimally: Given the numbers 42 and 11 calculate the product",
    "the quick brown fox jumps over the lazy dog, again and again.",
]


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "gpt2",
    *,
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 2,
    d_mlp: int | None = None,
    n_positions: int = 128,
    vocab_size: int = 300,
    seed: int = 0,
    texts: list[str] | None = None,
) -> Path:
    """Build a randomly initialised ``arch`` model ('gpt2', 'qwen2' or 'llama') in ``out_dir``."""
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    out_dir = Path(out_dir)
    tokenizer = build_bpe_tokenizer(texts or _CORPUS, vocab_size=vocab_size)
    special = tokenizer.convert_tokens_to_ids(tokenizer.bos_token)
    d_mlp = d_mlp or 4 * d_model
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=len(tokenizer), n_embd=d_model, n_layer=n_layers, n_head=n_heads,
            n_inner=d_mlp, n_positions=n_positions, bos_token_id=special, eos_token_id=special,
        )
        model = GPT2LMHeadModel(cfg)
    elif arch in ("qwen2", "llama"):
        common = dict(
            vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_mlp,
            num_hidden_layers=n_layers, num_attention_heads=n_heads,
            num_key_value_heads=max(1, n_heads // 2), max_position_embeddings=n_positions,
            bos_token_id=special, eos_token_id=special, tie_word_embeddings=False,
        )
        model = Qwen2ForCausalLM(Qwen2Config(**common)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(f"unknown arch {arch!r}; expected gpt2, qwen2 or llama")
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
