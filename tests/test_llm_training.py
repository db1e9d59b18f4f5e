"""LLM targets: ``train-target --init`` (full and LoRA), whole-sequence training, drafts for an
LLM target. Tiny Llama / Qwen2 checkpoints with a BPE tokenizer are built in the test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from atspeed_ray.data.prepare import load_prepared, prepare
from atspeed_ray.data.synthetic import SyntheticConfig
from atspeed_ray.models import DeviceConfig
from tests.llm_helpers import tiny_llm_folder

CPU32 = DeviceConfig(device="cpu", dtype="float32")
SYN = SyntheticConfig(num_users=120, num_items=80, codebook_sizes=[6, 6, 6, 6], seed=3)


def prepare_for(base_dir: Path, out: Path, history_len: int = 20, template: str = "history") -> Path:
    """Synthetic data prepared with ``base_dir``'s tokenizer plus the code tokens."""
    prepare("synthetic", out, history_len=history_len, synthetic=SYN, base_model=base_dir,
            prompt_template=template)
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return tiny_llm_folder(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def llm_prep(llama_dir, tmp_path_factory) -> Path:
    return prepare_for(llama_dir, tmp_path_factory.mktemp("llm_prep"))


# ---------------------------------------------------------------------------- whole sequences
def per_item_prefix_losses(model, prepared, rows) -> torch.Tensor:
    """[len(rows)] the per-prefix loss of each train row (one item each), one row at a time."""
    from atspeed_ray.training.core import collate, forward_branches
    from atspeed_ray.training.teacher_data import load_examples

    ex = load_examples(prepared, "train")
    batch = collate(ex, rows, prepared.index, prepared.prompt_format.pad_id)
    logits = forward_branches(model, batch)[:, 0].double()  # [N, L, V]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.codes[:, 0].flatten(),
                                           reduction="none")
    return ce.view(len(rows), -1).mean(1)  # [N]


def per_item_sequence_losses(model, seqs, widx, pad) -> torch.Tensor:
    from atspeed_ray.training.sequences import collate_sequences, forward_sequences

    batch = collate_sequences(seqs, widx, pad)
    logits = forward_sequences(model, batch).double()  # [I, L, V]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.codes.flatten(),
                                           reduction="none")
    return ce.view(batch.codes.shape).mean(1)  # [I]


@pytest.mark.parametrize("history_len", [20, 3])
def test_sequence_loss_is_the_mean_of_the_prefix_losses(llama_dir, tmp_path, history_len):
    """One forward per user window gives every item the loss of its per-prefix sample: exactly
    for items whose per-prefix history is their whole past (all items of users within the
    window, the first window of longer users); every item is predicted exactly once."""
    from transformers import AutoModelForCausalLM

    from atspeed_ray.training.core import Objective, collate
    from atspeed_ray.training.sequences import build_sequences, collate_sequences, user_sequences
    from atspeed_ray.training.teacher_data import load_examples

    p = load_prepared(prepare_for(llama_dir, tmp_path / "p", history_len=history_len))
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64).eval()
    model.resize_token_embeddings(len(p.tokenizer), mean_resizing=False)
    seqs = build_sequences(p)
    pad = p.prompt_format.pad_id
    users = np.array(p.users("train"))
    full = user_sequences(p.users("train"), p.histories("train"), p.targets("train"))
    assert seqs.num_items() == len(users)  # every train row's item, once
    picked = np.unique(users)[:12]
    rows = np.flatnonzero(np.isin(users, picked))
    widx = np.flatnonzero(np.isin(seqs.users, picked))
    with torch.no_grad():
        a = per_item_sequence_losses(model, seqs, widx, pad)
        b = per_item_prefix_losses(model, p, rows)
        assert len(a) == len(b) == len(rows)
        # rows of a user come in sequence order, so do its windows' items: item t of user u
        pos = np.concatenate([np.arange(1, len(full[int(u)])) for u in users[rows][
            np.r_[True, users[rows][1:] != users[rows][:-1]]]])
        exact = pos <= history_len  # whole past within the window
        torch.testing.assert_close(a[torch.as_tensor(exact)], b[torch.as_tensor(exact)],
                                   rtol=0, atol=1e-9)
        assert exact.any() and (~exact).any() if history_len == 3 else exact.any()
        # users within the window: the batch loss (mean over items) is the per-prefix batch loss
        fits = [u for u in np.unique(users) if len(full[int(u)]) <= history_len + 1][:12]
        rows = np.flatnonzero(np.isin(users, fits))
        widx = np.flatnonzero(np.isin(seqs.users, fits))
        obj, ex = Objective("sft"), load_examples(p, "train")
        seq_loss = obj(model, collate_sequences(seqs, widx, pad))[0]
        prefix_loss = obj(model, collate(ex, rows, p.index, pad))[0]
        assert len(rows) > 5
        torch.testing.assert_close(seq_loss, prefix_loss, rtol=0, atol=1e-6)


