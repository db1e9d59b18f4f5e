"""Shared test helpers: random catalogs, seeded random tiny Llamas, the training probe reader."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import torch

from atspeed_ray.data.index import ItemIndex
from atspeed_ray.models import LlamaSize, build_llama
from atspeed_ray.training.core import Batch

N_SPECIAL = 5  # pad, bos, eos, unk, sep (as in atspeed_ray.data.tokenizer)


def random_catalog(num_items: int, codebook: list[int], seed: int) -> ItemIndex:
    """Items with distinct random code tuples; level d uses token ids after level d-1's."""
    g = torch.Generator().manual_seed(seed)
    offsets = [N_SPECIAL]
    for c in codebook[:-1]:
        offsets.append(offsets[-1] + c)
    seen: dict[tuple[int, ...], int] = {}
    while len(seen) < num_items:
        t = tuple(int(torch.randint(c, (1,), generator=g)) + o for c, o in zip(codebook, offsets))
        seen.setdefault(t, len(seen))
    return ItemIndex.from_codes({i: list(t) for t, i in seen.items()})


def vocab_size(codebook: list[int]) -> int:
    return N_SPECIAL + sum(codebook)


def random_model(vocab: int, seed: int, hidden: int = 32, layers: int = 2, heads: int = 4,
                 dtype: torch.dtype = torch.float64, scale: float = 4.0) -> torch.nn.Module:
    """A random Llama whose logits are spread enough that beams differ (no near-ties in fp64)."""
    model = build_llama(LlamaSize(hidden_size=hidden, num_layers=layers, num_heads=heads), vocab,
                        pad_token_id=0, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale) if not model.config.tie_word_embeddings else \
            model.model.embed_tokens.weight.mul_(scale)
    return model.to(dtype).eval()


def random_prompts(n: int, vocab: int, seed: int, min_len: int = 3, max_len: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        out.append(torch.randint(1, vocab, (length,), generator=g).tolist())
    return out


def load_probe(path: Path) -> tuple[Batch, torch.Tensor]:
    """The batch and logits the ``save_probe`` training hook stored (training.probe)."""
    from safetensors.torch import load_file

    t = load_file(str(path))
    batch = Batch(t["input_ids"], t["position_ids"], t["visible"].bool(), t["query"], t["qmap"],
                  t["codes"], t["branch_valid"], t["nodes"])
    return batch, t["logits"]


def prepared_random_pair(tmp: Path, users: int, items: int, seed: int) -> tuple[Path, Path, Path]:
    """A prepared synthetic data folder and a random tiny (target, draft) pair on it."""
    from atspeed_ray.data.prepare import prepare
    from atspeed_ray.data.synthetic import SyntheticConfig
    from atspeed_ray.serving.testing import build_random_pair

    data = tmp / "data"
    prepare("synthetic", data, synthetic=SyntheticConfig(num_users=users, num_items=items))
    target, draft = build_random_pair(data, tmp / "models", "tiny", seed=seed)
    return data, target, draft


def serving_random_pair(tmp: Path, n_prompts: int, seed: int = 3):
    """``prepared_random_pair`` (120 users, 300 items) loaded for serving tests: its catalog, the
    fp64 target and draft, and the prompts of the catalog's first ``n_prompts`` examples."""
    from atspeed_ray.models import DeviceConfig, load_model
    from atspeed_ray.data.catalog import load_catalog

    data, tpath, dpath = prepared_random_pair(tmp, users=120, items=300, seed=seed)
    f64 = DeviceConfig(device="cpu", dtype="float64")
    target, _ = load_model(tpath, f64)
    draft, _ = load_model(dpath, f64)
    catalog = load_catalog(str(data), str(tpath))
    return catalog, target, draft, [catalog.prompt(h) for h in catalog.examples[:n_prompts]]


# The strict grid every draft kind runs: K x (N / K) x gamma, each without children steps (cap 0)
# and with them capped where the trie is narrow (16) and always (10,000).
STRICT_GRID = list(itertools.product([1, 3, 5, 10, 20], [1, 2], [1, 2, 3]))
CHILDREN_CAPS = (0, 16, 10_000)


def assert_same_as_beam_search(out, ref) -> None:
    """Strict speculative output ``out`` equals beam search ``ref``: items, order and scores."""
    assert out.items == ref.items
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.scores, ref.scores, atol=1e-4, rtol=0)


def strict_runs(target, draft, batch: list[list[int]], index: ItemIndex, k: int,
                n: int | tuple[int, ...], gamma: int) -> Iterator[tuple[int, object]]:
    """(children cap, result) of strict speculative search of ``batch`` for every cap of
    ``CHILDREN_CAPS``; ``draft`` is a causal LM or a ``Drafter``."""
    from atspeed_ray.decoding.search import SearchParams
    from atspeed_ray.decoding.speculative import speculative_search

    for cap in CHILDREN_CAPS:
        yield cap, speculative_search(target, draft, batch, index,
                                      SearchParams(k, n, gamma, expand_last=cap))


def plackett_luce(w: dict[int, float], draws: int) -> dict[tuple[int, ...], float]:
    """Ordered draws without replacement, each in proportion to weight ``w`` among those left
    (what Gumbel top-k samples): {(x1, ..., x_draws): probability}."""
    out: dict[tuple[int, ...], float] = {}
    for seq in itertools.permutations([x for x, v in w.items() if v > 0], draws):
        prob, left = 1.0, sum(w.values())
        for x in seq:
            prob *= w[x] / left
            left -= w[x]
        out[seq] = out.get(seq, 0.0) + prob
    return out


def relaxed_first_step(p: dict[int, float], q: dict[int, float], K: int, N: int,
                       residual: bool = True) -> dict[frozenset, float]:
    """The distribution of the K beams relaxed verification keeps after one drafted step from a
    single root beam (derived from the scheme, not from the code): the draft proposes N codes
    sampled without replacement from q; each proposal y is accepted with probability
    min(1, p(y)/q(y)); with >= K accepted, K of them uniformly at random; else all accepted ones
    plus draws without replacement from norm(max(p - q, 0)) over the rest (p over the rest if
    that is all zero). ``residual=False``: a wrong scheme that refills from p instead."""
    acc = {y: min(1.0, p[y] / q[y]) for y in q}
    out: dict[frozenset, float] = {}

    def add(s: frozenset, prob: float) -> None:
        out[s] = out.get(s, 0.0) + prob

    for drafted, p_draft in plackett_luce(q, N).items():
        for mask in itertools.product([False, True], repeat=N):
            A = [y for y, m in zip(drafted, mask) if m]
            prob = p_draft
            for y, m in zip(drafted, mask):
                prob *= acc[y] if m else 1.0 - acc[y]
            if len(A) >= K:
                subsets = list(itertools.combinations(A, K))
                for s in subsets:
                    add(frozenset(s), prob / len(subsets))
                continue
            resid = {y: 0.0 if y in A else max(p[y] - q[y], 0.0) for y in p}
            if sum(resid.values()) <= 0 or not residual:
                resid = {y: 0.0 if y in A else p[y] for y in p}
            assert sum(v > 0 for v in resid.values()) >= K - len(A), "degenerate case: pick other seeds"
            for fill, p_fill in plackett_luce(resid, K - len(A)).items():
                add(frozenset(A) | frozenset(fill), prob * p_fill)
    return out
