"""Hugging Face tokenizers for semantic-ID prompts.

Our own models use a word-level ``PreTrainedTokenizerFast`` whose vocabulary is the special tokens
followed by the code tokens (``<a_12>``, ``<b_7>``, ...). A user who brings an existing LLM
tokenizer (SmolLM2, LLaMA, Qwen2, ...) goes through ``add_code_tokens``: the code tokens and the
separator are added to it as special tokens, and the model's embeddings are resized to
``len(tokenizer)``.

A prompt is ``[bos] codes(item_1) <sep> codes(item_2) <sep> ... codes(item_n) <sep>``, with a
template's text before and after the items for a pretrained LLM (``templates.py``); the model
then generates the L code tokens of the next item.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from atspeed_ray.data.errors import DataError
from atspeed_ray.data.templates import PromptTemplate

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
    tokenizer: PreTrainedTokenizerBase, code_tokens: Sequence[str], source: str | Path | None = None
) -> PreTrainedTokenizerBase:
    """Add the code tokens and the item separator ``<sep>`` to an existing (LLM) tokenizer as
    special tokens, one id each, in the given order after its vocabulary; ``<sep>`` becomes its
    sep token, and ``<pad>`` its pad token if it has none.

    A name already in the vocabulary is kept only if it is a special added token (a tokenizer
    that went through here before, e.g. a fine-tuned target's). An ordinary token of that name
    would give the code a meaning the model already has: a DataError naming ``source``.
    """
    names = [*dict.fromkeys(code_tokens), SEP] + ([PAD] if tokenizer.pad_token is None else [])
    vocab = tokenizer.get_vocab()
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    clash = [t for t in names if t in vocab and t not in special]
    if clash:
        raise DataError(f"the tokenizer already holds {clash[0]!r} (id {vocab[clash[0]]}) as an "
                        f"ordinary token; {len(clash)} of the {len(names)} code token and "
                        f"separator names clash, and they must be new tokens", source)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in names if t not in vocab],
                         special_tokens=True)
    tokenizer.sep_token = SEP
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD
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


HISTORY_MARK = "\x00history\x00"  # stands for the history while a chat template is rendered


@dataclass(frozen=True)
class PromptFormat:
    """How a history of items becomes prompt token ids: ``[bos] prefix (codes sep)* suffix``.

    ``prefix`` / ``suffix`` are a prompt template's text, already tokenized (empty for the
    ``history`` template). A prepared folder stores its format in ``summary.json``
    (``to_dict``), so that every stage builds the same prompts.
    """

    sep_id: int
    pad_id: int
    bos_id: int | None = None
    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> "PromptFormat":
        if tokenizer.sep_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("tokenizer needs a sep and a pad token: call add_code_tokens first")
        return cls(tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id)

    @classmethod
    def from_template(cls, tokenizer: PreTrainedTokenizerBase, template: PromptTemplate
                      ) -> "PromptFormat":
        """The format of ``template`` with ``tokenizer`` (which holds the code tokens already).
        A chat template renders its own special tokens, so no bos is added in front of it."""
        plain = cls.from_tokenizer(tokenizer)
        before, after = template.before, template.after
        if template.chat:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("the chat prompt template needs a tokenizer with a chat template")
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": before + HISTORY_MARK + after}],
                add_generation_prompt=True, tokenize=False)
            before, after = text.split(HISTORY_MARK)
        ids = [tuple(tokenizer.encode(t, add_special_tokens=False)) if t else () for t in (before, after)]
        bos = None if template.chat else plain.bos_id
        return cls(plain.sep_id, plain.pad_id, bos, ids[0], ids[1])

    def to_dict(self) -> dict[str, Any]:
        return {"sep_id": self.sep_id, "pad_id": self.pad_id, "bos_id": self.bos_id,
                "prefix": list(self.prefix), "suffix": list(self.suffix)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PromptFormat":
        return cls(int(d["sep_id"]), int(d["pad_id"]), None if d["bos_id"] is None else int(d["bos_id"]),
                   tuple(d.get("prefix", ())), tuple(d.get("suffix", ())))

    def encode(self, history_codes: Sequence[Sequence[int]]) -> list[int]:
        """[n_items][L] code token ids -> prompt token ids."""
        out = [] if self.bos_id is None else [self.bos_id]
        out.extend(self.prefix)
        for codes in history_codes:
            out.extend(int(c) for c in codes)
            out.append(self.sep_id)
        out.extend(self.suffix)
        return out
