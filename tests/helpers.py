"""Shared test helpers: random catalogs, seeded random tiny Llamas, the training probe reader."""

from __future__ import annotations

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
    from atspeed_ray.serving.catalog import load_catalog

    data, tpath, dpath = prepared_random_pair(tmp, users=120, items=300, seed=seed)
    f64 = DeviceConfig(device="cpu", dtype="float64")
    target, _ = load_model(tpath, f64)
    draft, _ = load_model(dpath, f64)
    catalog = load_catalog(str(data), str(tpath))
    return catalog, target, draft, [catalog.prompt(h) for h in catalog.examples[:n_prompts]]
