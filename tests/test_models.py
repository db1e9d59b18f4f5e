"""Tokenizers (ours and an existing LLM tokenizer with code tokens added) and checkpoints."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from atspeed_ray.data import ItemIndex, PromptFormat, add_code_tokens, build_tokenizer, code_token
from atspeed_ray.data.tokenizer import codes_to_token_ids
from atspeed_ray.models import DeviceConfig, build_llama, get_preset, load_model, save_model

CODES = {0: [code_token(0, 1), code_token(1, 2)], 1: [code_token(0, 1), code_token(1, 3)],
         2: [code_token(0, 4), code_token(1, 2)]}
ALL = sorted({c for v in CODES.values() for c in v})


def test_our_tokenizer_round_trip(tmp_path):
    tok = build_tokenizer(ALL)
    ids = codes_to_token_ids(tok, CODES)
    fmt = PromptFormat.from_tokenizer(tok)
    prompt = fmt.encode([ids[0], ids[2]])
    assert tok.decode(prompt).replace(" ", "") == "<s><a_1><b_2><sep><a_4><b_2><sep>"
    tok.save_pretrained(tmp_path)
    again = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert codes_to_token_ids(again, CODES) == ids
    assert again.encode("<a_1><b_3>", add_special_tokens=False) == ids[1]


def test_existing_llm_tokenizer_with_code_tokens_added():
    """A user who brings LLaMA: the same code path on a small word-level 'LLM' tokenizer."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    llm = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok = add_code_tokens(llm, ALL)
    ids = codes_to_token_ids(tok, CODES)
    assert min(min(v) for v in ids.values()) >= len(vocab)  # new tokens after the old vocabulary
    index = ItemIndex.from_codes(ids)
    assert index.items_of(torch.tensor([ids[2]])).tolist() == [2]
    prompt = PromptFormat.from_tokenizer(tok).encode([ids[1]])
    assert prompt[0] == tok.bos_token_id and prompt[-1] == tok.sep_token_id
    assert tok.encode("hello <a_4><b_2>", add_special_tokens=False) == [3, *ids[2]]


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    tok = build_tokenizer(ALL)
    model = build_llama(get_preset("tiny").target, len(tok), tok.pad_token_id, seed=0)
    save_model(model, tok, tmp_path)
    loaded, tok2 = load_model(tmp_path, DeviceConfig(device="cpu", dtype="float32"))
    x = torch.tensor([[1, 5, 6, 4, 7, 8, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    assert tok2.get_vocab() == tok.get_vocab()
    assert (tmp_path / "model.safetensors").exists()
