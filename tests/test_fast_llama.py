"""FastLlama (the compact decoding forward) against the HF Llama it is read from."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config
from transformers import Qwen2ForCausalLM

from atspeed_ray.decoding import beam_search, speculative_beam_search
from atspeed_ray.decoding.fast_llama import FastLlama, fast_forward, onednn_packs_bf16, unsupported_reason
from atspeed_ray.decoding.tree import Nodes, left_pad, tree_forward
from atspeed_ray.models import DeviceConfig, first_layers, load_decoder, save_model
from tests.helpers import random_catalog, random_model, random_prompts, vocab_size

CODEBOOK = [16, 16, 16, 16]


# SmolLM2-135M's structure, shrunk: 9 query heads over 3 key/value heads (GQA 3:1), tied
# embeddings, rope base 1e5 with no scaling, rms eps 1e-5 (the real one: hidden 576, 30 layers)
SMOLLM2_LIKE = dict(hidden_size=36, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=96, tie_word_embeddings=True, rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0})


def llama(vocab: int, seed: int, **cfg) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    base = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, intermediate_size=64, max_position_embeddings=128,
                pad_token_id=0)
    return LlamaForCausalLM(LlamaConfig(**{**base, **cfg})).to(torch.float64).eval()


def tree_chunk(B: int, vocab: int, seed: int) -> Nodes:
    """Two levels below the prompt: 3 roots, each with 2 children."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (B, 9), generator=g)
    depth = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1]).expand(B, 9)
    parent = torch.tensor([-1, -1, -1, 0, 0, 1, 1, 2, 2]).expand(B, 9)
    cached = torch.full((B, 9, 4), -1)
    valid = torch.ones(B, 9, dtype=torch.bool)
    valid[0, 4] = False  # an invalid node: sees itself only, seen by no one
    return Nodes(tokens, depth, parent, cached, valid)


def prompts_and_tree(vocab: int) -> tuple[torch.Tensor, torch.Tensor, Nodes]:
    """Three left-padded prompts (tokens, valid [3, P]) and a tree chunk below them."""
    prompts = random_prompts(3, vocab, seed=4, min_len=2, max_len=9)
    tokens, valid = left_pad(prompts, 0, torch.device("cpu"))
    return tokens, valid, tree_chunk(3, vocab, seed=5)


def assert_same_chunks(got: tuple, ref: tuple, real: torch.Tensor, tol: float) -> None:
    """(prompt + tree logits, next chunk's logits, cache) of two forwards agree; ``real`` [B, P + T]
    marks the first chunk's positions that are real tokens (left padding is not compared)."""
    (l_got, l2_got, c_got), (l_ref, l2_ref, c_ref) = got, ref
    torch.testing.assert_close(l_got[real], l_ref[real], rtol=tol, atol=tol)
    torch.testing.assert_close(l2_got, l2_ref, rtol=tol, atol=tol)
    for a, b in zip(c_got.kv.layers, c_ref.kv.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=tol, atol=tol)
        torch.testing.assert_close(a.values, b.values, rtol=tol, atol=tol)


@pytest.mark.parametrize("cfg", [
    {},
    {"num_key_value_heads": 2},  # grouped-query attention
    {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}},
    {"tie_word_embeddings": True},
    SMOLLM2_LIKE,
])
def test_logits_and_cache_equal_the_hf_forward(cfg):
    V = 50
    hf = llama(V, seed=3, **cfg)
    fast = FastLlama(hf)
    tokens, valid, nodes = prompts_and_tree(V)
    outs = []
    for model in (hf, fast):
        logits, cache, _ = tree_forward(model, None, nodes, prompt=(tokens, valid), prompt_logits=True)
        # a second chunk hanging below the first one's nodes (cached ancestors)
        more = Nodes(nodes.tokens[:, :3].flip(1), torch.full((3, 3), 2), torch.full((3, 3), -1),
                     torch.full((3, 3, 4), -1), torch.ones(3, 3, dtype=torch.bool))
        more.cached[:, :, 0] = tokens.shape[1] + torch.tensor([0, 1, 2])
        more.cached[:, :, 1] = tokens.shape[1] + torch.tensor([3, 5, 7])
        logits2, cache, _ = tree_forward(model, cache, more)
        outs.append((logits, logits2, cache))
        # decoding asks only for the prompt's last position and the nodes: the same numbers
        # (FastLlama then runs its last layer's attention and MLP for those rows only)
        trimmed, trimmed_cache, _ = tree_forward(model, None, nodes, prompt=(tokens, valid))
        torch.testing.assert_close(trimmed, logits[:, tokens.shape[1] - 1:])
        full_cache = tree_forward(model, None, nodes, prompt=(tokens, valid), prompt_logits=True)[1]
        for a, b in zip(trimmed_cache.kv.layers, full_cache.kv.layers):
            torch.testing.assert_close(a.keys, b.keys)
            torch.testing.assert_close(a.values, b.values)
    assert_same_chunks(outs[1], outs[0], torch.cat([valid, nodes.valid], 1), tol=1e-9)


