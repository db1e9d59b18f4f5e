"""Random model pairs for smoke tests and for trying the app before trained models exist."""

from __future__ import annotations

from pathlib import Path

import torch

from atspeed_ray.models import LlamaSize, build_llama, get_preset, save_model


def build_random_pair(data: str | Path, out: str | Path, preset: str = "tiny", seed: int = 0,
                      scale: float = 4.0, draft_is_target: bool = False) -> tuple[Path, Path]:
    """Save a random target and draft (``out/target``, ``out/draft``) for a prepared data folder,
    each with the item index and prompt format beside it, like the training exports.

    ``scale`` multiplies the (tied) embeddings so that beams are far from ties; with
    ``draft_is_target`` the draft is a copy of the target (every drafted step is accepted).
    """
    from atspeed_ray.data.prepare import load_prepared

    from atspeed_ray.data.catalog import export_catalog

    prepared = load_prepared(data)
    tok = prepared.tokenizer
    p = get_preset(preset)
    out = Path(out)
    paths = []
    sizes: list[tuple[str, LlamaSize, int]] = [("target", p.target, seed),
                                               ("draft", p.target if draft_is_target else p.draft,
                                                seed if draft_is_target else seed + 1)]
    for name, size, s in sizes:
        model = build_llama(size, len(tok), pad_token_id=tok.pad_token_id, seed=s)
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(scale)
        paths.append(save_model(model, tok, out / name))
        export_catalog(prepared, out / name)  # as the training exports do
    return paths[0], paths[1]
