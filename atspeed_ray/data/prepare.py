"""Turn a release (or the synthetic data set) into a prepared folder that training and eval read.

Layout of ``out_dir``::

    raw/                       the generated release (synthetic data only)
    tokenizer/                 word-level tokenizer (special tokens, then code tokens by level, code),
                               or with --base-model that model's tokenizer plus the code tokens
                               and <sep> as added special tokens (one id each, after its vocabulary)
    index.json                 {"item_id": ["<a_1>", ...]}, the release index format
    {train,valid,test}.parquet user int64, history list<int64>, targets list<int64>,
                               prompt list<int32> (token ids), target_codes list<int32> (targets[0])
    summary.json               counts, skipped users, collisions; the base model (folder and
                               fingerprint, or null), the prompt template and the prompt format
                               (token ids of its text), prompt lengths per split

Item ids everywhere are index keys: split files that are 1-based against a 0-based index (the
paper's Beauty release) are shifted by the loader, and ``summary["item_id_offset"]`` records it.
``data="synthetic"`` always means the built-in generator, never a folder of that name.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from atspeed_ray.data.errors import DataError
from atspeed_ray.data.index import ItemIndex
from atspeed_ray.data.llm import base_fingerprint, check_model_fits, load_base_tokenizer, tokenizer_file
from atspeed_ray.data.release import (
    SPLITS, Release, load_release, parse_code, read_index_json, write_release,
)
from atspeed_ray.data.synthetic import SyntheticConfig, synthesize
from atspeed_ray.data.templates import DEFAULT_TEMPLATE, PromptTemplate, get_template
from atspeed_ray.data.tokenizer import PromptFormat, add_code_tokens, build_tokenizer, codes_to_token_ids

SCHEMA = pa.schema([
    ("user", pa.int64()),
    ("history", pa.list_(pa.int64())),
    ("targets", pa.list_(pa.int64())),
    ("prompt", pa.list_(pa.int32())),
    ("target_codes", pa.list_(pa.int32())),
])
REQUIRED = ("summary.json", "index.json", "tokenizer", *(f"{s}.parquet" for s in SPLITS))


def sorted_code_tokens(item_codes: dict[int, list[str]]) -> list[str]:
    """All distinct code tokens, sorted by level then code number."""
    return sorted({c for codes in item_codes.values() for c in codes}, key=parse_code)


def prepare(
    data: str | Path,
    out_dir: str | Path,
    history_len: int = 20,
    synthetic: SyntheticConfig | None = None,
    base_model: str | Path | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
) -> dict[str, Any]:
    """Load ``data`` ("synthetic" or a release folder), write the prepared folder, return the
    summary. ``base_model``: a pretrained LLM folder whose tokenizer (plus the code tokens) is
    used, with ``prompt_template`` around the history; None: the word-level tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    release, gen = load_source(data, out, synthetic)
    template = get_template(prompt_template)
    tok, fmt, base = make_tokenizer(sorted_code_tokens(release.item_codes), base_model, template)
    tok.save_pretrained(out / "tokenizer")
    item_tokens = codes_to_token_ids(tok, release.item_codes)  # item -> [L] token ids
    index = ItemIndex.from_codes(item_tokens)
    with (out / "index.json").open("w") as f:
        json.dump({str(i): release.item_codes[i] for i in sorted(release.item_codes)}, f)
    counts, skipped, lengths = write_splits(release, out, fmt, item_tokens, history_len)

    summary: dict[str, Any] = {
        "data": str(data),
        "source": str(release.path),
        "index_file": release.index_file.name,
        "users": len(release.users),
        "items": len(release.item_codes),
        "L": release.L,
        "vocab_size": len(tok),
        "history_len": history_len,
        "interactions": {s: release.num_interactions(s) for s in SPLITS},
        "samples": counts,
        "skipped": skipped,
        "collision_groups": len(index.collisions),
        "collisions": index.collisions,
        "item_id_offset": release.item_id_offset,
        "base_model": base,
        "prompt_template": template.name,
        "prompt_format": fmt.to_dict(),
        "prompt_tokens": lengths,
    }
    if gen is not None:
        summary["synthetic"] = gen
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def load_source(data: str | Path, out: Path, synthetic: SyntheticConfig | None
                ) -> tuple[Release, dict[str, Any] | None]:
    """The release to prepare (generated into ``out/raw`` for "synthetic"), and the generator's
    config and stats (None for a release folder)."""
    if str(data) == "synthetic":
        syn = synthesize(synthetic or SyntheticConfig())
        write_release(out / "raw", syn.item_codes, syn.train, syn.valid, syn.test, "synthetic.json")
        return load_release(out / "raw"), {"config": syn.config.model_dump(), "stats": syn.stats}
    if synthetic is not None:
        raise ValueError("a synthetic config was given but data is not 'synthetic'")
    return load_release(data), None


