"""Decoding precision: ``--precision`` resolution (bf16 only on CPUs with native bf16 matmuls),
and the bf16 path of strict speculative search."""

from __future__ import annotations

import json

import pytest
import torch

from atspeed_ray.decoding import beam_search, speculative_beam_search
from atspeed_ray.decoding.fast_llama import (AMX_CALL_ROWS, PackedWeight, amx_calls, cpu_has_amx,
                                             fast_forward, invariant_attention, linear,
                                             tree_key_slots)
from atspeed_ray.decoding.tree import additive_mask
from atspeed_ray.models import cpu_bf16_flags, decoding_dtype
from tests.helpers import random_catalog, random_model, random_prompts, vocab_size

CPU = torch.device("cpu")


def cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: fpu sse2 {flags}\n\n"
                    f"processor\t: 1\nflags\t\t: fpu sse2 {flags}\n")
    return path


@pytest.mark.parametrize("flags,expected", [("avx512f avx512_bf16", "bfloat16"),
                                            ("amx_tile amx_bf16", "bfloat16"),
                                            ("avx2 avx512f", "float32")])
def test_bf16_on_a_cpu_only_with_native_bf16(tmp_path, flags, expected):
    info = cpuinfo(tmp_path, flags)
    dtype, why = decoding_dtype("bf16", CPU, info)
    assert dtype == expected
    assert ("avx512_bf16" in why or "amx_bf16" in why) if expected == "bfloat16" else "neither" in why


def test_other_precisions_on_a_cpu(tmp_path):
    info = cpuinfo(tmp_path, "avx512_bf16")
    assert decoding_dtype("auto", CPU, info)[0] == "float32"  # auto never changes CPU results
    assert decoding_dtype("fp32", CPU, info)[0] == "float32"
    assert decoding_dtype("fp16", CPU, info) == ("float32", "fp32 (fp16 asked, which needs a GPU)")
    assert cpu_bf16_flags(tmp_path / "missing") == []
    assert decoding_dtype("bf16", CPU, tmp_path / "missing")[0] == "float32"


def test_bench_prints_and_records_the_precision_it_used(tmp_path, capsys):
    from atspeed_ray.cli import main
    from tests.helpers import prepared_random_pair

    data, target, draft = prepared_random_pair(tmp_path, users=30, items=40, seed=5)
    out = tmp_path / "bench.json"
    assert main(["bench", "--data", str(data), "--target", str(target), "--draft", str(draft),
                 "--k", "3", "--num-prompts", "3", "--repeat", "1", "--precision", "bf16",
                 "--out", str(out)]) == 0
    expected, why = decoding_dtype("bf16", CPU)
    result = json.loads(out.read_text())
    assert result["precision"] == "bf16" and result["dtype"] == expected
    assert f"precision: {why}" in capsys.readouterr().out
    row = result["rows"][0]
    assert row["verify_ms"] > 0 and row["draft_ms"] > 0


# where bf16 strict search was measured bit-exact: native bf16 matmuls (AMX or AVX512-BF16)
INVARIANT_BF16 = pytest.mark.skipif(
    not cpu_bf16_flags(), reason="bf16 batch invariance needs a CPU with AMX or AVX512-BF16")


