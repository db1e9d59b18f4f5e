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

from atspeed_ray.settings import DEFAULT_FORWARD, Dtype, Forward, Precision

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 matmuls
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
        # the CPU presets used for demos and the Beauty benchmarks on a 2-core machine
        Preset(name="cpu", target=LlamaSize(hidden_size=256, num_layers=4, num_heads=8),
               draft=LlamaSize(hidden_size=64, num_layers=2, num_heads=4)),
        # a GPU cluster: ~100M target, ~7M draft (the paper used LLaMA-7B / LLaMA-68M)
        Preset(name="gpu", target=LlamaSize(hidden_size=768, num_layers=12, num_heads=12),
               draft=LlamaSize(hidden_size=256, num_layers=2, num_heads=4)),
    ]
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


class DeviceConfig(BaseModel):
    """Where models run. ``auto`` means CUDA + bf16 when a GPU is present, else CPU + fp32.

    ``forward`` picks the decoding forward of ``load_decoder``: ``fast`` runs Llama checkpoints on
    the compact ``FastLlama`` (other architectures keep their HF forward), ``hf`` always uses the
    HF model's own forward. Training always uses the HF model.
    """

    model_config = ConfigDict(extra="forbid")

    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    dtype: Dtype = "auto"
    forward: Forward = DEFAULT_FORWARD

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            dev = self.torch_device()
            return torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        return getattr(torch, self.dtype)


def cpu_bf16_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """The native-bf16 flags (``CPU_BF16_FLAGS``) this CPU reports (empty if none or unreadable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return []
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                      if ln.startswith("flags")), []))
    return [f for f in CPU_BF16_FLAGS if f in flags]


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
    model = AutoModelForCausalLM.from_pretrained(path, dtype=device.torch_dtype())
    return model.to(device.torch_device()).eval()


def load_model(path: str | Path, device: DeviceConfig | None = None
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load any local HF causal LM directory (weights + tokenizer), in eval mode."""
    return load_weights(path, device), AutoTokenizer.from_pretrained(path)


def load_decoder(path: str | Path, device: DeviceConfig | None = None) -> torch.nn.Module:
    """A model for decoding only (beam search, speculative decoding, serving): the HF model of
    ``path``, on ``FastLlama`` when ``device.forward`` is ``fast`` and the checkpoint is a Llama
    (with its code head, ``CODE_HEAD_KEY``, if its config records one)."""
    from atspeed_ray.decoding.fast_llama import fast_forward

    device = device or DeviceConfig()
    model = load_weights(path, device)
    try:
        head = code_head_of(model)
    except ValueError as e:
        raise ValueError(f"{Path(path) / 'config.json'}: {e}") from None
    return fast_forward(model, head) if device.forward == "fast" else model
