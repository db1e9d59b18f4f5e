"""Model presets, device/dtype selection, and HF checkpoint save/load.

A preset names a (target, draft) pair of Llama sizes. ``train-target --preset P`` builds the
target of P, ``align --preset P`` builds the draft of P. Any local HF causal-LM directory loads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from atspeed_ray.decoding.fast_llama import cpu_bf16_flags, table_rows
from atspeed_ray.settings import (
    DEFAULT_COMPILE, DEFAULT_FORWARD, DEFAULT_PACK, Dtype, Forward, Precision,
)

PRECISION_DTYPE: dict[str, Dtype] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class LlamaSize(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    intermediate_size: int | None = None  # default: 4 * hidden (rounded Llama style is not needed)
    max_position_embeddings: int = 512


class Preset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    target: LlamaSize
    draft: LlamaSize


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        # seconds to train; for tests and external checks
        Preset(name="tiny", target=LlamaSize(hidden_size=64, num_layers=2, num_heads=4),
               draft=LlamaSize(hidden_size=32, num_layers=1, num_heads=2)),
        # make demo's target: deep and narrow, so that a pass costs what its layers' ops cost,
        # nearly whatever its tokens (results/demo/RUN.md), as a large target's does on a GPU
        Preset(name="deep", target=LlamaSize(hidden_size=32, num_layers=24, num_heads=2),
               draft=LlamaSize(hidden_size=32, num_layers=1, num_heads=2)),
        # the CPU presets used for demos and the Beauty benchmarks on a 2-core machine
        Preset(name="cpu", target=LlamaSize(hidden_size=256, num_layers=4, num_heads=8),
               draft=LlamaSize(hidden_size=64, num_layers=2, num_heads=4)),
        # a GPU cluster: ~100M target, ~7M draft (the paper used LLaMA-7B / LLaMA-68M)
        Preset(name="gpu", target=LlamaSize(hidden_size=768, num_layers=12, num_heads=12),
               draft=LlamaSize(hidden_size=256, num_layers=2, num_heads=4)),
    ]
}


DRAFT_HEAD_DIM = 32  # ``parse_size``: attention heads of this many dimensions


def parse_size(text: str) -> LlamaSize:
    """``LAYERSxHIDDEN`` (``2x128``) -> a Llama size with heads of ``DRAFT_HEAD_DIM`` dims."""
    try:
        layers, hidden = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"model size {text!r}: expected LAYERSxHIDDEN, e.g. 2x128") from None
    if layers < 1 or hidden < DRAFT_HEAD_DIM or hidden % DRAFT_HEAD_DIM:
        raise ValueError(f"model size {text!r}: at least 1 layer, hidden a multiple of "
                         f"{DRAFT_HEAD_DIM}")
    return LlamaSize(hidden_size=hidden, num_layers=layers, num_heads=hidden // DRAFT_HEAD_DIM)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


class DeviceConfig(BaseModel):
    """Where models run. ``auto`` means CUDA + bf16 when a GPU is present, else CPU + fp32.

    ``forward`` picks the decoding forward of ``load_decoder``: ``fast`` runs Llama checkpoints on
    the compact ``FastLlama`` (other architectures keep their HF forward), ``hf`` always uses the
    HF model's own forward. Training always uses the HF model. ``compile`` runs FastLlama's
    per-layer dense blocks through ``torch.compile`` (``FastLlama.compile_step``); ``pack`` lays
    FastLlama's weights out once for the CPU GEMM library (``FastLlama.pack_weights``; CPU in fp32
    or bf16, not with ``compile``).
    """

    model_config = ConfigDict(extra="forbid")

    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    dtype: Dtype = "auto"
    forward: Forward = DEFAULT_FORWARD
    compile: bool = DEFAULT_COMPILE
    pack: bool = DEFAULT_PACK

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            dev = self.torch_device()
            return torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        return getattr(torch, self.dtype)


def decoding_dtype(precision: Precision, device: torch.device,
                   cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[Dtype, str]:
    """The parameter dtype decoding runs in for ``precision`` on ``device``, and why.

    ``auto``: bf16 on a GPU that supports it, fp32 on a CPU (the default everywhere).
    ``bf16`` on a CPU: bf16 when it has native bf16 matmuls (AMX or AVX512-BF16), else fp32 (bf16
    emulated there is slower than fp32). ``fp16``: GPU only, fp32 on a CPU. ``fp32``: fp32.
    """
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bfloat16", "auto: a GPU with bf16"
        return "float32", f"auto: fp32 on {device.type}"
    if device.type == "cuda" or precision == "fp32":
        return PRECISION_DTYPE[precision], f"{precision} as asked"
    if precision == "bf16":
        flags = cpu_bf16_flags(cpuinfo)
        if flags:
            return "bfloat16", f"bf16 (the CPU has {', '.join(flags)})"
        return "float32", "fp32 (bf16 asked, but the CPU has neither AMX nor AVX512-BF16)"
    return "float32", "fp32 (fp16 asked, which needs a GPU)"


def build_llama(size: LlamaSize, vocab_size: int, pad_token_id: int | None = None,
                seed: int | None = None) -> LlamaForCausalLM:
    """A randomly initialised Llama causal LM of the given size."""
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads or size.num_heads,
        intermediate_size=size.intermediate_size or 4 * size.hidden_size,
        max_position_embeddings=size.max_position_embeddings,
        pad_token_id=pad_token_id,
        tie_word_embeddings=True,
    )
    if seed is not None:
        torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


def first_layers(model: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """``model`` cut to its first ``num_layers`` decoder layers (embeddings, final norm and head
    kept): a draft that starts out close to its target (layer-skip / early-exit style)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no .model.layers to cut")
    if not 1 <= num_layers <= len(layers):
        raise ValueError(f"num_layers must be in 1..{len(layers)}, got {num_layers}")
    model.model.layers = layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]
    return model


