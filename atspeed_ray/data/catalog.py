"""The item catalog the serving app needs: the item index (trie) and how a history becomes a prompt.

Where it comes from (``AppArgs.data``):

* a prepared data folder (``atspeed-ray prepare --out DIR``): its ``index.json`` and ``tokenizer/``,
  and its ``summary.json`` ``history_len`` as the default history window; example histories for
  ``GET /meta`` (and so for the load tool) come from its test split;
* ``None``: what the training exports write beside the *target* model (``export_catalog``):
  ``index.json`` (release format ``{"item": ["<a_1>", ...]}``) and ``catalog.json`` (the prompt
  format and ``history_len`` of the data it was trained on), with the model's own tokenizer;
  random example histories. Without ``catalog.json``: the tokenizer's plain prompt format and a
  history window of 20.

Either way the code tokens must be the model's tokens: the check below refuses a catalog whose
token ids fall outside the model vocabulary, or a data tokenizer that disagrees with the model's.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from atspeed_ray.data.errors import DataError
from atspeed_ray.data.index import ItemIndex
from atspeed_ray.data.llm import check_model_fits
from atspeed_ray.data.release import read_index_json
from atspeed_ray.data.tokenizer import PromptFormat, codes_to_token_ids

if TYPE_CHECKING:
    from atspeed_ray.data.prepare import PreparedData

DEFAULT_HISTORY_WINDOW = 20
NUM_EXAMPLES = 64
INDEX_FILE = "index.json"
CATALOG_FILE = "catalog.json"
MISSING_INDEX = ("no data folder given and no index.json beside the target model (train-target "
                 "exports write it; or pass the prepared data folder: --data / args.data)")


@dataclass
class Catalog:
    index: ItemIndex  # on CPU
    prompt_format: PromptFormat
    history_window: int  # most recent items used for the prompt
    examples: list[list[int]]  # example histories (item ids)
    vocab: dict[str, int]  # tokenizer vocabulary (token -> id)

    def prompt(self, history: list[int]) -> list[int]:
        """History item ids (oldest first, all known) -> prompt token ids."""
        recent = history[-self.history_window:]
        return self.prompt_format.encode(self.index.codes_of(recent).tolist())

    def unknown(self, history: list[int]) -> list[int]:
        """Positions of the items that are not in the index."""
        ok = self.index.contains(history).tolist()
        return [i for i, known in enumerate(ok) if not known]


def load_catalog(data: str | None, model_dir: str, history_window: int | None = None) -> Catalog:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from atspeed_ray.data.prepare import stored_prompt_format

    model_tok = AutoTokenizer.from_pretrained(model_dir)
    if data is not None:
        root = Path(data)
        if not (root / INDEX_FILE).is_file() or not (root / "tokenizer").is_dir():
            raise DataError(f"not a prepared data folder (needs {INDEX_FILE} and tokenizer/)", root)
        tok = PreTrainedTokenizerFast.from_pretrained(str(root / "tokenizer"))
        item_codes = read_index_json(root / INDEX_FILE)
        summary_path = root / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        window = history_window or int(summary.get("history_len", DEFAULT_HISTORY_WINDOW))
        examples = _test_histories(root)
        check_model_fits(root, summary, tok, model_dir)
    else:
        path = Path(model_dir) / INDEX_FILE
        if not path.is_file():
            raise DataError(MISSING_INDEX, path)
        tok = model_tok
        item_codes = read_index_json(path)
        meta_path = Path(model_dir) / CATALOG_FILE
        summary = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        window = history_window or int(summary.get("history_len", DEFAULT_HISTORY_WINDOW))
        examples = []
    token_ids = codes_to_token_ids(tok, item_codes)
    fmt = stored_prompt_format(summary, tok)
    # the model must know these tokens under the same ids
    model_vocab = model_tok.get_vocab()
    data_vocab = tok.get_vocab()
    used = {c for codes in item_codes.values() for c in codes}
    for name in (tok.sep_token, tok.bos_token, tok.pad_token):
        if name is not None:
            used.add(name)
    wrong = sorted(t for t in used if model_vocab.get(t) != data_vocab.get(t))
    if wrong:
        raise DataError(f"the model's tokenizer disagrees with the catalog on {len(wrong)} tokens "
                        f"(e.g. {wrong[0]!r}): serve the models trained on this data", model_dir)
    index = ItemIndex.from_codes(token_ids)
    if not examples:
        rng = random.Random(0)
        ids = index.item_ids.tolist()
        examples = [rng.sample(ids, min(len(ids), rng.randint(3, window))) for _ in range(NUM_EXAMPLES)]
    return Catalog(index, fmt, window, examples, data_vocab)


def export_catalog(prepared: PreparedData, out: str | Path) -> None:
    """Beside an exported model: the item index and the prompt format it was trained with, so
    that ``serve --target DIR --draft DIR`` needs no data folder."""
    out = Path(out)
    shutil.copyfile(prepared.root / INDEX_FILE, out / INDEX_FILE)
    meta = {"prompt_format": prepared.prompt_format.to_dict(),
            "history_len": int(prepared.summary.get("history_len", DEFAULT_HISTORY_WINDOW))}
    (out / CATALOG_FILE).write_text(json.dumps(meta, indent=1))


def catalog_source_error(data: str | None, target: str) -> str | None:
    """Why ``load_catalog(data, target)`` cannot work, in one line (None: it has what it needs)."""
    if data is not None:
        root = Path(data)
        if not (root / INDEX_FILE).is_file() or not (root / "tokenizer").is_dir():
            return f"{root}: not a prepared data folder (needs {INDEX_FILE} and tokenizer/)"
        return None
    if not (Path(target) / INDEX_FILE).is_file():
        return f"{Path(target) / INDEX_FILE}: {MISSING_INDEX}"
    return None


def _test_histories(root: Path) -> list[list[int]]:
    for split in ("test", "valid"):
        path = root / f"{split}.parquet"
        if path.is_file():
            import pyarrow.parquet as pq

            hist = pq.read_table(path, columns=["history"]).slice(0, NUM_EXAMPLES)
            return [list(map(int, h)) for h in hist.column("history").to_pylist()]
    return []