def test_decoding_on_fast_llama_equals_decoding_on_hf():
    index = random_catalog(1500, CODEBOOK, seed=0)
    V = vocab_size(CODEBOOK)
    target, draft = random_model(V, seed=1), random_model(V, seed=7, hidden=16, layers=1)
    f_target, f_draft = fast_forward(target), fast_forward(draft)
    assert isinstance(f_target, FastLlama) and isinstance(f_draft, FastLlama)
    prompts = random_prompts(4, V, seed=2)
    for k in (1, 5, 10):
        ref = beam_search(target, prompts, index, k)
        fast = beam_search(f_target, prompts, index, k)
        assert fast.items == ref.items
        torch.testing.assert_close(fast.scores, ref.scores, atol=1e-9, rtol=0)
        for d in (f_draft, f_target):
            spec = speculative_beam_search(f_target, d, prompts, index, k, draft_beams=2 * k, gamma=3)
            assert spec.items == ref.items
            torch.testing.assert_close(spec.scores, ref.scores, atol=1e-9, rtol=0)
        # mixed: FastLlama target, HF draft (each side may run either forward)
        mixed = speculative_beam_search(f_target, draft, prompts, index, k, draft_beams=k, gamma=2)
        assert mixed.items == ref.items


def test_smollm2_structure_runs_on_fast_llama_with_one_embedding_matrix():
    hf = llama(50, seed=6, **SMOLLM2_LIKE)
    assert hf.config.num_attention_heads == 3 * hf.config.num_key_value_heads
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    fast = fast_forward(hf)
    assert isinstance(fast, FastLlama) and fast.lm_head is fast.embed
    assert sum(p.numel() for p in fast.parameters()) == sum(p.numel() for p in hf.parameters())
    # the rope table is the HF rotary module's (base 1e5): compare one far position directly
    pos = torch.tensor([[0, 1, 97]])
    cos, sin = hf.model.rotary_emb(torch.zeros(1, 3, 1, dtype=torch.float64), pos)
    torch.testing.assert_close(fast.cos[pos[0]], cos[0])
    torch.testing.assert_close(fast.sin[pos[0]], sin[0])
    untied = llama(50, seed=6, **{**SMOLLM2_LIKE, "tie_word_embeddings": False})
    assert FastLlama(untied).lm_head is not FastLlama(untied).embed


def qwen2(vocab: int, seed: int, hidden: int = 32, layers: int = 2, scale: float = 4.0
          ) -> Qwen2ForCausalLM:
    """A random fp64 Qwen2 (q/k/v biases, GQA 2:1) with logits spread like ``random_model``'s."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128,
        pad_token_id=0, tie_word_embeddings=True))
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(scale)
    return model.to(torch.float64).eval()


def test_decoding_runs_on_a_qwen2_with_its_hf_forward():
    """Beam search and strict speculative beam search take any HF causal LM: a Qwen2 target with
    a Qwen2 draft (and with itself as the draft) gives the target's beams exactly."""
    index = random_catalog(800, CODEBOOK, seed=3)
    V = vocab_size(CODEBOOK)
    target, draft = qwen2(V, seed=1), qwen2(V, seed=2, hidden=16, layers=1)
    assert fast_forward(target) is target
    prompts = random_prompts(3, V, seed=4)
    for k in (1, 5):
        ref = beam_search(target, prompts, index, k)
        for d in (draft, target):
            spec = speculative_beam_search(target, d, prompts, index, k, draft_beams=2 * k, gamma=3)
            assert spec.items == ref.items
            torch.testing.assert_close(spec.scores, ref.scores, atol=1e-9, rtol=0)


