"""The registry of draft kinds: a new kind is one file (its ``Drafter`` and loader, a
``DraftKind``) and one line in ``DRAFT_KINDS`` below (or a ``register`` call).

A draft checkpoint names its kind under ``draft_kind`` in its ``config.json`` (``align`` writes
it); exports made before the key existed are recognised by the keys they do carry (a compact
table, a code head) and otherwise load as a plain causal LM.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from atspeed_ray.data.llm import read_config
from atspeed_ray.drafts.base import DRAFT_KIND_KEY, DraftKind
from atspeed_ray.drafts.feature import FEATURE
from atspeed_ray.drafts.lm import CODE_HEAD, COMPACT_VOCAB, LM

if TYPE_CHECKING:
    from atspeed_ray.data.prepare import PreparedData

DRAFT_KINDS: dict[str, DraftKind] = {k.name: k for k in (LM, CODE_HEAD, COMPACT_VOCAB, FEATURE)}


def register(kind: DraftKind) -> DraftKind:
    """Add ``kind`` to ``DRAFT_KINDS`` (a ValueError if another kind has its name)."""
    if DRAFT_KINDS.get(kind.name, kind) is not kind:
        raise ValueError(f"draft kind {kind.name!r} is registered already")
    DRAFT_KINDS[kind.name] = kind
    return kind


def kind_name(config: dict) -> str:
    """The kind a draft's config names, or for an older export the one its keys imply."""
    from atspeed_ray.models import CODE_HEAD_KEY, COMPACT_VOCAB_KEY

    if DRAFT_KIND_KEY in config:
        return config[DRAFT_KIND_KEY]
    if config.get(COMPACT_VOCAB_KEY) is not None:
        return COMPACT_VOCAB.name
    return CODE_HEAD.name if config.get(CODE_HEAD_KEY) is not None else LM.name


def draft_kind(path: str | Path) -> DraftKind:
    """The registered kind of the draft checkpoint at ``path`` (a ValueError naming the file and
    the known kinds when it names another)."""
    path = Path(path)
    name = kind_name(read_config(path))
    if name not in DRAFT_KINDS:
        raise ValueError(f"{path / 'config.json'}: unknown {DRAFT_KIND_KEY} {name!r}; known: "
                         f"{', '.join(sorted(DRAFT_KINDS))}")
    return DRAFT_KINDS[name]


def check_draft(prepared: PreparedData, path: str | Path) -> None:
    """Stop with a DataError naming the draft's file unless the draft at ``path`` fits the
    prepared data folder (``DraftKind.fits``: a causal LM's tokenizer or vocabulary, a feature
    draft's code tokens)."""
    draft_kind(path).fits(prepared, Path(path))


def load_drafter(path: str | Path, device=None):
    """The draft at ``path`` as a ``Drafter`` (``decoding.drafting``), by its kind."""
    from atspeed_ray.models import DeviceConfig

    return draft_kind(path).load(Path(path), device or DeviceConfig())


__all__ = ["DRAFT_KINDS", "DRAFT_KIND_KEY", "DraftKind", "check_draft", "draft_kind", "kind_name",
           "load_drafter", "register"]
