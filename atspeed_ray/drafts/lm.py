"""Causal-LM drafts (``LMDrafter``): a full-vocabulary LM, a code-head LM and a
compact-vocabulary LM. They draft alike (their own width-N beam search); what differs is the
model ``models.load_decoder`` builds from the folder (the head over the code tokens, the compact
table), which their config records."""

from __future__ import annotations

from pathlib import Path

from atspeed_ray.decoding.drafting import LMDrafter
from typing import TYPE_CHECKING

from atspeed_ray.drafts.base import DraftKind
from atspeed_ray.models import DeviceConfig, load_decoder

if TYPE_CHECKING:
    from atspeed_ray.data.prepare import PreparedData


def load_lm(path: Path, device: DeviceConfig) -> LMDrafter:
    return LMDrafter(load_decoder(path, device))


def lm_fits(prepared: PreparedData, path: Path) -> None:
    """Its tokenizer or vocabulary fits the prepared folder (``check_base_model``)."""
    from atspeed_ray.data.prepare import check_base_model

    check_base_model(prepared, path)


LM = DraftKind("lm", load_lm, "a causal LM over the whole vocabulary", lm_fits)
CODE_HEAD = DraftKind("code-head", load_lm, "a causal LM whose head scores the code tokens only "
                                            "(align --code-head)", lm_fits)
COMPACT_VOCAB = DraftKind("compact-vocab", load_lm, "a causal LM over a compact table of the "
                                                    "catalogue's tokens (align --compact-vocab)",
                          lm_fits)
