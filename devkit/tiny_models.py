"""Tiny causal LMs built from config, for tests and benchmarks (no hub, no internet).

Each model is saved with ``save_pretrained`` together with an offline tokenizer, so it
loads through ``TransformerBridge.boot_transformers(dir)`` exactly like a hub model.
"""

from __future__ import annotations

from pathlib import Path

from devkit.vocab import build_bpe_tokenizer

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
    n_kv_heads: int | None = None,
    n_positions: int = 128,
    vocab_size: int = 300,
    seed: int = 0,
    texts: list[str] | None = None,
    tokenizer_kind: str | None = None,
) -> Path:
    """Build a randomly initialised ``arch`` model ('gpt2', 'qwen2' or 'llama') in ``out_dir``;
    ``tokenizer_kind`` (see :data:`TOKENIZER_KINDS`) gives it a tokenizer with that BOS
    convention. ``n_kv_heads`` (qwen2/llama; default half the query heads) sets grouped-query
    attention."""
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
    if tokenizer_kind:
        tokenizer = mimic_tokenizer(tokenizer_kind, texts, vocab_size=vocab_size)
    else:
        tokenizer = build_bpe_tokenizer(texts or _CORPUS, vocab_size=vocab_size)
    special = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    d_mlp = d_mlp or 4 * d_model
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            n_inner=d_mlp,
            n_positions=n_positions,
            bos_token_id=special,
            eos_token_id=special,
        )
        model = GPT2LMHeadModel(cfg)
    elif arch in ("qwen2", "llama"):
        common = dict(
            vocab_size=len(tokenizer),
            hidden_size=d_model,
            intermediate_size=d_mlp,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads or max(1, n_heads // 2),
            max_position_embeddings=n_positions,
            bos_token_id=special,
            eos_token_id=special,
            tie_word_embeddings=False,
        )
        model = (
            Qwen2ForCausalLM(Qwen2Config(**common))
            if arch == "qwen2"
            else LlamaForCausalLM(LlamaConfig(**common))
        )
    else:
        raise ValueError(f"unknown arch {arch!r}; expected gpt2, qwen2 or llama")
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------
# the architecture matrix: one tiny, perturbed model per family and layout

#: variant name -> (config class name, model class name, config overrides). Sizes are filled in by
#: :func:`build_family_model`; sliding windows are small so that test prompts run past them.
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"sliding_window": 4, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16},
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16},
    ),
    "phi": ("PhiConfig", "PhiForCausalLM", {"partial_rotary_factor": 0.5}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": 4, "pad_token_id": 0}),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {"use_parallel_residual": True, "rotary_pct": 0.5},
    ),
    "gpt_neox_sequential": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {"use_parallel_residual": False},
    ),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", {"rotary_dim": 4}),
    "gpt_neo": (
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        {"attention_types": [[["global", "local"], 1]], "window_size": 4},
    ),
    "opt": ("OPTConfig", "OPTForCausalLM", {}),
    "opt_post_ln": ("OPTConfig", "OPTForCausalLM", {"do_layer_norm_before": False}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {"clip_qkv": 3.0}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "stablelm": (
        "StableLmConfig",
        "StableLmForCausalLM",
        {"use_qkv_bias": True, "qk_layernorm": True},
    ),
    "stablelm_parallel": ("StableLmConfig", "StableLmForCausalLM", {"use_parallel_residual": True}),
    "bloom": ("BloomConfig", "BloomForCausalLM", {}),
    "bloom_post_ln": (
        "BloomConfig",
        "BloomForCausalLM",
        {"apply_residual_connection_post_layernorm": True},
    ),
    "falcon_new_decoder": (
        "FalconConfig",
        "FalconForCausalLM",
        {"new_decoder_architecture": True, "num_kv_heads": 2, "parallel_attn": True},
    ),
    "falcon_new_decoder_one_ln": (
        "FalconConfig",
        "FalconForCausalLM",
        {
            "new_decoder_architecture": True,
            "num_kv_heads": 2,
            "parallel_attn": True,
            "num_ln_in_parallel_attn": 1,
        },
    ),
    "falcon_parallel": (
        "FalconConfig",
        "FalconForCausalLM",
        {"new_decoder_architecture": False, "multi_query": True, "parallel_attn": True},
    ),
    "falcon_sequential": (
        "FalconConfig",
        "FalconForCausalLM",
        {"new_decoder_architecture": False, "multi_query": False, "parallel_attn": False},
    ),
    "falcon_parallel_alibi": (
        "FalconConfig",
        "FalconForCausalLM",
        {
            "new_decoder_architecture": False,
            "multi_query": True,
            "parallel_attn": True,
            "alibi": True,
        },
    ),
    "falcon_sequential_alibi": (
        "FalconConfig",
        "FalconForCausalLM",
        {
            "new_decoder_architecture": False,
            "multi_query": False,
            "parallel_attn": False,
            "alibi": True,
            "bias": True,
        },
    ),
}


