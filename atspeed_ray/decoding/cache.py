"""The caches of decoding: a model's key/value store, and the token tree it holds.

A model's KV store (``KVStore``) holds per layer ``.keys`` / ``.values`` [B, H_kv, S, D]; the
decoding core only ever drops finished requests (``batch_select_indices``) and compacts the tree
(``keep_slots``). Two implement it: ``KVCache``, static buffers allocated once per request batch
and written in place (gpt-fast style; what ``FastLlama`` makes), and ``GatherCache``, HF's
``DynamicCache`` with the plain compaction by gathering into new tensors (what ``HFDecoder`` makes,
and the reference ``KVCache.keep_slots`` is tested against). ``TreeCache`` is the tree layout
on top: which slots hold the prompt, and where the tree starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor
from transformers import DynamicCache

CACHE_RESERVE = 128  # tree slots a cache keeps free beyond its first chunk (prompt block)


@runtime_checkable
class KVStore(Protocol):
    """A model's key/value cache as the decoding core uses it (``Decoder.new_cache``)."""

    def batch_select_indices(self, rows: Tensor) -> None:
        """Keep requests ``rows`` [B'] (a finished request leaves the batch)."""

    def keep_slots(self, gather: Tensor, fixed: int) -> None:
        """Keep slots ``gather`` [B, S'] (ascending per row; its first ``fixed`` columns are the
        prompt block 0..fixed-1); the kept slots become slots 0..S'-1."""


@dataclass
class LayerKV:
    """One layer's keys/values: buffers allocated once, filled up to ``length``."""

    k_buf: Tensor | None = None  # [B, H_kv, capacity, D]
    v_buf: Tensor | None = None  # [B, H_kv, capacity, D]
    length: int = 0  # slots filled (a host int: reading it never waits for the device)

    @property
    def keys(self) -> Tensor | None:
        """[B, H_kv, S, D], a view of the buffer (None before the first chunk)."""
        return None if self.k_buf is None else self.k_buf[:, :, : self.length]

    @property
    def values(self) -> Tensor | None:
        return None if self.v_buf is None else self.v_buf[:, :, : self.length]


