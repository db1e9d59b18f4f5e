"""A pretrained LLM as the base of a prepared folder: its tokenizer, its fingerprint, and the
check that a model used with a prepared folder fits the base model it was made with.

``prepare --base-model DIR`` tokenizes with DIR's tokenizer plus the code tokens, and records
in ``summary.json["base_model"]`` where it came from: the folder, its ``model_type``, the size
and a SHA-256 of the base vocabulary, a SHA-256 of its ``config.json``. ``check_model_fits``
(``data.prepare.check_base_model`` on an opened folder) then accepts, for training, teacher, decoding and serving, either that base model itself (the
start of ``train-target --init``) or a model whose tokenizer is the prepared folder's own (every
model trained on the folder is saved with it), and nothing else.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atspeed_ray.data.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_file(model_dir: Path) -> Path:
    """The file to name in errors about ``model_dir``'s tokenizer."""
    return next((model_dir / n for n in TOKENIZER_FILES if (model_dir / n).is_file()), model_dir)


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise DataError("not a Hugging Face model folder (no config.json)", model_dir)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg})", path, e.lineno) from e


def check_checkpoint(model_dir: str | Path) -> None:
    """A model folder's config.json parses and every ``*.safetensors`` weight file has a whole
    header that covers the file (``safe_open``: header only, no tensor is read), else a DataError
    naming the file: a truncated or foreign file is refused in well under a second, before any
    replica or worker starts."""
    from safetensors import SafetensorError, safe_open

    root = Path(model_dir)
    read_config(root)
    weights = sorted(root.glob("*.safetensors"))
    if not weights:
        raise DataError("model folder without weights (no *.safetensors file)", root)
    for path in weights:
        try:
            with safe_open(str(path), "pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise DataError(f"not a readable safetensors file ({e})", path) from None


def load_base_tokenizer(model_dir: str | Path) -> "PreTrainedTokenizerBase":
    """The tokenizer of a local HF model folder, or a DataError naming what is missing."""
    from transformers import AutoTokenizer

    root = Path(model_dir)
    if not root.is_dir():
        raise DataError("base model folder not found", root)
    read_config(root)
    if not has_tokenizer(root):
        raise DataError(f"model folder without a tokenizer (none of {', '.join(TOKENIZER_FILES)})",
                        root)
    try:
        return AutoTokenizer.from_pretrained(str(root))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise DataError(f"cannot load its tokenizer ({type(e).__name__}: {e})", root) from e


def vocab_sha256(tokenizer: "PreTrainedTokenizerBase") -> str:
    """A hash of token -> id over the whole vocabulary (added tokens included)."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def base_fingerprint(model_dir: str | Path, tokenizer: "PreTrainedTokenizerBase") -> dict[str, Any]:
    """What ``summary.json["base_model"]`` records (``tokenizer`` before code tokens are added)."""
    root = Path(model_dir)
    config = read_config(root)
    return {
        "path": str(root.resolve()),
        "model_type": config.get("model_type"),
        "config_vocab_size": config.get("vocab_size"),
        "vocab_size": len(tokenizer),
        "vocab_sha256": vocab_sha256(tokenizer),
        "config_sha256": hashlib.sha256((root / "config.json").read_bytes()).hexdigest(),
    }


def check_model_fits(root: Path, summary: dict[str, Any], tokenizer: "PreTrainedTokenizerBase",
                     model_dir: str | Path) -> None:
    """Stop with a DataError naming ``model_dir`` unless it fits the prepared folder ``root``
    (its summary.json, its tokenizer): a model that carries the folder's own tokenizer (every
    model trained on it, a draft of another architecture too), or the base model the folder was
    made with (same model type and base vocabulary). A model folder without a tokenizer is judged
    by its config: the base model's type, and room in its vocabulary for every prepared token.
    ``data.prepare.check_models`` runs it on an opened folder."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    model = Path(model_dir)
    base = summary.get("base_model")
    made = (f"{root} was prepared with base model {base['path']}" if base
            else f"{root} was prepared with its own word-level tokenizer")
    config = read_config(model)
    digest = None
    if has_tokenizer(model):
        # read as load_prepared reads the folder's own: AutoTokenizer would pick a class from
        # config.json's model type, which may add tokens (a Qwen2 class adds <|endoftext|>)
        if (model / "tokenizer.json").is_file() and vocab_sha256(
                load_tokenizer(model, PreTrainedTokenizerFast)) == vocab_sha256(tokenizer):
            return  # trained on the folder (any architecture: a draft too)
        digest = vocab_sha256(load_tokenizer(model, AutoTokenizer))
    if base and config.get("model_type") != base["model_type"]:
        raise DataError(f"model type {config.get('model_type')!r} is not the base model's "
                        f"{base['model_type']!r}: {made}", model)
    if digest is None:
        if int(config.get("vocab_size") or 0) < len(tokenizer):
            raise DataError(f"vocabulary of {config.get('vocab_size')} < the {len(tokenizer)} "
                            f"tokens of the prepared tokenizer: {made}", model)
        return
    if base and digest == base["vocab_sha256"]:
        return
    hint = "prepare again with --base-model on this model" if base else "use a model trained on it"
    raise DataError(f"its tokenizer is neither the prepared folder's nor its base model's: {made}; "
                    f"{hint}", tokenizer_file(model))


def load_tokenizer(model_dir: Path, cls) -> "PreTrainedTokenizerBase":
    """``cls.from_pretrained(model_dir)``, or a DataError naming its tokenizer file."""
    try:
        return cls.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise DataError(f"cannot load its tokenizer ({type(e).__name__}: {e})",
                        tokenizer_file(model_dir)) from e