def _size_kwargs(
    cls_name: str, n_layers: int, d: int, heads: int, vocab: int, n_pos: int, special: int
) -> dict:
    """Config keyword names differ by family; set every spelling the class knows."""
    spell = {
        "vocab_size": vocab,
        "hidden_size": d,
        "n_embd": d,
        "num_hidden_layers": n_layers,
        "n_layer": n_layers,
        "num_layers": n_layers,
        "num_attention_heads": heads,
        "n_head": heads,
        "num_heads": heads,
        "intermediate_size": 2 * d,
        "n_inner": 2 * d,
        "ffn_dim": 2 * d,
        "max_position_embeddings": n_pos,
        "n_positions": n_pos,
        "bos_token_id": special,
        "eos_token_id": special,
        "tie_word_embeddings": False,
    }
    if cls_name in (
        "LlamaConfig",
        "MistralConfig",
        "MixtralConfig",
        "Qwen2Config",
        "Qwen3Config",
        "GemmaConfig",
        "Gemma2Config",
        "Gemma3TextConfig",
        "OlmoConfig",
        "Olmo2Config",
        "StableLmConfig",
        "Phi3Config",
    ):
        spell["num_key_value_heads"] = heads // 2
    if cls_name == "OPTConfig":
        spell["word_embed_proj_dim"] = d
    if cls_name == "GPTNeoConfig":
        spell["intermediate_size"] = 2 * d
    return spell


def build_family_model(
    out_dir: str | Path,
    family: str,
    *,
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    n_positions: int = 128,
    seed: int = 0,
    noise: float = 0.1,
) -> Path:
    """A tiny random ``family`` model (a key of :data:`FAMILIES`) with every weight, bias and norm
    parameter perturbed (so zero biases and unit norm weights do not hide a wrong tap point),
    saved with an offline tokenizer in ``out_dir``."""
    import torch
    import transformers

    cfg_name, model_name, extra = FAMILIES[family]
    out_dir = Path(out_dir)
    tokenizer = build_bpe_tokenizer(_CORPUS, vocab_size=300)
    special = tokenizer.convert_tokens_to_ids(tokenizer.bos_token)
    cfg_cls = getattr(transformers, cfg_name)
    known = cfg_cls().to_dict()
    kwargs = {
        k: v
        for k, v in _size_kwargs(
            cfg_name, n_layers, d_model, n_heads, len(tokenizer), n_positions, special
        ).items()
        if k in known or k == "tie_word_embeddings"
    }
    kwargs.update(extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg_cls(**kwargs))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


#: BOS conventions of real tokenizers, mimicked for the BOS policy tests:
#: kind -> (bos, eos, whether encoding adds BOS itself).
TOKENIZER_KINDS = {
    # LlamaTokenizerFast with add_bos_token
    "deepseek_r1_qwen": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", True),
    "qwen2_5_instruct": (None, "<|im_end|>", False),  # no BOS token at all; pad <|endoftext|>
    "gpt2": ("<|endoftext|>", "<|endoftext|>", False),  # BOS = EOS, adds nothing
    "bos_not_added": ("<s>", "</s>", False),  # defines a BOS but its own encoding never uses it
}


def mimic_tokenizer(kind: str, texts: list[str] | None = None, vocab_size: int = 300):
    """A byte-level BPE tokenizer with the special tokens and BOS behaviour of ``kind``
    (a key of :data:`TOKENIZER_KINDS`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos, adds = TOKENIZER_KINDS[kind]
    specials = [t for t in dict.fromkeys([bos, eos, "<|endoftext|>"]) if t]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts or _CORPUS,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    if adds:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
    kw = {"bos_token": bos} if bos else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, pad_token="<|endoftext|>", **kw
    )
