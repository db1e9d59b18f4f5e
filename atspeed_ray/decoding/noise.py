"""Relaxed mode's random numbers, made where sampling happens from a seed and counters.

No live generator is kept or sent anywhere. A seeded search (``SearchParams.seed``) gives row b
(its request's place in the prompts list) a stream key ``row_streams(seed, B)[b]``; each phase
of each round derives its own key from it (``round_streams(streams, round, phase)``, phases
"draft" and "accept"), and draw d of that phase is, element by element, a counter-based hash of
(key, d, element) (splitmix64's output function, in int64 tensor arithmetic). So a row's numbers
depend on its seed, its place, the round, the phase and the draw only: not on the rows stacked
beside it, the replica or what was drawn before (nor, being wrapping int64 arithmetic, on the
device; compared with a Python reference on the CPU only so far). The draft replica, the ingress, a
co-located replica and an offline search all draw the same numbers for a request, and only its
seed travels (as a plain field of ``SearchParams``; per row, as the [B] keys of ``ProposeCall``).

An unseeded search (``seed=None``) has no keys: it draws from torch's default generator.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Phase = Literal["draft", "accept"]
PHASE_TAGS: dict[str, int] = {"draft": 1, "accept": 2}

_M64 = 2**64


def _i64(x: int) -> int:
    """The int64 (two's complement) value of the 64-bit pattern ``x``."""
    x %= _M64
    return x - _M64 if x >= 2**63 else x


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MUL1 = _i64(0xBF58476D1CE4E5B9)
_MUL2 = _i64(0x94D049BB133111EB)


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: Tensor) -> Tensor:
    """splitmix64's output function on int64 tensors (multiplication wraps mod 2**64)."""
    x = (x ^ _shr(x, 30)) * _MUL1
    x = (x ^ _shr(x, 27)) * _MUL2
    return x ^ _shr(x, 31)


def _derive(key: Tensor, n: int) -> Tensor:
    """The key [B] of sub-stream ``n`` of ``key`` [B]."""
    return _mix(key ^ _mix(torch.full_like(key, _i64((n + 1) * _GOLDEN))))


def row_streams(seed: int | None, rows: int, device: torch.device | str = "cpu") -> Tensor | None:
    """The stream key of each of ``rows`` rows of a search seeded with ``seed`` [rows] (int64),
    None when unseeded. A request served alone is row 0 of its own search."""
    if seed is None:
        return None
    base = _mix(torch.full((rows,), _i64(seed), dtype=torch.long, device=device))
    return _mix(base + torch.arange(1, rows + 1, dtype=torch.long, device=device) * _GOLDEN)


def round_streams(streams: Tensor | None, round: int, phase: Phase) -> Tensor | None:
    """The keys [B] of phase ``phase`` of round ``round`` (0-based) of rows with stream keys
    ``streams`` [B] (None: unseeded, None back)."""
    if streams is None:
        return None
    return _derive(_derive(streams, round), PHASE_TAGS[phase])


def uniform(keys: Tensor | None, draw: int, shape: tuple[int, ...], device: torch.device,
            dtype: torch.dtype) -> Tensor:
    """Uniform [0, 1) numbers of ``shape`` [B, ...]: row b's from draw ``draw`` of its phase key
    ``keys[b]`` (``round_streams``); with ``keys`` None, from torch's default generator."""
    if keys is None:
        return torch.rand(shape, device=device, dtype=dtype)
    B, n = shape[0], 1
    for s in shape[1:]:
        n *= s
    k = _derive(keys.to(device), draw)  # [B]
    e = torch.arange(1, n + 1, dtype=torch.long, device=device) * _GOLDEN  # [n]
    bits = _mix(k[:, None] + e[None, :])  # [B, n] 64 random bits each
    mantissa = 53 if dtype == torch.float64 else 24
    u = _shr(bits, 64 - mantissa).to(dtype) * (2.0 ** -mantissa)
    return u.view(shape)


def gumbel(keys: Tensor | None, draw: int, like: Tensor) -> Tensor:
    """Gumbel(0, 1) noise shaped like ``like`` [B, ...] (``uniform``'s draw ``draw``)."""
    u = uniform(keys, draw, tuple(like.shape), like.device, like.dtype)
    neg_log_u = (-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20)  # Exp(1) draws
    return -torch.log(neg_log_u)