def make_tokenizer(code_tokens: list[str], base_model: str | Path | None, template: PromptTemplate
                   ) -> tuple[PreTrainedTokenizerBase, PromptFormat, dict[str, Any] | None]:
    """(tokenizer, prompt format, base model fingerprint or None)."""
    if base_model is None:
        if template.has_text:
            raise DataError(f"prompt template {template.name!r} holds text, which the word-level "
                            f"tokenizer cannot encode: give --base-model")
        tok = build_tokenizer(code_tokens)
        return tok, PromptFormat.from_template(tok, template), None
    root = Path(base_model)
    tok = load_base_tokenizer(root)
    base = base_fingerprint(root, tok)  # before the code tokens are added
    add_code_tokens(tok, code_tokens, tokenizer_file(root))
    try:
        fmt = PromptFormat.from_template(tok, template)
    except ValueError as e:
        raise DataError(str(e), tokenizer_file(root)) from e
    return tok, fmt, base


def write_splits(release: Release, out: Path, fmt: PromptFormat, item_tokens: dict[int, list[int]],
                 history_len: int) -> tuple[dict[str, int], dict[str, Any], dict[str, dict]]:
    """One Parquet file per split; returns sample counts, skipped users and prompt lengths."""
    counts, skipped, lengths = {}, {}, {}
    for split in SPLITS:
        samples, skipped[split] = release.samples(split, history_len)
        counts[split] = len(samples)
        prompts = [fmt.encode([item_tokens[i] for i in s.history]) for s in samples]
        table = pa.table({
            "user": [s.user for s in samples],
            "history": [s.history for s in samples],
            "targets": [s.targets for s in samples],
            "prompt": prompts,
            "target_codes": [item_tokens[s.targets[0]] for s in samples],
        }, schema=SCHEMA)
        pq.write_table(table, out / f"{split}.parquet")
        lengths[split] = length_stats([len(p) for p in prompts])
    return counts, skipped, lengths


def length_stats(lengths: list[int]) -> dict[str, float]:
    """Mean, 95th percentile and max of prompt lengths in tokens (zeros for no prompts)."""
    if not lengths:
        return {"mean": 0.0, "p95": 0.0, "max": 0.0}
    ordered = sorted(lengths)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return {"mean": round(sum(ordered) / len(ordered), 2), "p95": float(p95), "max": float(ordered[-1])}


