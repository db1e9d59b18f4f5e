"""Hugging Face tokenizers for semantic-ID prompts.

Our own models use a word-level ``PreTrainedTokenizerFast`` whose vocabulary is the special tokens
followed by the code tokens (``<a_12>``, ``<b_7>``, ...). A user who brings an existing LLM
tokenizer (LLaMA, ...) goes through the same ``add_code_tokens`` path: the code tokens and a
separator are added to it, and the model's embeddings are resized to ``len(tokenizer)``.

A prompt is ``[bos] codes(item_1) <sep> codes(item_2) <sep> ... codes(item_n) <sep>``; the model
then generates the L code tokens of the next item.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from atspeed_ray.data.errors import DataError

PAD, BOS, EOS, UNK, SEP = "<pad>", "<s>", "</s>", "<unk>", "<sep>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, SEP]


def code_token(level: int, code: int) -> str:
    """The string of code ``code`` at ID position ``level``: ``<a_12>`` for level 0, code 12."""
    if not 0 <= level < 26:
        raise ValueError(f"level must be in [0, 26), got {level}")
    return f"<{string.ascii_lowercase[level]}_{code}>"


def build_tokenizer(code_tokens: Sequence[str]) -> PreTrainedTokenizerFast:
    """A fresh word-level tokenizer: special tokens, then ``code_tokens`` in the given order."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for tok in code_tokens:
        vocab.setdefault(tok, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"<[^<>]*>"), "isolated")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        sep_token=SEP,
    )


def add_code_tokens(
    tokenizer: PreTrainedTokenizerBase, code_tokens: Sequence[str]
) -> PreTrainedTokenizerBase:
    """Add the code tokens (and a separator / pad token if missing) to an existing tokenizer."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in dict.fromkeys(code_tokens) if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing)
    extra = {}
    if tokenizer.sep_token is None:
        extra["sep_token"] = SEP
    if tokenizer.pad_token is None:
        extra["pad_token"] = PAD
    if extra:
        tokenizer.add_special_tokens(extra)
    return tokenizer


def codes_to_token_ids(
    tokenizer: PreTrainedTokenizerBase, item_codes: Mapping[int, Sequence[str]]
) -> dict[int, list[int]]:
    """``{item: ["<a_1>", ...]}`` -> ``{item: [token_id, ...]}``; every code must be one token."""
    vocab = tokenizer.get_vocab()
    out: dict[int, list[int]] = {}
    for item, codes in item_codes.items():
        ids = []
        for c in codes:
            if c not in vocab:
                raise DataError(f"item {item}: code token {c!r} is not in the tokenizer")
            ids.append(vocab[c])
        out[int(item)] = ids
    return out


@dataclass(frozen=True)
class PromptFormat:
    """How a history of items becomes prompt token ids."""

    sep_id: int
    pad_id: int
    bos_id: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> "PromptFormat":
        if tokenizer.sep_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("tokenizer needs a sep and a pad token: call add_code_tokens first")
        return cls(tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id)

    def encode(self, history_codes: Sequence[Sequence[int]]) -> list[int]:
        """[n_items][L] code token ids -> prompt token ids."""
        out = [] if self.bos_id is None else [self.bos_id]
        for codes in history_codes:
            out.extend(int(c) for c in codes)
            out.append(self.sep_id)
        return out