def test_sequence_inputs_are_checked():
    from atspeed_ray.training.sequences import Layout, user_sequences, windows

    with pytest.raises(ValueError, match="not contiguous"):
        user_sequences([1, 2, 1], [[5], [6], [5, 7]], [[7], [8], [9]])
    with pytest.raises(ValueError, match="does not end with"):
        user_sequences([1, 1], [[5], [9]], [[7], [8]])
    assert windows(list(range(7)), 3) == [[0, 1, 2, 3], [3, 4, 5, 6]]
    assert windows(list(range(8)), 3) == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7]]

    class Suffix:  # "<history> what comes next?": the sequence trick does not apply
        def encode(self, items):
            return [0] + [c for it in items for c in [*it, 99]] + [98, 97]

    with pytest.raises(ValueError, match="samples='prefix'"):
        Layout.of(Suffix(), 4)


# ---------------------------------------------------------------------------- --init: resizing
@pytest.mark.parametrize("rule", ["mean", "noise", "pieces"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_new_rows_start_from_the_chosen_rule(arch, rule, tmp_path):
    """Rows of the added tokens (past the base tokenizer; Qwen2's padded spare rows included)
    start from the rule; the base rows keep their values; an untied head gets the same."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from atspeed_ray.training.init_model import resize_to_tokenizer

    base_dir = tiny_llm_folder(tmp_path / "m", arch)
    p = load_prepared(prepare_for(base_dir, tmp_path / "p"))
    base = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    before = model.get_input_embeddings().weight.detach().clone()
    res = resize_to_tokenizer(model, p.tokenizer, rule, base, seed=0)
    n = len(base)
    assert res.old_vocab == n and res.new_ids == list(range(n, len(p.tokenizer)))
    mats = [model.get_input_embeddings().weight]
    if not model.config.tie_word_embeddings:
        mats.append(model.get_output_embeddings().weight)
    assert model.get_input_embeddings().weight.shape[0] >= len(p.tokenizer)
    torch.testing.assert_close(mats[0][:n], before[:n], rtol=0, atol=0)
    for w in mats:
        w = w.detach()
        new, mean = w[n:len(p.tokenizer)], w[:n].mean(0)
        if rule == "mean":
            torch.testing.assert_close(new, mean.expand_as(new))
        elif rule == "noise":
            assert not torch.allclose(new[0], new[1])
            assert float((new - mean).std()) < 0.2 * float(w[:n].std(0).mean())
        else:
            tok = p.tokenizer.convert_ids_to_tokens(n)
            pieces = base(tok, add_special_tokens=False)["input_ids"]
            assert len(pieces) > 1
            torch.testing.assert_close(new[0], w[pieces].mean(0))
            assert not torch.allclose(new[0], new[-1])  # <a_..> and <d_..> start apart


def test_init_stops_on_a_model_of_other_data(llm_prep, tmp_path):
    from atspeed_ray.data.errors import DataError
    from atspeed_ray.training.trainer import fit

    other = tiny_llm_folder(tmp_path / "qwen", "qwen2")
    with pytest.raises(DataError, match="qwen"):
        fit(llm_cfg(data=str(llm_prep), out=str(tmp_path / "o"), init=str(other)), log=lambda m: None)
    with pytest.raises(ValueError, match="--init"):
        llm_cfg(data=str(llm_prep), out=str(tmp_path / "o"), lora_r=4)
    with pytest.raises(ValueError, match="lora_targets"):
        fit(llm_cfg(data=str(llm_prep), out=str(tmp_path / "o"), init=str(tiny_llm_folder(
            tmp_path / "l", "llama")), lora_r=4, lora_targets="query"), log=lambda m: None)


# ---------------------------------------------------------------------------- --init: training
def llm_cfg(**kw):
    from atspeed_ray.training.config import TrainConfig

    base = dict(task="target", runner="local", epochs=2, micro_batch=8, lr=3e-3, threads=1,
                val_samples=8, val_k=3, log_every=1000, seed=0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def full_target(llama_dir, llm_prep, tmp_path_factory) -> Path:
    from atspeed_ray.training.trainer import fit

    out = tmp_path_factory.mktemp("full")
    fit(llm_cfg(data=str(llm_prep), out=str(out), init=str(llama_dir), samples="auto"),
        log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def lora_target(llama_dir, llm_prep, tmp_path_factory) -> Path:
    from atspeed_ray.cli import main

    out = tmp_path_factory.mktemp("lora")  # through the CLI: the flags come from TrainConfig
    rc = main(["train-target", "--data", str(llm_prep), "--out", str(out), "--init", str(llama_dir),
               "--lora-r", "4", "--lora-alpha", "8", "--lr", "1e-2", "--workers", "0",
               "--samples", "sequence",
               "--epochs", "2", "--micro-batch", "8", "--threads", "1", "--val-samples", "8",
               "--val-k", "3", "--log-every", "1000"])
    assert rc == 0
    return out


def assert_plain_export(out: Path, prepared) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    names = {f.name for f in out.iterdir()}
    assert "model.safetensors" in names and not any(n.startswith("adapter") for n in names)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == len(prepared.tokenizer)
    assert not any("lora" in k or "token_adapter" in k for k in model.state_dict())
    return model


def test_init_full_fine_tuning_learns_on_whole_sequences(full_target, llm_prep):
    p = load_prepared(llm_prep)
    hist = json.loads((full_target / "training.json").read_text())
    losses = [loss for _, loss in hist["steps"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5
    e = hist["epochs"][-1]
    # whole sequences: a step holds many items, so items/s > windows/s
    assert e["samples_per_s"] > 0 and e["step"] * 8 < 2 * len(p.table("train"))
    model = assert_plain_export(full_target, p)
    assert model.config.model_type == "llama"


def test_lora_trains_adapters_and_code_rows_and_exports_merged(lora_target, llama_dir, llm_prep):
    from transformers import AutoModelForCausalLM

    p = load_prepared(llm_prep)
    hist = json.loads((lora_target / "training.json").read_text())
    losses = [loss for _, loss in hist["steps"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3
    model = assert_plain_export(lora_target, p)
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    n = base.get_input_embeddings().weight.shape[0]
    got, ref = model.state_dict(), base.state_dict()
    for name, w in ref.items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            torch.testing.assert_close(got[name][:n], w, rtol=0, atol=0)  # base rows frozen
            assert float((got[name][n:] - got[name][n:].mean(0)).abs().max()) > 1e-4  # trained
        elif name.endswith(("q_proj.weight", "v_proj.weight")):
            assert not torch.equal(got[name], w)  # adapter merged in
        else:
            torch.testing.assert_close(got[name], w, rtol=0, atol=0)  # frozen


def test_local_bf16_autocast_trains(llama_dir, llm_prep, tmp_path):
    from atspeed_ray.training.trainer import fit

    res = fit(llm_cfg(data=str(llm_prep), out=str(tmp_path), init=str(llama_dir), epochs=1,
                      precision="bf16", val_samples=0, samples="prefix", max_samples=64),
              log=lambda m: None)
    assert np.isfinite(res["epochs"][-1]["loss"]) and res["epochs"][-1]["samples_per_s"] > 0
    assert_plain_export(tmp_path, load_prepared(llm_prep))


# ---------------------------------------------------------------------------- drafts
@pytest.fixture(scope="module")
def qwen_case(tmp_path_factory) -> tuple[Path, Path]:
    """A tied Qwen2 (vocabulary padded past its tokenizer) fine-tuned with LoRA."""
    from atspeed_ray.training.trainer import fit

    root = tmp_path_factory.mktemp("qwen")
    base = tiny_llm_folder(root / "base", "qwen2")
    prep = prepare_for(base, root / "prep")
    fit(llm_cfg(data=str(prep), out=str(root / "target"), init=str(base), lora_r=4, lora_alpha=8,
                lr=1e-2), log=lambda m: None)
    return root / "target", prep


@pytest.mark.parametrize("which", ["full", "lora", "qwen2-lora"])
def test_drafts_for_an_llm_target_decode_exactly(which, full_target, lora_target, llm_prep,
                                                 qwen_case, tmp_path):
    """``align --init-layers 1`` cuts a draft from the LLM target (GQA heads, its embeddings and
    head, tied or not); a fresh preset draft gets the target's vocabulary size; with either,
    strict speculative beam search equals the target's beam search."""
    from atspeed_ray.decoding import beam_search, speculative_beam_search
    from atspeed_ray.models import load_decoder, load_weights
    from atspeed_ray.training.trainer import fit

    target_dir, prep = {"full": (full_target, llm_prep), "lora": (lora_target, llm_prep),
                        "qwen2-lora": qwen_case}[which]
    llm_prep = prep
    p = load_prepared(llm_prep)
    drafts = {}
    for name, kw in {"cut": dict(init_layers=1), "fresh": dict(preset="tiny")}.items():
        out = tmp_path / name
        fit(llm_cfg(task="align", data=str(llm_prep), target=str(target_dir), out=str(out),
                    loss="sft", epochs=1, val_draft_beams=6, **kw), log=lambda m: None)
        drafts[name] = load_weights(out, DeviceConfig(device="cpu", dtype="float64"))
    target = load_decoder(target_dir, DeviceConfig(device="cpu", dtype="float64"))
    cut, fresh = drafts["cut"], drafts["fresh"]
    assert cut.config.num_hidden_layers == 1 and cut.config.num_key_value_heads == 2
    rows = load_weights(target_dir, CPU32).get_input_embeddings().weight.shape[0]
    assert rows >= len(p.tokenizer)
    assert fresh.get_input_embeddings().weight.shape[0] == rows
    assert cut.config.tie_word_embeddings == (which == "qwen2-lora")
    prompts = p.prompts("test", 4)
    for k in (1, 3, 5):
        ref = beam_search(target, prompts, p.index, k)
        for draft in drafts.values():
            out = speculative_beam_search(target, draft, prompts, p.index, k, draft_beams=2 * k,
                                          gamma=2, mode="strict")
            assert out.items == ref.items and torch.equal(out.sequences, ref.sequences)
            torch.testing.assert_close(out.scores, ref.scores, atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------- Ray Train + DeepSpeed
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_ray_zero2_lora_resume_and_merged_export(ray_local, llama_dir, llm_prep, tmp_path):
    """LoRA on Ray Train + DeepSpeed ZeRO-2 (one worker): the run dies after epoch 1, ``--resume``
    finishes it from the checkpoint (adapters, token rows and optimizer state); the merged
    export reloads as a plain model with the trained module's logits."""
    from atspeed_ray.training.trainer import fit
    from tests.helpers import load_probe

    out, storage = tmp_path / "target", tmp_path / "ray"
    cfg = llm_cfg(runner="ray", workers=1, zero_stage=2, data=str(llm_prep), out=str(out),
                  init=str(llama_dir), lora_r=4, lora_alpha=8, lr=1e-2, storage_path=str(storage),
                  fail_after_epoch=1, max_failures=0, save_probe=True)
    with pytest.raises(Exception, match="injected failure"):
        fit(cfg)
    res = fit(cfg.model_copy(update={"resume": True}))
    assert res["epoch"] == 2 and len(res["epochs"]) == 2
    assert res["epochs"][1]["loss"] < res["epochs"][0]["loss"]
    model = assert_plain_export(out, load_prepared(llm_prep))
    batch, logits = load_probe(out / "probe.safetensors")
    with torch.no_grad():
        from atspeed_ray.training.core import forward_branches

        torch.testing.assert_close(forward_branches(model.eval(), batch), logits, rtol=0, atol=1e-5)