def test_amx_calls_cut_any_row_count_into_calls_of_the_agreeing_sizes():
    for m in range(1, 700):
        sizes = amx_calls(m)
        assert all(s in AMX_CALL_ROWS for s in sizes), m
        assert sum(sizes) == max(64, -(-m // 32) * 32), m  # no more padding than rounding up
        assert len(sizes) == max(1, -(-sum(sizes) // 128)), m


@pytest.mark.skipif(not cpu_has_amx(), reason="the AMX GEMM path runs on AMX CPUs only")
@pytest.mark.parametrize("shape", [(960, 576), (3072, 576), (576, 1536), (576, 576)])
def test_bf16_linear_gives_a_row_the_same_bits_in_calls_of_any_size_on_amx(shape):
    """The fast path beside its reference: oneDNN's AMX GEMMs sum a row differently by the
    call's row count; ``linear`` cuts every call into calls of the agreeing sizes, so each row
    gets the bits of a one-row call wherever and among however many rows it sits."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g).mul(0.05).bfloat16()
    x = torch.randn(300, shape[1], generator=g).bfloat16()
    for weight in (w, PackedWeight(w)):
        alone = torch.cat([linear(x[i:i + 1], weight) for i in range(0, 300, 7)])
        for m in (2, 10, 33, 46, 130, 300):
            rows = torch.cat([linear(x[o:o + m], weight) for o in range(0, 300, m)])
            assert torch.equal(rows[::7], alone), m


@pytest.mark.parametrize("prompt_cols", [None, 6])
def test_invariant_attention_is_sdpa_and_gives_a_row_the_same_bits_in_any_call(prompt_cols):
    """The reference beside the fast path: ``invariant_attention`` is SDPA (fp64, masked), and
    in bf16 a query row's result is the same whether it is computed alone or among other
    queries, and wherever the tree keys it sees sit among masked ones."""
    g = torch.Generator().manual_seed(0)
    B, H, S, D = 2, 3, 20, 8
    q, k, v = (torch.randn(B, H, S, D, generator=g, dtype=torch.float64) for _ in range(3))
    visible = torch.rand(B, 1, S, S, generator=g) < 0.4
    visible |= torch.eye(S, dtype=torch.bool)
    visible[..., :2] = True  # every query sees the first prompt keys
    mask = additive_mask(visible[:, 0], torch.float64)
    slots = None if prompt_cols is None else tree_key_slots(mask, prompt_cols)

    def attend(q, k, v, visible, dtype, slots=slots):
        return invariant_attention(q.to(dtype), k.to(dtype), v.to(dtype),
                                   additive_mask(visible[:, 0], dtype), 0.3, prompt_cols, slots)

    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(attend(q, k, v, visible, torch.float64), want)
    # grouped-query heads: 6 query heads on 3 key heads, as SDPA on repeated key heads
    q6 = torch.randn(B, 6, S, D, generator=g, dtype=torch.float64)
    want = torch.nn.functional.scaled_dot_product_attention(
        q6, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
        attn_mask=mask, scale=0.3)
    torch.testing.assert_close(attend(q6, k, v, visible, torch.float64), want)
    full = attend(q, k, v, visible, torch.bfloat16)
    for rows in (slice(0, 1), slice(5, 7), slice(3, 20)):
        part = attend(q[:, :, rows], k, v, visible[:, :, rows], torch.bfloat16,
                      None if slots is None else slots[:, rows])
        assert torch.equal(part, full[:, :, rows])
    if prompt_cols is None:
        return
    # query 9 of request 0 again, with masked junk keys inserted between the tree keys it sees
    junk = torch.randn(1, H, 5, D, generator=g, dtype=torch.float64)
    cut = prompt_cols + 7
    k2, v2 = (torch.cat([x[:1, :, :cut], junk, x[:1, :, cut:]], 2) for x in (k, v))
    vis2 = torch.cat([visible[:1, :, 9:10, :cut], torch.zeros(1, 1, 1, 5, dtype=torch.bool),
                      visible[:1, :, 9:10, cut:]], 3)
    slots2 = tree_key_slots(additive_mask(vis2[:, 0], torch.float64), prompt_cols)
    moved = attend(q[:1, :, 9:10], k2, v2, vis2, torch.bfloat16, slots2)
    assert torch.equal(moved, full[:1, :, 9:10])


@pytest.mark.parametrize("pad", [1, 3, 17, 40])
def test_invariant_attention_ignores_a_left_padded_prompt_block(pad):
    """A request decoded beside longer prompts has its prompt left-padded with masked key columns;
    its rows must keep the bits they get alone (bf16 strict answers must not depend on which
    requests share a call: a lane-grouped sum over the prompt block changed them, 19 of 32
    top-10 lists on the shared Beauty target at a batch of 8)."""
    g = torch.Generator().manual_seed(pad)
    H, Hkv, Q, P, D = 9, 3, 16, 101, 64  # SmolLM2-135M heads, a Beauty-length prompt
    q = torch.randn(1, H, Q, D, generator=g).bfloat16()
    k, v = (torch.randn(1, Hkv, P, D, generator=g).mul(3).bfloat16() for _ in range(2))
    visible = torch.ones(1, Q, P, dtype=torch.bool)
    alone = invariant_attention(q, k, v, additive_mask(visible, torch.bfloat16), 0.125)
    junk = torch.randn(1, Hkv, pad, D, generator=g).bfloat16()
    kp, vp = (torch.cat([junk, x], 2) for x in (k, v))
    vis_p = torch.cat([torch.zeros(1, Q, pad, dtype=torch.bool), visible], 2)
    padded = invariant_attention(q, kp, vp, additive_mask(vis_p, torch.bfloat16), 0.125)
    assert torch.equal(padded, alone)


@INVARIANT_BF16
@pytest.mark.parametrize("pack", [False, True])
def test_bf16_strict_search_is_exact_on_a_cpu_with_native_bf16(pack):
    """Strict speculative search in bf16 returns beam search's items and scores bit for bit: a
    token's logits do not depend on how many tokens share its forward (``invariant_attention``,
    ``linear``), on the CPUs where that was measured (AVX512-BF16 without AMX:
    ``results/beauty-llm/RUN.md``; AMX: ``results/beauty-smollm2/RUN.md``)."""
    codebook = [24, 24, 24, 24]
    index = random_catalog(2500, codebook, seed=0)
    V = vocab_size(codebook)
    target = fast_forward(random_model(V, seed=1, dtype=torch.bfloat16))
    draft = fast_forward(random_model(V, seed=7, hidden=16, layers=1, dtype=torch.bfloat16))
    if pack:
        assert target.pack_weights() and draft.pack_weights()
    prompts = random_prompts(6, V, seed=2, max_len=10)
    for k, n, gamma in [(1, 1, 3), (1, 2, 3), (3, 6, 3), (5, 5, 2), (5, 10, 1), (10, 10, 2)]:
        for batch in [[p] for p in prompts] + [prompts]:  # one by one, then all in one batch
            ref = beam_search(target, batch, index, k)
            out = speculative_beam_search(target, draft, batch, index, k, draft_beams=n, gamma=gamma)
            assert out.items == ref.items, (k, n, gamma, len(batch))
            assert torch.equal(out.scores, ref.scores), (k, n, gamma, len(batch))
