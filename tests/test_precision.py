"""Decoding precision: ``--precision`` resolution (bf16 only on CPUs with native bf16 matmuls),
and the bf16 path of strict speculative search."""

from __future__ import annotations

import json

import pytest
import torch

from atspeed_ray.decoding import beam_search, speculative_beam_search
from atspeed_ray.decoding.fast_llama import fast_forward
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


def test_bf16_strict_search_runs_and_matches_beam_search_items():
    """Not an exactness test: in bf16 the verification pass (one tree forward) and beam search
    (one forward per step) round differently, so scores differ by bf16 rounding (~4e-3 here) and
    a near-tie could swap two items. On this well-separated model the items agree; the exact
    specification runs in fp64 (tests/test_speculative.py)."""
    codebook = [24, 24, 24, 24]
    index = random_catalog(2500, codebook, seed=0)
    V = vocab_size(codebook)
    target = fast_forward(random_model(V, seed=1, dtype=torch.bfloat16))
    draft = fast_forward(random_model(V, seed=7, hidden=16, layers=1, dtype=torch.bfloat16))
    prompts = random_prompts(4, V, seed=2)
    for k, n, gamma in [(1, 1, 3), (5, 10, 1), (10, 20, 3)]:
        ref = beam_search(target, prompts, index, k)
        out = speculative_beam_search(target, draft, prompts, index, k, draft_beams=n, gamma=gamma)
        assert out.items == ref.items and out.scores.dtype == torch.float32
        torch.testing.assert_close(out.scores, ref.scores, atol=2e-2, rtol=0)
