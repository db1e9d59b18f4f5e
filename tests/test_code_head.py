"""A code-head draft: logits over the catalogue's code tokens only. Strict speculative search
with it must still equal the target's beam search (the target's full-vocabulary scores define
every result); only which beams are drafted may change."""

from __future__ import annotations

import itertools

import pytest
import torch

from atspeed_ray.data.prepare import load_prepared, prepare
from atspeed_ray.data.synthetic import SyntheticConfig
from atspeed_ray.decoding import beam_search, speculative_beam_search
from atspeed_ray.decoding.beam import check_code_head, head_columns
from atspeed_ray.decoding.fast_llama import FastLlama, fast_forward
from atspeed_ray.models import (
    CODE_HEAD_KEY, DeviceConfig, code_head_of, code_token_ids, first_layers, load_decoder,
    set_code_head,
)
from tests.helpers import random_catalog, random_model, random_prompts, vocab_size
from tests.llm_helpers import fit_to_tokenizer, tiny_llm, tiny_llm_folder
from tests.test_speculative import CODEBOOK, assert_same_as_beam_search


@pytest.fixture(scope="module")
def setup():
    index = random_catalog(2500, CODEBOOK, seed=0)
    V = vocab_size(CODEBOOK)
    target = random_model(V, seed=1)
    head = code_token_ids(index)
    drafts = {"unrelated": FastLlama(random_model(V, seed=7, hidden=16, layers=1), head),
              "target": FastLlama(target, head)}
    return index, target, drafts, random_prompts(3, V, seed=2)


def test_code_head_logits_are_the_full_logits_at_its_ids(setup):
    index, target, _, prompts = setup
    full, head = FastLlama(target), code_token_ids(index)
    cut = FastLlama(target, head)
    ids = torch.tensor([prompts[0]])
    assert cut.lm_head.shape[0] == len(head) < full.lm_head.shape[0]
    torch.testing.assert_close(cut(ids).logits, full(ids).logits[..., head], rtol=0, atol=1e-12)
    cols = head_columns(cut)
    assert cols is not None and cols[head].tolist() == list(range(len(head)))
    assert head_columns(full) is None and cut.embed.shape == full.embed.shape  # inputs: all V


@pytest.mark.parametrize("k,n_mult,gamma", list(itertools.product([1, 3, 5, 10, 20], [1, 2], [1, 2, 3])))
def test_strict_with_a_code_head_draft_equals_beam_search(setup, k, n_mult, gamma):
    index, target, drafts, prompts = setup
    for batch in (prompts[:1], prompts):
        ref = beam_search(target, batch, index, k)
        for draft in drafts.values():
            out = speculative_beam_search(target, draft, batch, index, k, draft_beams=k * n_mult,
                                          gamma=gamma, mode="strict")
            assert_same_as_beam_search(out, ref)


def test_code_head_copy_of_the_target_still_accepts_every_step(setup):
    """The head renormalises over code tokens only; per step that shifts every candidate of a
    beam by the same amount, but across beams the shift differs, so only the first step is
    guaranteed to rank exactly as the target: at gamma = 1 every round is accepted."""
    index, target, drafts, prompts = setup
    out = speculative_beam_search(target, drafts["target"], prompts, index, 5, draft_beams=5,
                                  gamma=1)
    assert out.items == beam_search(target, prompts, index, 5).items
    assert all(r == index.L // 2 for r in out.stats["rounds"])  # 1 drafted + 1 bonus per round


def test_relaxed_with_a_code_head_draft_returns_catalogue_items(setup):
    index, target, drafts, prompts = setup
    out = speculative_beam_search(target, drafts["unrelated"], prompts, index, 5, draft_beams=10,
                                  gamma=2, mode="relaxed", generator=torch.Generator().manual_seed(0))
    for items in out.items:
        assert len(set(items)) == 5 and set(items) <= set(index.item_ids.tolist())


def test_a_head_missing_a_code_and_a_code_head_target_are_refused(setup):
    index, target, drafts, prompts = setup
    short = FastLlama(target, code_token_ids(index)[1:])
    with pytest.raises(ValueError, match="lacks 1 code token"):
        check_code_head(short, index)
    with pytest.raises(ValueError, match="target has a code head"):
        speculative_beam_search(drafts["target"], target, prompts, index, 3)
    with pytest.raises(ValueError, match="distinct"):
        FastLlama(target, [5, 5])


def test_code_head_travels_in_the_config_and_load_decoder_applies_it(setup, tmp_path):
    index, target, _, _ = setup
    model = random_model(target.config.vocab_size, seed=3, hidden=16, layers=1,
                         dtype=torch.float32)
    set_code_head(model, index)
    model.save_pretrained(tmp_path / "draft")
    fast = load_decoder(tmp_path / "draft", DeviceConfig(device="cpu", forward="fast"))
    assert isinstance(fast, FastLlama) and fast.head_ids.tolist() == code_token_ids(index)
    hf = load_decoder(tmp_path / "draft", DeviceConfig(device="cpu", forward="hf"))
    assert head_columns(hf) is None and code_head_of(hf) == code_token_ids(index)
    model.config.update({CODE_HEAD_KEY: "all"})
    model.save_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"bad/config.json: config 'code_head_ids'"):
        load_decoder(tmp_path / "bad", DeviceConfig(device="cpu"))