def test_other_architectures_keep_their_hf_forward():
    V = 40
    biased = llama(V, seed=0, attention_bias=True)
    assert "attention_bias" in unsupported_reason(biased)
    assert fast_forward(biased) is biased
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=64)).eval()
    assert fast_forward(qwen) is qwen
    with pytest.raises(ValueError, match="model_type 'qwen2'"):
        FastLlama(qwen)


def test_first_layers_and_load_decoder_follow_the_forward_setting(tmp_path):
    hf = llama(40, seed=2)
    cut = first_layers(llama(40, seed=2), 1)
    assert cut.config.num_hidden_layers == 1 and len(cut.model.layers) == 1
    ids = torch.tensor([[3, 4, 5]])
    full_layer0 = hf.model.layers[0].mlp.down_proj.weight
    assert torch.equal(cut.model.layers[0].mlp.down_proj.weight, full_layer0)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[PAD]": 0}, "[PAD]")),
                                  pad_token="[PAD]")
    save_model(cut, tok, tmp_path)
    cpu64 = dict(device="cpu", dtype="float64")
    fast = load_decoder(tmp_path, DeviceConfig(**cpu64))
    plain = load_decoder(tmp_path, DeviceConfig(**cpu64, forward="hf"))
    assert isinstance(fast, FastLlama) and isinstance(plain, LlamaForCausalLM)
    pos = torch.arange(3)[None]
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.float64).masked_fill(
        ~torch.tril(torch.ones(3, 3, dtype=torch.bool)), torch.finfo(torch.float64).min)
    torch.testing.assert_close(fast(ids, mask, pos, fast.new_cache()).logits,
                               plain(input_ids=ids, attention_mask=mask, position_ids=pos).logits)
    torch.testing.assert_close(plain(input_ids=ids).logits, cut(input_ids=ids).logits)


def test_a_prompt_past_the_rope_table_is_a_clear_error():
    fast = FastLlama(llama(40, seed=0))
    too_long = fast.cos.shape[0] - 10
    with pytest.raises(ValueError, match=f"chunk of {too_long} tokens .* rope table"):
        fast(torch.ones(1, too_long, dtype=torch.long))


