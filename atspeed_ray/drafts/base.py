"""What a draft kind is: a name recorded in the draft's ``config.json``, a loader that turns
the checkpoint folder into a ``Drafter`` (the decoding core's contract, ``decoding.drafting``)
and a check that the folder fits a prepared data folder (``bench``, ``evaluate`` run it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from atspeed_ray.data.prepare import PreparedData
    from atspeed_ray.decoding.drafting import Drafter
    from atspeed_ray.models import DeviceConfig

# the key of a draft checkpoint's config.json that names its kind (``DRAFT_KINDS``)
DRAFT_KIND_KEY = "draft_kind"


@dataclass(frozen=True)
class DraftKind:
    name: str  # the value of ``DRAFT_KIND_KEY``
    load: Callable[[Path, DeviceConfig], Drafter]  # checkpoint folder, device -> drafter
    about: str  # one line for --help and errors
    # prepared data, checkpoint folder -> None, or a DataError naming the draft's file
    fits: Callable[[PreparedData, Path], None]
    # its drafter reads the target's hidden states (``Drafter.wants_features``): known from
    # the checkpoint alone, for a caller that runs the loop without the drafter (serving)
    features: bool = False
