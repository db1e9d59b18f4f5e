"""An LLM target through the whole pipeline: every command that pairs a prepared folder with a
model stops on a model of another base model (one clear error naming its file, before any heavy
work), and prepare -> train-target --init -> teacher -> align -> evaluate / bench runs end to end
on tiny Llama / Qwen2 checkpoints built in the test (tests/llm_helpers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atspeed_ray.cli import main
from atspeed_ray.data.errors import DataError
from atspeed_ray.data.prepare import load_prepared, prepare
from atspeed_ray.data.synthetic import SyntheticConfig
from tests.llm_helpers import tiny_llm_folder

SMALL = SyntheticConfig(num_users=60, num_items=40, codebook_sizes=[4, 4, 4, 4], seed=5)


@pytest.fixture(scope="module")
def mismatch(tmp_path_factory) -> dict[str, Path]:
    """A folder prepared with a tiny Llama, that Llama, and two models that do not fit it: a
    Qwen2 (other model type) and a Llama whose tokenizer holds one more token."""
    root = tmp_path_factory.mktemp("mismatch")
    base = tiny_llm_folder(root / "llama", "llama")
    prep = root / "prep"
    prepare("synthetic", prep, history_len=5, synthetic=SMALL, base_model=base)
    return {"prep": prep, "base": base, "qwen": tiny_llm_folder(root / "qwen", "qwen2"),
            "other": tiny_llm_folder(root / "other", "llama", ordinary_tokens=("hello",))}


def stops(argv: list[str], capsys, named: Path) -> str:
    """Run the CLI; it must exit 2 with one line that names ``named`` and the prepared folder."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(named) in err and "was prepared with base model" in err, err
    return err


def test_every_loader_refuses_a_model_of_another_base(mismatch, capsys, tmp_path):
    m = mismatch
    data = ["--data", str(m["prep"])]
    out = ["--out", str(tmp_path / "o")]
    qwen_err = stops(["train-target", *data, *out, "--init", str(m["qwen"]), "--workers", "0"],
                     capsys, m["qwen"])
    assert "model type 'qwen2' is not the base model's 'llama'" in qwen_err
    other_err = stops(["train-target", *data, *out, "--init", str(m["other"]), "--workers", "0"],
                      capsys, m["other"] / "tokenizer.json")
    assert "its tokenizer is neither" in other_err
    stops(["align", *data, *out, "--loss", "sft", "--target", str(m["qwen"]), "--workers", "0"], capsys, m["qwen"])
    stops(["align", *data, *out, "--loss", "sft", "--target", str(m["base"]), "--init", str(m["other"]),
           "--workers", "0"], capsys, m["other"])
    stops(["teacher", *data, *out, "--target", str(m["qwen"]), "--workers", "0"], capsys, m["qwen"])
    stops(["evaluate", *data, *out, "--target", str(m["qwen"]), "--draft", str(m["base"])],
          capsys, m["qwen"])
    stops(["evaluate", *data, *out, "--target", str(m["base"]), "--draft", str(m["base"]),
           "--draft", str(m["other"])], capsys, m["other"])
    stops(["bench", *data, "--target", str(m["base"]), "--draft", str(m["qwen"])], capsys, m["qwen"])
    stops(["bench-beam", *data, "--model", str(m["qwen"])], capsys, m["qwen"])
    space = tmp_path / "space.yaml"
    space.write_text("name: t\nmode: strict\nfixed: {loss: atspeed-s, epochs: 1}\n"
                     "search:\n  alpha: {choice: [0.2, 0.9]}\n")
    stops(["tune", *data, *out, "--target", str(m["qwen"]), "--teacher", str(m["prep"]),
           "--space", str(space), "--num-samples", "1"], capsys, m["qwen"])
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_serving_catalog_refuses_a_model_of_another_base(mismatch):
    from atspeed_ray.serving.catalog import load_catalog

    with pytest.raises(DataError, match=r"qwen: model type 'qwen2' is not the base model's"):
        load_catalog(str(mismatch["prep"]), str(mismatch["qwen"]))


def test_base_model_and_prepared_tokenizer_both_fit(mismatch, tmp_path):
    from atspeed_ray.data.llm import check_models

    prepared = load_prepared(mismatch["prep"])
    trained = tiny_llm_folder(tmp_path / "trained", "llama")
    prepared.tokenizer.save_pretrained(trained)  # a model trained on the folder carries its tokenizer
    check_models(prepared, mismatch["base"], trained, None)
    summary = json.loads((mismatch["prep"] / "summary.json").read_text())
    assert summary["base_model"]["model_type"] == "llama"