def test_logits_to_keep_rows_equal_the_full_forward():
    """Kept rows (the last n, or given positions) are computed through a last layer that runs
    attention and MLP for them only; with a mask or without one (causal)."""
    fast = FastLlama(llama(40, seed=1, num_key_value_heads=2))
    ids = torch.randint(1, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(7).expand(2, 7)
    mask = torch.zeros(2, 1, 7, 7, dtype=torch.float64).masked_fill(
        ~torch.tril(torch.ones(7, 7, dtype=torch.bool)), torch.finfo(torch.float64).min)
    full = fast(ids, mask, pos, fast.new_cache()).logits
    torch.testing.assert_close(fast(ids).logits, full)  # causal path, no mask
    for keep, rows in ((3, slice(4, 7)), (torch.tensor([0, 5]), [0, 5])):
        torch.testing.assert_close(fast(ids, mask, pos, fast.new_cache(), logits_to_keep=keep).logits,
                                   full[:, rows])
        torch.testing.assert_close(fast(ids, logits_to_keep=keep).logits, full[:, rows])


def test_static_cache_writes_and_compacts_in_place_as_the_plain_gather():
    """``KVCache`` (buffers allocated once) against the plain reference ``gather_slots`` (new
    tensors of the kept slots): the same keys/values after a compaction, the buffers kept, and
    the next chunk's logits equal to a plain forward's (``tree_forward`` on the HF model)."""
    from types import SimpleNamespace

    from atspeed_ray.decoding.cache import KVCache, gather_slots

    V = 50
    hf = llama(V, seed=3)
    fast = FastLlama(hf)
    tokens, valid, nodes = prompts_and_tree(V)
    _, cache, slots = tree_forward(fast, None, nodes, prompt=(tokens, valid))
    assert isinstance(cache.kv, KVCache)
    bufs = [layer.k_buf for layer in cache.kv.layers]
    plain = SimpleNamespace(layers=[SimpleNamespace(keys=layer.keys.clone(), values=layer.values.clone())
                                    for layer in cache.kv.layers])
    keep = slots[:, [1, 4, 6]]  # [B, 3] tree slots that stay (some rows reference fewer)
    keep[0, 2] = -1
    renum = cache.compact(keep)
    P = tokens.shape[1]
    S = cache.size
    gather = torch.arange(S).expand(3, S).clone()
    for b in range(3):
        kept = sorted(int(x) for x in keep[b] if x >= 0)
        gather[b, P:P + len(kept)] = torch.tensor(kept)
        gather[b, P + len(kept):] = gather[b, P + len(kept) - 1]  # padding columns: any kept slot
    gather_slots(plain, gather)
    for b in range(3):
        n = P + int((keep[b] >= 0).sum())
        for a, ref in zip(cache.kv.layers, plain.layers):
            torch.testing.assert_close(a.keys[b, :, :n], ref.keys[b, :, :n], rtol=0, atol=0)
            torch.testing.assert_close(a.values[b, :, :n], ref.values[b, :, :n], rtol=0, atol=0)
    assert all(layer.k_buf is buf for layer, buf in zip(cache.kv.layers, bufs)), "reallocated"
    assert cache.kv.grows == 0
    assert (renum[keep >= 0] >= P).all()


needs_mkl = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch without MKL")
needs_onednn = pytest.mark.skipif(not onednn_packs_bf16(),
                                  reason="torch without oneDNN, or a CPU it does not pack bf16 on")


@needs_mkl
@pytest.mark.parametrize("cfg", [{}, SMOLLM2_LIKE])
def test_packed_weights_give_the_plain_forward(cfg):
    """``pack_weights`` (MKL-packed fp32 projections and head): the same logits and cache as the
    plain forward, for a prompt block, a tree chunk below it, and a code head packed after it."""
    V = 50
    hf = llama(V, seed=3, **cfg).float()
    plain, packed = FastLlama(hf), FastLlama(hf)
    assert packed.pack_weights() and packed.packed is not None
    assert {w.lib for ws in packed.packed.values() for w in ws} == {"mkl"}
    tokens, valid, nodes = prompts_and_tree(V)
    outs = []
    for model in (plain, packed):
        logits, cache, _ = tree_forward(model, None, nodes, prompt=(tokens, valid), prompt_logits=True)
        logits2, cache, _ = tree_forward(model, cache, tree_chunk(3, V, seed=6))
        outs.append((logits, logits2, cache))
    assert_same_chunks(outs[1], outs[0], torch.cat([valid, nodes.valid], 1), tol=1e-5)
    # a code head restricted after packing is packed too, and reads the same rows
    head = torch.tensor([7, 3, 11])
    for m in (plain, packed):
        m.restrict_head(head)
    assert packed.packed["lm_head"][0].out_features == 3
    ids = tokens[:, -2:]
    torch.testing.assert_close(packed(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_packed_bf16_weights_give_the_plain_bf16_forward():
    hf = llama(50, seed=3, **SMOLLM2_LIKE).to(torch.bfloat16)
    plain, packed = FastLlama(hf), FastLlama(hf)
    assert packed.pack_weights() and packed.packed["wqkv"][0].lib == "onednn"
    ids = torch.tensor([[3, 4, 5, 9, 2]])
    torch.testing.assert_close(packed(ids).logits, plain(ids).logits, rtol=2e-2, atol=2e-2)


def test_weights_are_packed_only_where_a_library_packs_them(tmp_path):
    fast64 = FastLlama(llama(40, seed=2))  # fp64: no library packs it
    assert not fast64.pack_weights() and fast64.packed is None
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[PAD]": 0}, "[PAD]")),
                                  pad_token="[PAD]")
    save_model(llama(40, seed=2).float(), tok, tmp_path)
    on = load_decoder(tmp_path, DeviceConfig(device="cpu", dtype="float32"))
    off = load_decoder(tmp_path, DeviceConfig(device="cpu", dtype="float32", pack=False))
    assert off.packed is None
    assert (on.packed is not None) == torch.backends.mkl.is_available()
    if on.packed is not None:  # a dtype change repacks (or unpacks) with the parameters
        on.double()
        assert on.packed is None
        on.float()
        assert on.packed is not None and on.packed["wo"][0].weight.dtype == torch.float32