# A code-head draft: its config.json lists the token ids its decoding head keeps (the catalogue's
# code tokens) under this key. The folder stays a normal HF checkpoint with the full vocabulary
# (input embeddings must cover the prompts' tokens; the HF forward keeps its full head);
# ``load_decoder`` on the fast forward runs the head as ``lm_head.weight[ids]``, one [H, E]
# matmul (H ~ 1k codes) instead of [V, E] (~50k for an LLM), its log-softmax over the head.
# That changes the draft's scores, so which beams are drafted, never a strict result. A key in
# the config (rather than a file beside it) travels with every export path (local, Ray
# checkpoints, merged LoRA) unchanged. The draft emits no special token while decoding (items
# are fixed-length code tuples), so only code tokens are kept.
CODE_HEAD_KEY = "code_head_ids"


def code_token_ids(index) -> list[int]:
    """Every token id the catalogue ``index`` (``ItemIndex``) uses as a code, ascending."""
    return (index.token_column >= 0).nonzero()[:, 1].unique().tolist()


def set_code_head(model: PreTrainedModel, index) -> PreTrainedModel:
    """Record in ``model``'s config that it decodes with a head over ``index``'s code tokens."""
    setattr(model.config, CODE_HEAD_KEY, code_token_ids(index))
    return model


def code_head_of(model: torch.nn.Module) -> list[int] | None:
    """The code head recorded in ``model``'s config (None: a full-vocabulary head)."""
    ids = getattr(getattr(model, "config", None), CODE_HEAD_KEY, None)
    if ids is None:
        return None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
        raise ValueError(f"config {CODE_HEAD_KEY!r} must be a non-empty list of token ids")
    return ids


