"""LLM targets: ``train-target --init`` (full and LoRA), whole-sequence training, drafts for an
LLM target. Tiny Llama / Qwen2 checkpoints with a BPE tokenizer are built in the test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from atspeed_ray.data.prepare import load_prepared, prepare
from atspeed_ray.data.synthetic import SyntheticConfig
from atspeed_ray.models import DeviceConfig

CPU32 = DeviceConfig(device="cpu", dtype="float32")
CORPUS = ["the user bought a red lipstick and a blue brush", "a small bottle of face cream",
          "hair oil, shampoo and a comb", "the next item is a perfume", "nail polish in green"] * 20


# ---------------------------------------------------------------------------- tiny LLMs
def bpe_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a few sentences (an LLM tokenizer in miniature)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>")


def tiny_llm(out: Path, arch: str = "llama", tied: bool = True, seed: int = 0) -> Path:
    """A random tiny causal LM of SmolLM2's shape scaled down (GQA 4/2 heads) + its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = bpe_tokenizer()
    kw = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw, rope_theta=100000.0))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def prepare_for(base_dir: Path, out: Path, history_len: int = 20) -> Path:
    """Synthetic data prepared with ``base_dir``'s tokenizer + the code tokens (added special
    tokens, one id each) and a plain-history prompt."""
    from transformers import AutoTokenizer

    prepare("synthetic", out, history_len=history_len,
            synthetic=SyntheticConfig(num_users=120, num_items=80, codebook_sizes=[6, 6, 6, 6], seed=3))
    word = load_prepared(out).tokenizer
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    codes = [t for t in word.get_vocab() if t.startswith("<") and t[1:2].isalpha() and "_" in t]
    codes.sort(key=word.convert_tokens_to_ids)
    tok.add_special_tokens({"additional_special_tokens": codes, "sep_token": "<sep>",
                            "pad_token": "<pad>"})
    old_to_new = {i: tok.convert_tokens_to_ids(t) for t, i in word.get_vocab().items()
                  if t in codes or t in ("<sep>", "<pad>")}
    old_to_new[word.bos_token_id] = tok.bos_token_id
    for split in ("train", "valid", "test"):
        t = pq.read_table(out / f"{split}.parquet")
        for col in ("prompt", "target_codes"):
            vals = [[old_to_new[i] for i in row] for row in t.column(col).to_pylist()]
            t = t.set_column(t.schema.get_field_index(col), col, pa.array(vals, pa.list_(pa.int32())))
        pq.write_table(t, out / f"{split}.parquet")
    tok.save_pretrained(out / "tokenizer")
    summary = json.loads((out / "summary.json").read_text())
    summary["vocab_size"] = len(tok)
    (out / "summary.json").write_text(json.dumps(summary))
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return tiny_llm(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def llm_prep(llama_dir, tmp_path_factory) -> Path:
    return prepare_for(llama_dir, tmp_path_factory.mktemp("llm_prep"))


# ---------------------------------------------------------------------------- whole sequences
def per_item_prefix_losses(model, prepared, rows) -> torch.Tensor:
    """[len(rows)] the per-prefix loss of each train row (one item each), one row at a time."""
    from atspeed_ray.training.core import collate, forward_branches
    from atspeed_ray.training.teacher import load_examples

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
    from atspeed_ray.training.teacher import load_examples

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
