"""The draft width policy: how many beams the draft keeps per drafted level, for any K.

One type, parsed once from its text (``bench`` / ``evaluate --draft-beams``, the pipeline's
``draft_beams``, the serve config's ``draft_beams_factor``), and one resolver,
``WidthPolicy.resolve(k)``, which every caller uses to get the ``SearchParams.draft_beams`` of a
search. The text:

* ``20``: a fixed width N = 20 (raised to K where K is larger);
* ``2k``: a multiple of K, N = ceil(2 K) (never below K);
* ``auto``: chosen per K by measured cost (``atspeed_ray.width``), one width per drafted level;
  N = K until measured, then the measured widths of the nearest K measured, each scaled to K
  (``with_measured``);
* ``2k/8k/2k``: one width per code position (the drafted level), first code first, the last
  entry holding for every later code; each entry is a fixed N or a multiple of K. The draft then
  keeps N_l beams at level l (``SearchParams.draft_beams`` as a tuple).

Torch-free: the CLI's ``--help`` and the serving config import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

from atspeed_ray.settings import AUTO

LEVEL_SEP = "/"  # between the widths of consecutive code positions: "2k/8k/2k"


@dataclass(frozen=True)
class LevelWidth:
    """The width of one drafted level: ``n`` beams, or ``n`` x K when ``per_k``."""

    n: float  # >= 1
    per_k: bool

    def of(self, k: int) -> int:
        """Beams for top-``k``: never below k."""
        return max(k, math.ceil(k * self.n - 1e-9) if self.per_k else int(self.n))

    def __str__(self) -> str:
        return f"{self.n:g}k" if self.per_k else str(int(self.n))


@dataclass(frozen=True)
class WidthPolicy:
    """A draft width policy (module docstring). ``levels``: per code position, the last entry
    holding for later codes; empty = ``auto``. ``measured``: auto's measured (k, widths) pairs,
    widths = N per code position measured at that k (the last holding for later codes)."""

    levels: tuple[LevelWidth, ...] = ()
    measured: tuple[tuple[int, tuple[int, ...]], ...] = ()

    @classmethod
    def parse(cls, text: str, flag: str = "--draft-beams") -> WidthPolicy:
        """The policy written ``text``; a ValueError naming ``flag`` (the CLI flag or config
        field it came from) when it is not one."""
        t = str(text).strip().lower()
        if t == AUTO:
            return cls()
        levels = []
        for part in t.split(LEVEL_SEP):
            per_k = part.endswith("k")
            try:
                n = float(part[:-1]) if per_k else int(part)
            except ValueError:
                raise ValueError(f"{flag} must be N, a multiple of K like 2k, auto, or one of "
                                 f"those per code position like 2k/8k/2k; got {text!r}") from None
            if not n >= 1:
                raise ValueError(f"{flag} widths must be >= 1 (or >= 1k), got {text!r}")
            levels.append(LevelWidth(n, per_k))
        return cls(tuple(levels))

    @classmethod
    def factor(cls, f: float) -> WidthPolicy:
        """N = ceil(f * K) at every level (the serve config's numeric ``draft_beams_factor``)."""
        return cls((LevelWidth(f, True),))

    @property
    def auto(self) -> bool:
        return not self.levels

    def with_measured(self, widths: Mapping[int, int | tuple[int, ...]]) -> WidthPolicy:
        """This ``auto`` policy with the widths measured per k: ``{k: N}`` or ``{k: (N_1, N_2,
        ...)}`` (one per code position, the last holding for later codes)."""
        assert self.auto, "only an auto width is measured"
        table = tuple(sorted((k, (w,) if isinstance(w, int) else tuple(w))
                             for k, w in widths.items()))
        return WidthPolicy((), table)

    def resolve(self, k: int) -> int | tuple[int, ...]:
        """The draft width of a top-``k`` search (``SearchParams.draft_beams``): one N, or one
        per code position when the levels differ. Auto: each level's N/k of the nearest k
        measured (the smaller on a tie), else N = k."""
        if self.auto:
            if not self.measured:
                return k
            near, ns = min(self.measured, key=lambda m: (abs(m[0] - k), m[0]))
            return one_or_levels(tuple(LevelWidth(n / near, True).of(k) for n in ns))
        return one_or_levels(tuple(level.of(k) for level in self.levels))

    def __str__(self) -> str:
        return AUTO if self.auto else LEVEL_SEP.join(map(str, self.levels))


def one_or_levels(widths: tuple[int, ...]) -> int | tuple[int, ...]:
    """``widths`` (per code position, the last holding for later codes) as
    ``SearchParams.draft_beams`` holds them: the one N when every level has it."""
    return widths[0] if len(set(widths)) == 1 else widths


def trimmed(widths: tuple[int, ...]) -> tuple[int, ...]:
    """``widths`` without the trailing repeats of its last entry (they hold anyway)."""
    out = tuple(widths)
    while len(out) > 1 and out[-1] == out[-2]:
        out = out[:-1]
    return out


def widths_text(widths: tuple[int, ...], k: int | None = None) -> str:
    """Per-level widths in the policy's text: ``10/200/20``, or with ``k`` as multiples of it
    (``1k/20k/2k``, to 3 significant digits: for reading; the exact table is the first form)."""
    if k is None:
        return LEVEL_SEP.join(map(str, trimmed(widths)))
    return LEVEL_SEP.join(f"{n / k:.3g}k" for n in trimmed(widths))


def measured_widths_at(value: int | str, k: int) -> tuple[int, ...]:
    """One entry of a measured width table (the serve config's ``draft_widths``) as widths per
    code position at its ``k``: an N, or a policy text (``10/200/20``, ``1k/20k/2k``) resolved
    at k; a ValueError names ``draft_widths`` when it is neither."""
    if isinstance(value, int):
        return (value,)
    policy = WidthPolicy.parse(value, "draft_widths")
    if policy.auto:
        raise ValueError(f"draft_widths: a measured width, not auto; got {value!r} at k={k}")
    w = policy.resolve(k)
    return (w,) if isinstance(w, int) else w


def _policy(value: Any) -> Any:
    return WidthPolicy.parse(value, "draft_beams") if isinstance(value, (str, int)) else value


def _policies(value: Any) -> Any:
    if isinstance(value, str):
        return [WidthPolicy.parse(t, "draft_beams") for t in value.split(",") if t.strip()] \
            or [WidthPolicy.parse("", "draft_beams")]
    return value


# a pydantic field holding a policy: given as its text (or an int N), shown as its text
Width = Annotated[WidthPolicy, BeforeValidator(_policy), PlainSerializer(str, return_type=str)]
# several, comma-separated (``bench --draft-beams 1k,2k/8k,auto``: each timed as its own row)
Widths = Annotated[list[WidthPolicy], BeforeValidator(_policies),
                   PlainSerializer(lambda ws: ",".join(map(str, ws)), return_type=str)]