# A compact-vocabulary draft (``align --compact-vocab``): its embedding table holds one row per
# token its prompts can contain and nothing else: the catalogue's code tokens first (ascending
# id), then the prompt format's own tokens (separator, pad, bos, the template's text) and last one
# *unknown* row. Its LM head is the same matrix (tied: one tensor), so its logits cover the code
# tokens plus those few format tokens, never the LLM's ~50k-token vocabulary: a [V_c, E] table
# (V_c ~ 870 for SmolLM2 + Beauty's codes) instead of two [V, E] ends. The model keeps taking and
# scoring *global* token ids: ``CompactEmbedding`` maps an id to its row, ``head_columns`` [V]
# maps a code id to its logit column (the code-head map the decoding core reads). An id outside
# the table (a prompt built with another template, a stray special token) reads the unknown row:
# a deliberate, documented choice, the draft's proposals may get worse, a strict result cannot
# change (the target scores every token). The config records the table under this key:
# ``{"token_ids": [...], "full_vocab_size": V}``, row r = token id ``token_ids[r]``, -1 = the
# unknown row; ``load_weights`` re-attaches the map, so every load path decodes it correctly.
COMPACT_VOCAB_KEY = "compact_vocab"
UNKNOWN_ROW_ID = -1  # the entry of ``token_ids`` that every id outside the table reads


def compact_vocab_ids(prepared) -> list[int]:
    """The rows of a compact draft for ``prepared`` (``PreparedData``): its code tokens, the
    prompt format's tokens, then the unknown row (``UNKNOWN_ROW_ID``)."""
    fmt = prepared.prompt_format
    codes = code_token_ids(prepared.index)
    fixed = [fmt.sep_id, fmt.pad_id, *([] if fmt.bos_id is None else [fmt.bos_id]),
             *fmt.prefix, *fmt.suffix]
    return codes + sorted(set(fixed) - set(codes)) + [UNKNOWN_ROW_ID]


class CompactEmbedding(torch.nn.Embedding):
    """An embedding over a compact table that takes global token ids (``table_rows``)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(table_rows(self.rows, ids))


def compact_vocab_of(model: torch.nn.Module) -> tuple[list[int], int] | None:
    """(token id of each row, full vocabulary size) of a compact draft's config; None if not one."""
    rec = getattr(getattr(model, "config", None), COMPACT_VOCAB_KEY, None)
    if rec is None:
        return None
    ids, full = (rec.get("token_ids"), rec.get("full_vocab_size")) if isinstance(rec, dict) else (None, None)
    ok = (isinstance(ids, list) and ids and isinstance(full, int)
          and all(isinstance(i, int) and -1 <= i < full for i in ids)
          and ids.count(UNKNOWN_ROW_ID) == 1 and len(set(ids)) == len(ids))
    if not ok:
        raise ValueError(f"config {COMPACT_VOCAB_KEY!r} must be {{'token_ids': distinct ids below "
                         f"'full_vocab_size' with one {UNKNOWN_ROW_ID} (the unknown row), "
                         "'full_vocab_size': int}")
    return ids, full


def attach_compact_vocab(model: PreTrainedModel, token_ids: list[int] | None = None,
                         full_vocab_size: int | None = None) -> PreTrainedModel:
    """Make ``model`` (a tied causal LM with one row per ``token_ids`` entry) a compact draft:
    record the table in its config (given ids) or read it from there (None), and install the
    id -> row map (``CompactEmbedding``) and the code-head map ``head_columns`` [V]."""
    if token_ids is not None:
        setattr(model.config, COMPACT_VOCAB_KEY, {"token_ids": list(token_ids),
                                                  "full_vocab_size": int(full_vocab_size)})
    token_ids, full = compact_vocab_of(model)  # type: ignore[misc]
    old = model.get_input_embeddings()
    if old.weight.shape[0] != len(token_ids):
        raise ValueError(f"{COMPACT_VOCAB_KEY}: {len(token_ids)} rows listed, the embedding "
                         f"has {old.weight.shape[0]}")
    if model.get_output_embeddings().weight is not old.weight:
        raise ValueError(f"{COMPACT_VOCAB_KEY}: the LM head must be tied to the embeddings")
    dev = old.weight.device
    ids = torch.tensor(token_ids, dtype=torch.long, device=dev)
    known = ids >= 0
    at = torch.arange(len(token_ids), device=dev)
    rows = torch.full((full + 1,), int(at[~known][0]), dtype=torch.long, device=dev)
    rows[ids[known]] = at[known]
    new = CompactEmbedding(old.num_embeddings, old.embedding_dim, _weight=old.weight.detach())
    new.weight = old.weight  # the Parameter itself (nn.Embedding would wrap a new one)
    new.register_buffer("rows", rows, persistent=False)  # [V + 1]
    model.set_input_embeddings(new)  # the same Parameter: the head stays tied to it
    columns = torch.full((full,), -1, dtype=torch.long, device=dev)
    columns[ids[known]] = at[known]
    model.register_buffer("head_columns", columns, persistent=False)  # [V] id -> logit column
    return model