class KVCache:
    """A static, preallocated KV cache (gpt-fast style), per layer [B, H_kv, capacity, D].

    The buffers are allocated at the first chunk (the prompt block) with ``reserve`` slots free
    for the tree; later chunks are written in place at the filled length, and compaction
    (``keep_slots``) moves the kept tree slots down in place, so a request batch's rounds never
    reallocate. A chunk that does not fit grows the buffers geometrically (``grows`` counts it;
    the tests check a search's rounds stay within the first allocation). ``layers[i].keys`` /
    ``.values`` are views of the filled part, the layout ``TreeCache`` and HF's DynamicCache share.
    """

    def __init__(self, num_layers: int, reserve: int = CACHE_RESERVE):
        self.layers = [LayerKV() for _ in range(num_layers)]
        self.reserve = reserve
        self.grows = 0  # reallocations after the first chunk

    def batch_select_indices(self, rows: Tensor) -> None:
        """Keep requests ``rows`` [B'] (finished requests leave; once per request, not per step)."""
        for layer in self.layers:
            if layer.k_buf is not None:
                layer.k_buf, layer.v_buf = layer.k_buf[rows], layer.v_buf[rows]

    def _fit(self, layer: LayerKV, k: Tensor, need: int) -> None:
        """Buffers for at least ``need`` slots (``k`` [B, H_kv, T, D] gives shape and dtype)."""
        if layer.k_buf is not None and need <= layer.k_buf.shape[2]:
            return
        B, H, _, D = k.shape
        old = layer.k_buf
        cap = need + self.reserve if old is None else max(need, 2 * old.shape[2])
        k_buf, v_buf = (k.new_empty(B, H, cap, D) for _ in range(2))
        if old is not None:
            self.grows += 1 if layer is self.layers[0] else 0
            k_buf[:, :, : layer.length] = layer.keys
            v_buf[:, :, : layer.length] = layer.values
        layer.k_buf, layer.v_buf = k_buf, v_buf

    def append(self, i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k``, ``v`` [B, H_kv, T, D] after layer ``i``'s cached ones (in place); return
        all of them [B, H_kv, S + T, D] (views)."""
        layer = self.layers[i]
        start = layer.length
        need = start + k.shape[2]
        self._fit(layer, k, need)
        assert layer.k_buf is not None and layer.v_buf is not None
        layer.k_buf[:, :, start:need] = k
        layer.v_buf[:, :, start:need] = v
        layer.length = need
        return layer.keys, layer.values  # type: ignore[return-value]

    def keep_slots(self, gather: Tensor, fixed: int) -> None:
        """Keep slots ``gather`` [B, S'] (ascending per row; its first ``fixed`` columns are
        slots 0..fixed-1, the prompt block, which stays where it is): the kept tree slots move
        down in place, into slots fixed..S'-1."""
        tail = gather[:, fixed:] - fixed  # [B, S' - fixed] within the tree part
        n = fixed + tail.shape[1]
        for layer in self.layers:
            if layer.k_buf is None:
                continue
            idx = tail[:, None, :, None].expand(-1, layer.k_buf.shape[1], -1, layer.k_buf.shape[3])
            for buf in (layer.k_buf, layer.v_buf):
                buf[:, :, fixed:n] = buf[:, :, fixed: layer.length].gather(2, idx)
            layer.length = n


class GatherCache(DynamicCache):
    """HF's ``DynamicCache`` with the plain compaction: every layer's keys/values become new
    tensors of the kept slots (the reference of ``KVCache.keep_slots``)."""

    def keep_slots(self, gather: Tensor, fixed: int) -> None:
        gather_slots(self, gather)


def gather_slots(kv, gather: Tensor) -> None:
    """Keys/values of every layer of ``kv`` (``.layers[i].keys`` [B, H_kv, S, D]) replaced by
    new tensors of the slots ``gather`` [B, S']."""
    for layer in kv.layers:
        idx = gather[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
        layer.keys = layer.keys.gather(2, idx)
        layer.values = layer.values.gather(2, idx)


@dataclass
class TreeCache:
    kv: KVStore  # per-layer .keys/.values [B, H_kv, S, D]
    is_prompt: Tensor  # [B, S] bool: slot holds a real prompt token (seen by every node)
    prompt_len: Tensor  # [B] long: number of real prompt tokens
    prompt_cols: int  # the first prompt_cols slots are the (left-padded) prompt block

    @property
    def size(self) -> int:
        return self.is_prompt.shape[1]

    def select_rows(self, rows: Tensor) -> "TreeCache":
        """Keep requests ``rows`` [B'] (a finished request leaves the batch)."""
        self.kv.batch_select_indices(rows)
        return TreeCache(self.kv, self.is_prompt[rows], self.prompt_len[rows], self.prompt_cols)

    def compact(self, slots: Tensor) -> Tensor:
        """Drop every tree slot not referenced by ``slots`` [B, ...] (-1 = none); keep the prompt.

        Rejected branches leave the cache here. Returns ``slots`` renumbered for the new layout.
        """
        B, S = self.is_prompt.shape
        flat = slots.reshape(B, -1)
        ref = torch.zeros(B, S + 1, dtype=torch.bool, device=flat.device)
        ref.scatter_(1, torch.where(flat >= 0, flat, S), True)
        keep = ref[:, :S]
        keep[:, : self.prompt_cols] = True
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept slots first
        gather = order[:, : int(keep.sum(1).max())]  # [B, S'] (the one host read here)
        self.kv.keep_slots(gather, self.prompt_cols)  # KVCache: in place; GatherCache: new tensors
        self.is_prompt = self.is_prompt.gather(1, gather)
        new_pos = torch.cumsum(keep.long(), 1) - 1  # [B, S] new slot of each kept old slot
        renum = torch.where(flat >= 0, new_pos.gather(1, flat.clamp(min=0)), -1)
        return renum.reshape(slots.shape)
