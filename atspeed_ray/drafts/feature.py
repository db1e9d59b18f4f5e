"""Feature drafts (EAGLE-style): a draft head on the target's own hidden states.

A beam's next code is drafted from two things the target already has: its last-layer hidden
state where it chose the beam's last code (``Beams.features``, after the final norm: what its LM
head reads) and that code's embedding (the target's own row, frozen). ``FeatureDraft`` joins
them (one linear from 2E to E), runs ``layers`` decoder blocks whose attention spans the
target's hidden states over the prompt (``Context``: what the target computed at its prefill)
and the beam's path within the round (its drafted ancestors and itself: at most gamma
positions, so the draft keeps no KV cache), and predicts the hidden state after the code, f^ [E]; its logits are f^
times the target's LM-head rows of the code tokens (frozen). Later drafted steps of a round read
the draft's own f^ of the parent instead of the target's feature (what training unrolls).

The draft stores its trained weights and copies of the target's rows it reads (the code
tokens' embeddings and LM-head rows), so it loads without the target. Pure torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atspeed_ray.data.errors import DataError
from atspeed_ray.data.index import ItemIndex
from atspeed_ray.decoding.beam import Beams, log_probs, take
from atspeed_ray.decoding.cache import TreeCache
from atspeed_ray.decoding.drafting import DraftStep, ProposeCall, draft_tree
from atspeed_ray.decoding.feed import Context
from atspeed_ray.data.llm import read_config
from atspeed_ray.drafts.base import DRAFT_KIND_KEY, DraftKind

if TYPE_CHECKING:
    from atspeed_ray.data.prepare import PreparedData

KIND = "feature"
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class FeatureConfig:
    hidden: int  # E: the target's hidden size
    layers: int = 1  # decoder blocks
    heads: int = 4
    intermediate: int = 0  # MLP width (0: 2 E)
    max_depth: int = 16  # depth embeddings (codes per item at most)
    eps: float = 1e-5

    @property
    def mlp(self) -> int:
        return self.intermediate or 2 * self.hidden


# per block: the keys and values of the target's prompt features [B, P, heads, D] and which
# are real prompt tokens [B, P]
ContextKV = list[tuple[Tensor, Tensor, Tensor]]


class Block(nn.Module):
    """Pre-norm decoder block; attention over the target's prompt features and the path's
    positions (no rope: depth embeddings)."""

    def __init__(self, c: FeatureConfig):
        super().__init__()
        E, self.heads, self.eps = c.hidden, c.heads, c.eps
        self.norm1 = nn.Parameter(torch.ones(E))
        self.qkv = nn.Linear(E, 3 * E, bias=False)
        self.o = nn.Linear(E, E, bias=False)
        self.norm2 = nn.Parameter(torch.ones(E))
        self.gate_up = nn.Linear(E, 2 * c.mlp, bias=False)
        self.down = nn.Linear(c.mlp, E, bias=False)
        nn.init.zeros_(self.o.weight)  # a block starts as the identity
        nn.init.zeros_(self.down.weight)

    def context_kv(self, features: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Keys and values [B, P, heads, D] of the target's prompt features [B, P, E]."""
        B, P, E = features.shape
        _, k, v = self.qkv(F.rms_norm(features, (E,), self.norm1, self.eps)).view(
            B, P, 3, self.heads, E // self.heads).unbind(2)
        return k, v, valid

    def forward(self, x: Tensor, past: tuple[Tensor, Tensor] | None,
                ctx: tuple[Tensor, Tensor, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, M, E] (one position per beam); past (k, v) [B, M, P', heads, D] of each beam's
        path before it (already taken at its parent); ``ctx`` the prompt's keys and values
        (``context_kv``), which every beam of a request sees. Returns the block's output and the
        path with this position appended [B, M, P' + 1, heads, D]."""
        B, M, E = x.shape
        Hh = self.heads
        q, k, v = self.qkv(F.rms_norm(x, (E,), self.norm1, self.eps)).view(B, M, 3, Hh, E // Hh).unbind(2)
        if past is not None:
            k, v = torch.cat([past[0], k[:, :, None]], 2), torch.cat([past[1], v[:, :, None]], 2)
        else:
            k, v = k[:, :, None], v[:, :, None]
        scale = (E // Hh) ** -0.5
        att = torch.einsum("bmhd,bmphd->bmhp", q, k) * scale  # [B, M, H, P']
        if ctx is not None:
            ck, cv, cvalid = ctx
            catt = torch.einsum("bmhd,bphd->bmhp", q, ck) * scale  # [B, M, H, P]
            catt = catt.masked_fill(~cvalid[:, None, None, :], float("-inf"))
            w = torch.cat([catt, att], -1).softmax(-1)
            P = ck.shape[1]
            out = (torch.einsum("bmhp,bphd->bmhd", w[..., :P], cv)
                   + torch.einsum("bmhp,bmphd->bmhd", w[..., P:], v)).reshape(B, M, E)
        else:
            out = torch.einsum("bmhp,bmphd->bmhd", att.softmax(-1), v).reshape(B, M, E)
        x = x + self.o(out)
        gate, up = self.gate_up(F.rms_norm(x, (E,), self.norm2, self.eps)).chunk(2, -1)
        return x + self.down(F.silu(gate) * up), (k, v)


PathKV = list[tuple[Tensor, Tensor]]  # per block: (k, v) [B, M, P, heads, D]


class FeatureDraft(nn.Module):
    """f^ = norm(blocks(fc([feature; embed(code)]) + depth)); logits = f^ @ head.T over the
    code tokens ``code_ids`` (module docstring). ``head_columns`` [V]: token id -> logit column
    (the code-head map of the decoding core)."""

    def __init__(self, c: FeatureConfig, code_ids: Tensor, embed: Tensor, head: Tensor,
                 norm: Tensor | None = None):
        super().__init__()
        self.config = c
        E = c.hidden
        self.register_buffer("code_ids", code_ids.long().clone())  # [H]
        self.register_buffer("embed", embed.detach().clone())  # [H, E] the target's rows, frozen
        self.register_buffer("head", head.detach().clone())  # [H, E] its LM-head rows, frozen
        V = int(code_ids.max()) + 1
        columns = torch.full((V,), -1, dtype=torch.long)
        columns[code_ids.long()] = torch.arange(code_ids.numel())
        self.register_buffer("head_columns", columns, persistent=False)  # [V]
        self.fc = nn.Linear(2 * E, E, bias=False)
        with torch.no_grad():  # starts by passing the feature through
            self.fc.weight.zero_()
            self.fc.weight[:, :E].copy_(torch.eye(E))
        self.depth = nn.Embedding(c.max_depth, E)
        nn.init.zeros_(self.depth.weight)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        # the out norm starts as the target's final norm (its features are after that norm)
        self.norm = nn.Parameter(norm.detach().clone() if norm is not None else torch.ones(E))

    def context_kv(self, context: Context | None) -> ContextKV | None:
        """Each block's keys and values of the target's prompt features (once per round)."""
        if context is None:
            return None
        f = context.features.to(self.embed.dtype)
        return [block.context_kv(f, context.valid) for block in self.blocks]

    def step(self, feature: Tensor, tokens: Tensor, depth: Tensor, past: PathKV | None,
             ctx: ContextKV | None = None) -> tuple[Tensor, Tensor, PathKV]:
        """feature [B, M, E], the codes just chosen ``tokens`` [B, M] at ``depth`` [B] (or
        [B, M]), ``past`` each beam's path before it, ``ctx`` the prompt's keys and values
        (``context_kv``). Returns (f^ [B, M, E], code log-probs [B, M, H], the paths with this
        position)."""
        rows = self.head_columns[tokens.clamp(0, self.head_columns.numel() - 1)].clamp(min=0)
        dep = depth if depth.dim() == 2 else depth[:, None].expand_as(tokens)
        x = self.fc(torch.cat([feature.to(self.embed.dtype), self.embed[rows]], -1))
        x = x + self.depth(dep.clamp(max=self.config.max_depth - 1))
        out: PathKV = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if past is None else past[i], None if ctx is None else ctx[i])
            out.append(kv)
        f = F.rms_norm(x, (x.shape[-1],), self.norm, self.config.eps)
        return f, log_probs(f @ self.head.T), out

    def forward(self, feature: Tensor, tokens: Tensor, depth: Tensor, past: PathKV | None,
                ctx: ContextKV | None = None) -> tuple[Tensor, Tensor, PathKV]:
        """``step`` (what training calls: through a DeepSpeed engine it must be the forward)."""
        return self.step(feature, tokens, depth, past, ctx)

    def save(self, out: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({DRAFT_KIND_KEY: KIND, **asdict(self.config)},
                                                    indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(out / WEIGHTS))
        return out

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> FeatureDraft:
        from safetensors.torch import load_file

        path = Path(path)
        cfg = {k: v for k, v in read_config(path).items() if k != DRAFT_KIND_KEY}
        try:
            c = FeatureConfig(**cfg)
        except TypeError as e:
            raise ValueError(f"{path / 'config.json'}: {e}") from None
        if not (path / WEIGHTS).is_file():
            raise FileNotFoundError(f"{path}: no {WEIGHTS}")
        state = load_file(str(path / WEIGHTS))
        model = cls(c, state["code_ids"], state["embed"], state["head"])
        model.load_state_dict(state)
        return model.to(device).eval()

    @classmethod
    def from_target(cls, target: nn.Module, index: ItemIndex, c: FeatureConfig | None = None
                    ) -> FeatureDraft:
        """A fresh draft over ``target`` (an HF Llama-family causal LM) for ``index``'s codes."""
        from atspeed_ray.decoding.fast_llama import FastLlama
        from atspeed_ray.models import code_token_ids

        ids = torch.tensor(code_token_ids(index), dtype=torch.long)
        if isinstance(target, FastLlama):  # its own copies of the rows (never a code head here)
            embed, head, norm = target.embed, target.lm_head, target.norm_out
        else:
            embed = target.get_input_embeddings().weight
            head = target.get_output_embeddings().weight
            norm = target.base_model.norm.weight
        ids = ids.to(embed.device)
        c = c or FeatureConfig(hidden=embed.shape[1])
        return cls(c, ids, embed.detach()[ids], head.detach()[ids], norm.detach()).to(embed.device)


@dataclass
class FeatureDrafter:
    """A ``Drafter`` over a ``FeatureDraft``: ``draft_tree`` scored by the head (module docstring).
    No cache: a round's paths live only while it is drafted."""

    model: FeatureDraft

    @property
    def device(self) -> torch.device:
        return self.model.embed.device

    @property
    def wants_features(self) -> bool:
        return True

    @torch.no_grad()
    def propose(self, call: ProposeCall, index: ItemIndex, cache: TreeCache | None
                ) -> tuple[list[DraftStep], Beams, TreeCache | None]:
        beams, t = call.beams, call.t
        if beams.features is None:
            raise ValueError("a feature draft needs the target's features on the beams "
                             "(the loop asks for them when Drafter.wants_features)")
        if beams.features.shape[-1] != self.model.config.hidden:
            raise ValueError(f"a feature draft of hidden size {self.model.config.hidden} got the "
                             f"features of a target of hidden size {beams.features.shape[-1]}: "
                             f"it was trained on another target")
        state: dict[str, object] = {}
        ctx = self.model.context_kv(call.context)

        def score(b: Beams, depth: Tensor, parent: Tensor | None) -> tuple[Tensor, Beams]:
            if parent is None:  # the current beams: the target's features, no path yet
                feature, past = b.features, None
                depth = (t - 1).clamp(min=0)
            else:
                feature = take(state["f"], parent)  # type: ignore[arg-type]
                past = [(take(k, parent), take(v, parent)) for k, v in state["path"]]  # type: ignore[union-attr]
            last = b.tokens.gather(2, depth[:, None, None].expand(*b.tokens.shape[:2], 1))[..., 0]
            f, logp, state["path"] = self.model.step(feature, last, depth, past, ctx)  # type: ignore[assignment]
            state["f"] = f
            return logp, b

        steps, beams = draft_tree(score, beams, t, call.g, index, call.params,
                                  self.model.head_columns, call.keys)
        return steps, beams, cache


def load(path: Path, device) -> FeatureDrafter:
    return FeatureDrafter(FeatureDraft.load(path, device.torch_device()))


def fits(prepared: PreparedData, path: Path) -> None:
    """Its head scores exactly the prepared catalogue's code tokens (it carries no tokenizer:
    the target's rows it copied are what ties it to the data)."""
    from safetensors import safe_open

    from atspeed_ray.models import code_token_ids

    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS}")
    with safe_open(str(path / WEIGHTS), "pt") as f:
        ids = f.get_tensor("code_ids").tolist()
    if ids != code_token_ids(prepared.index):
        raise DataError(f"its {len(ids)} code tokens are not the {prepared.root} catalogue's "
                        f"{len(code_token_ids(prepared.index))}: it was trained on other data",
                        path / WEIGHTS)


FEATURE = DraftKind(KIND, load, "a head on the target's hidden states (EAGLE-style)", fits,
                    features=True)