def shrink_to_compact(model: PreTrainedModel, token_ids: list[int], full_vocab_size: int
                      ) -> PreTrainedModel:
    """``model`` (full vocabulary, e.g. cut from the target) with its embedding table cut to the
    rows ``token_ids`` (the unknown row starts as the mean row), tied to a head over them."""
    old = model.get_input_embeddings().weight.detach()
    known = [max(i, 0) for i in token_ids]
    table = old[known].clone()
    table[[r for r, i in enumerate(token_ids) if i < 0]] = old.mean(0)
    emb = torch.nn.Embedding(len(token_ids), old.shape[1], _weight=table)
    model.set_input_embeddings(emb)
    head = torch.nn.Linear(old.shape[1], len(token_ids), bias=False, device=old.device, dtype=old.dtype)
    head.weight = emb.weight
    model.set_output_embeddings(head)
    model.config.vocab_size = len(token_ids)
    model.config.tie_word_embeddings = True
    model.config.pad_token_id = None
    return attach_compact_vocab(model, token_ids, full_vocab_size)


def build_compact_draft(size: LlamaSize, token_ids: list[int], full_vocab_size: int,
                        seed: int | None = None) -> LlamaForCausalLM:
    """A fresh Llama draft of ``size`` over a compact table (tied embeddings and head)."""
    return attach_compact_vocab(build_llama(size, len(token_ids), seed=seed), token_ids,
                                full_vocab_size)


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """HF checkpoint: config + safetensors weights + tokenizer files in one directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def load_weights(path: str | Path, device: DeviceConfig | None = None) -> PreTrainedModel:
    """Load the HF causal LM of a local model directory (no tokenizer), in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
    device = device or DeviceConfig()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a local folder loads in a second: no bar in our output
    model = AutoModelForCausalLM.from_pretrained(path, dtype=device.torch_dtype())
    if getattr(model.config, COMPACT_VOCAB_KEY, None) is not None:
        try:
            attach_compact_vocab(model)
        except ValueError as e:
            raise ValueError(f"{path / 'config.json'}: {e}") from None
    return model.to(device.torch_device()).eval()


def load_model(path: str | Path, device: DeviceConfig | None = None
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load any local HF causal LM directory (weights + tokenizer), in eval mode."""
    return load_weights(path, device), AutoTokenizer.from_pretrained(path)


def load_decoder(path: str | Path, device: DeviceConfig | None = None) -> torch.nn.Module:
    """A model for decoding only (beam search, speculative decoding, serving): the HF model of
    ``path``, on ``FastLlama`` when ``device.forward`` is ``fast`` and the checkpoint is a Llama
    (with its code head, ``CODE_HEAD_KEY``, if its config records one)."""
    from atspeed_ray.decoding.fast_llama import FastLlama, fast_forward

    device = device or DeviceConfig()
    model = load_weights(path, device)
    try:
        head = code_head_of(model)
    except ValueError as e:
        raise ValueError(f"{Path(path) / 'config.json'}: {e}") from None
    if device.forward != "fast":
        return model
    fast = fast_forward(model, head)
    if not isinstance(fast, FastLlama):  # another architecture: its HF forward
        return fast
    if device.compile:
        fast.compile_step()
    elif device.pack:
        fast.pack_weights()
    return fast
