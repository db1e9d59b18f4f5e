"""The parameters of one speculative beam search, as one validated object.

``SearchParams`` travels unchanged from where a search is asked for (the HTTP request, the
``bench`` / ``evaluate`` commands, the training loop's validation) down to ``speculative_loop``
and, on the wire, to the draft replicas. Plain fields only (no torch object): it pickles and
goes through ``dataclasses.asdict`` / JSON as it is. Relaxed mode's random numbers are made where
sampling happens, from ``seed`` and counters (``decoding/noise.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from atspeed_ray.settings import (
    DEFAULT_GAMMA, DEFAULT_MODE, DEFAULT_RELAXED_KEEP, EXPAND_LAST, MODES, RELAXED_KEEPS, Mode,
    RelaxedKeep, check_choice,
)

SEED_LIMIT = 2**63  # a seed is an int64 value in [0, SEED_LIMIT)


@dataclass(frozen=True)
class SearchParams:
    """Top-``k`` by speculative beam search: draft width, draft steps per round, verification.

    Validated once, on construction (a ValueError names the bad field).
    """

    k: int  # beams kept = items returned
    # draft width N (k <= N), or one per code position (the drafted level; the last holding for
    # later codes): the draft keeps N_l beams at level l. None: N = k. Made by
    # ``WidthPolicy.resolve``; a tuple of equal widths is stored as the one int
    draft_beams: int | tuple[int, ...] | None = None
    gamma: int = DEFAULT_GAMMA  # draft steps per round (0: every round is one target step)
    mode: Mode = DEFAULT_MODE  # strict top-K (lossless) or relaxed sampling verification
    # relaxed: the seed of the search's random numbers (row b of the prompts draws from its
    # own stream of it, ``noise.row_streams``); None: torch's default generator
    seed: int | None = None
    # strict: a round ends with children steps (every trie child of the step before) from the
    # first step after which every step left has at most this many per request (``drafting``);
    # 0 = always the top N
    expand_last: int = EXPAND_LAST
    relaxed_keep: RelaxedKeep = DEFAULT_RELAXED_KEEP  # relaxed: which K beams a step keeps (settings)

    def __post_init__(self) -> None:
        if self.draft_beams is None:
            object.__setattr__(self, "draft_beams", self.k)
        if isinstance(self.draft_beams, (tuple, list)):  # a list: read back from JSON
            levels = tuple(self.draft_beams)
            while len(levels) > 1 and levels[-1] == levels[-2]:  # the last one holds anyway
                levels = levels[:-1]
            if not levels:
                raise ValueError("draft_beams: no width given (an empty tuple)")
            object.__setattr__(self, "draft_beams", levels[0] if len(levels) == 1 else levels)
        if self.k < 1 or min(self.widths) < self.k:
            raise ValueError(f"need 1 <= k <= draft_beams, got k={self.k}, "
                             f"draft_beams={self.draft_beams}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        check_choice(self.mode, MODES, "mode")
        if self.expand_last < 0:
            raise ValueError(f"expand_last must be >= 0, got {self.expand_last}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < SEED_LIMIT):
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        check_choice(self.relaxed_keep, RELAXED_KEEPS, "relaxed_keep")
        if self.relaxed_keep != DEFAULT_RELAXED_KEEP and self.mode != "relaxed":
            raise ValueError("relaxed_keep is for relaxed mode")
        if self.expand_last and self.mode == "relaxed":
            raise ValueError("expand_last is for strict mode: relaxed acceptance needs every "
                             "drafted step sampled from the draft")

    def strict(self) -> SearchParams:
        """The same search in strict mode (the relaxed-only fields back to their defaults)."""
        return dataclasses.replace(self, mode="strict", seed=None, relaxed_keep=DEFAULT_RELAXED_KEEP)

    @property
    def widths(self) -> tuple[int, ...]:
        """The draft width per code position, the last holding for later codes (one entry when
        every level has the same width)."""
        assert self.draft_beams is not None  # resolved in __post_init__
        return self.draft_beams if isinstance(self.draft_beams, tuple) else (self.draft_beams,)

    @property
    def N(self) -> int:
        """The draft width: the widest level's when they differ (what a bound or a record of
        the search's size reads; ``widths`` has each level's)."""
        return max(self.widths)

    @property
    def sample(self) -> bool:
        """Relaxed mode: draft by sampling N without replacement; keep K beams per step by
        recursive rejection sampling (``relaxed_keep`` "top": see ``RelaxedKeep``)."""
        return self.mode == "relaxed"

