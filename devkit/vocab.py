"""Offline byte-level BPE tokenizers for the demo model and for test models.

Digits are split one per token so that number prompts that differ in one digit tokenize
to the same length (activation patching needs clean/corrupted pairs of equal length).
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKEN = "<|endoftext|>"


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on ``texts``; returns a ``transformers`` fast tokenizer.

    One special token serves as BOS, EOS and pad, like GPT-2's. Training is deterministic
    for a given text order.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
    )