@dataclass
class PreparedData:
    root: Path
    index: ItemIndex
    tokenizer: PreTrainedTokenizerFast
    prompt_format: PromptFormat
    item_codes: dict[int, list[str]]
    summary: dict[str, Any]
    _tables: dict[str, pa.Table] = field(default_factory=dict, repr=False)

    def table(self, split: str) -> pa.Table:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._tables:
            self._tables[split] = pq.read_table(self.root / f"{split}.parquet", schema=SCHEMA)
        return self._tables[split]

    def _column(self, split: str, name: str, limit: int | None) -> list:
        t = self.table(split)
        return (t if limit is None else t.slice(0, limit)).column(name).to_pylist()

    def prompts(self, split: str, limit: int | None = None) -> list[list[int]]:
        """Prompt token ids of each sample."""
        return self._column(split, "prompt", limit)

    def targets(self, split: str, limit: int | None = None) -> list[list[int]]:
        """Target item ids of each sample (one for train/valid, all test items for test)."""
        return self._column(split, "targets", limit)

    def histories(self, split: str, limit: int | None = None) -> list[list[int]]:
        """History item ids of each sample, oldest first."""
        return self._column(split, "history", limit)

    def users(self, split: str, limit: int | None = None) -> list[int]:
        return self._column(split, "user", limit)


def load_prepared(path: str | Path) -> PreparedData:
    """Open a folder written by ``prepare``."""
    root = Path(path)
    missing = [name for name in REQUIRED if not (root / name).exists()]
    if missing:
        raise DataError(f"not a prepared data folder (missing {', '.join(missing)}); run prepare first", root)
    tok = PreTrainedTokenizerFast.from_pretrained(str(root / "tokenizer"))
    item_codes = read_index_json(root / "index.json")
    index = ItemIndex.from_codes(codes_to_token_ids(tok, item_codes))
    summary = json.loads((root / "summary.json").read_text())
    return PreparedData(root, index, tok, stored_prompt_format(summary, tok), item_codes, summary)


def stored_prompt_format(summary: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
    """The prompt format a prepared folder was written with (its ``summary.json``); folders
    written before prompt templates existed used the plain format of their tokenizer."""
    stored = summary.get("prompt_format")
    return PromptFormat.from_dict(stored) if stored else PromptFormat.from_tokenizer(tokenizer)


def popularity_topk(prepared: PreparedData, k: int) -> list[int]:
    """The ``k`` most frequent items among train interactions (ties: smaller item id first).

    Every train sequence item counts once: all train targets, plus the first item of each user's
    sequence (the history of the user's first train sample). Users with a single train item give
    no train sample and are not counted.
    """
    t = prepared.table("train")
    users = t.column("user").to_pylist()
    counts = Counter(i for ts in t.column("targets").to_pylist() for i in ts)
    for row, hist in enumerate(t.column("history").to_pylist()):
        if row == 0 or users[row] != users[row - 1]:
            counts[hist[0]] += 1
    return [i for i, _ in sorted(counts.items(), key=lambda x: (-x[1], x[0]))[:k]]


def check_base_model(prepared: PreparedData, model_dir: str | Path) -> None:
    """Stop with a DataError naming ``model_dir`` unless it fits ``prepared``
    (``data.llm.check_model_fits``: its own tokenizer, or the base model it was made with)."""
    check_model_fits(prepared.root, prepared.summary, prepared.tokenizer, model_dir)


def check_models(prepared: PreparedData, *model_dirs: str | Path | None) -> None:
    """``check_base_model`` for every model folder given (None: not given)."""
    for model_dir in model_dirs:
        if model_dir is not None:
            check_base_model(prepared, model_dir)


def open_data(data: str | Path, workdir: str | Path | None = None,
              models: Sequence[str | Path | None] = ()) -> PreparedData:
    """A prepared folder as is; ``"synthetic"`` or a release folder is prepared first, into
    ``workdir`` (default: a fresh temporary folder). Every model folder of ``models`` (None: not
    given) must fit it (``check_base_model``), else a DataError names the model's file."""
    path = Path(data)
    if str(data) != "synthetic" and (path / "summary.json").exists():
        prepared = load_prepared(path)
    else:
        if workdir is None:
            import tempfile

            workdir = tempfile.mkdtemp(prefix="atspeed-prepared-")
        prepare(data, workdir)
        prepared = load_prepared(workdir)
    check_models(prepared, *models)
    return prepared
