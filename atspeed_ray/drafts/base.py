"""What a draft kind is: a name recorded in the draft's ``config.json`` and a loader that turns
the checkpoint folder into a ``Drafter`` (the decoding core's contract, ``decoding.drafting``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from atspeed_ray.decoding.drafting import Drafter
    from atspeed_ray.models import DeviceConfig

# the key of a draft checkpoint's config.json that names its kind (``DRAFT_KINDS``)
DRAFT_KIND_KEY = "draft_kind"


@dataclass(frozen=True)
class DraftKind:
    name: str  # the value of ``DRAFT_KIND_KEY``
    load: Callable[[Path, DeviceConfig], Drafter]  # checkpoint folder, device -> drafter
    about: str  # one line for --help and errors
    # its drafter reads the target's hidden states (``Drafter.wants_features``): known from
    # the checkpoint alone, for a caller that runs the loop without the drafter (serving)
    features: bool = False
