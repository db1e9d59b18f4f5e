"""Shared test helpers: random catalogs, seeded random tiny Llamas, the training probe reader."""

from __future__ import annotations

import itertools
import math
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
# and with them capped where the trie is narrow (16) and wide (``WIDE_CHILDREN``).
STRICT_GRID = list(itertools.product([1, 3, 5, 10, 20], [1, 2], [1, 2, 3]))
# children caps: off, narrow levels only, and wide (every level past a round's first drafted step
# of these tests' catalogs, the last one always)
WIDE_CHILDREN = 512
CHILDREN_CAPS = (0, 16, WIDE_CHILDREN)


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


def sampled_beam_search(target: torch.nn.Module, prompt: list[int], index: ItemIndex, K: int
                        ) -> dict[frozenset, float]:
    """The exact distribution of the item set the target's sampled beam search returns
    (enumerated, not sampled): at every code position, K draws without replacement (fewer if
    there are fewer candidates) from the softmax of the cumulative log-probs (full-vocabulary
    log-softmax, no renormalisation over the trie) of every trie child of the current beams.
    {frozenset(item ids): probability}. For tiny catalogs only."""
    codes = {tuple(index.codes[r].tolist()): int(index.items_of(index.codes[r][None])[0])
             for r in range(index.codes.shape[0])}
    logp: dict[tuple[int, ...], torch.Tensor] = {}

    def after(prefix: tuple[int, ...]) -> torch.Tensor:
        if prefix not in logp:
            with torch.no_grad():
                logits = target(torch.tensor([prompt + list(prefix)])).logits[0, -1]
            logp[prefix] = torch.log_softmax(logits.double(), -1)
        return logp[prefix]

    Beam = tuple[tuple[int, ...], float]  # (code prefix, cumulative log-prob)
    states: dict[frozenset[Beam], float] = {frozenset({((), 0.0)}): 1.0}
    for d in range(index.L):
        nxt: dict[frozenset[Beam], float] = {}
        for beams, prob in states.items():
            cands = sorted({(pre + (c[d],), s + float(after(pre)[c[d]]))
                            for pre, s in beams for c in codes if c[:d] == pre})
            w = {i: math.exp(s) for i, (_, s) in enumerate(cands)}
            for seq, p_seq in plackett_luce(w, min(K, len(cands))).items():
                key = frozenset(cands[i] for i in seq)
                nxt[key] = nxt.get(key, 0.0) + prob * p_seq
        states = nxt
    out: dict[frozenset, float] = {}
    for beams, prob in states.items():
        items = frozenset(codes[pre] for pre, _ in beams)
        out[items] = out.get(items, 0.0) + prob
    return out


def set_tvd(a: dict[frozenset, float], b: dict[frozenset, float]) -> float:
    """Total variation distance between two distributions over sets."""
    return 0.5 * sum(abs(a.get(x, 0.0) - b.get(x, 0.0)) for x in set(a) | set(b))


def item_set_frequencies(items: list[list[int]]) -> dict[frozenset, float]:
    """The empirical distribution of the returned item sets."""
    out: dict[frozenset, float] = {}
    for row in items:
        out[frozenset(row)] = out.get(frozenset(row), 0.0) + 1 / len(items)
    return out