def test_llm_target_with_bpe_tokenizer_and_code_head_drafts(tmp_path, one_torch_thread):
    """A tiny Llama with a BPE tokenizer and the code tokens added: a 1-layer cut of the target
    and a fresh draft, both with a code head, give exactly the target's beam search."""
    from transformers import AutoModelForCausalLM

    base = tiny_llm_folder(tmp_path / "base", "llama", seed=0)
    prepare("synthetic", tmp_path / "data", history_len=5, base_model=base,
            synthetic=SyntheticConfig(num_users=40, num_items=60, codebook_sizes=[8, 8, 8, 8], seed=1))
    data = load_prepared(tmp_path / "data")
    V = len(data.tokenizer)
    target = fit_to_tokenizer(AutoModelForCausalLM.from_pretrained(base), V).double()
    cut = first_layers(fit_to_tokenizer(AutoModelForCausalLM.from_pretrained(base), V), 1).double()
    fresh = fit_to_tokenizer(tiny_llm("llama", V, seed=9, hidden=16, layers=1), V).double()
    head = code_token_ids(data.index)
    names = data.tokenizer.convert_ids_to_tokens(head)
    assert 0 < len(head) <= 32 and all(n.startswith("<") and n.endswith(">") for n in names), names
    prompts = data.prompts("test", 6)
    for k in (1, 4):
        ref = beam_search(target, prompts, data.index, k)
        for draft in (cut, fresh):
            d = fast_forward(draft, head)
            assert isinstance(d, FastLlama) and d.lm_head.shape[0] == len(head)
            for gamma in (1, 3):
                out = speculative_beam_search(fast_forward(target), d, prompts, data.index, k,
                                              draft_beams=2 * k, gamma=gamma)
                assert out.items == ref.items
                torch.testing.assert_close(out.scores, ref.scores, atol=1e-9, rtol=0)


def test_align_code_head_trains_records_the_head_and_decodes_exactly(tmp_path, one_torch_thread):
    """``align --code-head``: a cut (``--init-layers 1``) and a fresh draft train as before (the
    losses read code columns only), their exports record the head, ``load_decoder`` runs it,
    and strict decoding equals the target's beam search. ``train-target`` refuses the flag."""
    from atspeed_ray.models import save_model
    from atspeed_ray.training.config import TrainConfig
    from atspeed_ray.training.trainer import fit
    from transformers import AutoModelForCausalLM

    base = tiny_llm_folder(tmp_path / "base", "llama", seed=0)
    prepare("synthetic", tmp_path / "data", history_len=5, base_model=base,
            synthetic=SyntheticConfig(num_users=30, num_items=40, codebook_sizes=[8, 8, 8, 8], seed=2))
    data = load_prepared(tmp_path / "data")
    target_dir = save_model(fit_to_tokenizer(AutoModelForCausalLM.from_pretrained(base),
                                             len(data.tokenizer)), data.tokenizer, tmp_path / "target")
    common = dict(task="align", runner="local", data=str(tmp_path / "data"), target=str(target_dir),
                  loss="sft", epochs=1, micro_batch=8, threads=1, val_samples=0, max_samples=32,
                  code_head=True)
    dev = DeviceConfig(device="cpu", dtype="float64")
    target = load_decoder(target_dir, dev)
    prompts = data.prompts("test", 4)
    for name, kw in {"cut": dict(init_layers=1), "fresh": dict(preset="tiny")}.items():
        res = fit(TrainConfig(out=str(tmp_path / name), **common, **kw), log=lambda m: None)
        assert torch.isfinite(torch.tensor(res["epochs"][-1]["loss"]))
        draft = load_decoder(tmp_path / name, dev)
        assert isinstance(draft, FastLlama) and draft.head_ids.tolist() == code_token_ids(data.index)
        for k in (1, 3):
            ref = beam_search(target, prompts, data.index, k)
            out = speculative_beam_search(target, draft, prompts, data.index, k,
                                          draft_beams=2 * k, gamma=2)
            assert out.items == ref.items and torch.equal(out.sequences, ref.sequences)
    with pytest.raises(ValueError, match="--code-head is for drafts"):
        TrainConfig(task="target", data="d", out="o", code_head=True)
