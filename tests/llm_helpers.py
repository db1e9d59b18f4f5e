"""Tiny pretrained-LLM stand-ins for tests (no downloads): a byte-level BPE tokenizer trained in
a few milliseconds with the ``tokenizers`` library, and random tiny Llama / Qwen2 checkpoints
saved with it as ordinary HF model folders (config.json, safetensors, tokenizer files).

``tiny_llm_folder(path, "llama")`` is a Llama-style base model (bos ``<s>``, eos ``</s>``, no pad
token, untied head); ``"qwen2"`` a Qwen2-style one (no bos, eos = pad ``<|endoftext|>``, a chat
template, tied embeddings, a config vocabulary rounded up past the tokenizer's as Qwen2 does).
``write_llama_gguf`` writes a tiny Llama and its tokenizer as an fp32 GGUF file, the layout
llama.cpp's converter gives (q/k rows permuted per head), for ``base-model --gguf``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast
from transformers import Qwen2Config, Qwen2ForCausalLM

CORPUS = [
    "The user bought a red lipstick and then a mascara.",
    "Recommend the next item the user will interact with.",
    "Here is a history of items, oldest first, in a store of beauty products.",
    "A shampoo, a conditioner, a hair dryer and a brush were bought together.",
    "What comes next in this sequence of purchases?",
]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ARCHS = ("llama", "qwen2")


def bpe_tokenizer(style: str = "llama", vocab_size: int = 320,
                  ordinary_tokens: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``CORPUS``; ``ordinary_tokens`` are added as normal
    (non-special) tokens, as a pretrained vocabulary may hold such strings."""
    special = ["<s>", "</s>"] if style == "llama" else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(CORPUS * 4, trainer)
    if style == "llama":
        tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>",
                                      pad_token="<|endoftext|>")
        tok.chat_template = CHAT_TEMPLATE
    if ordinary_tokens:
        tok.add_tokens(list(ordinary_tokens))
    return tok


def tiny_llm(arch: str, vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2,
             pad_token_id: int | None = None) -> PreTrainedModel:
    """A random tiny causal LM of ``arch`` (fp32, eval mode), 4 query / 2 key-value heads."""
    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden,
                  max_position_embeddings=256, pad_token_id=pad_token_id)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    else:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    return model.eval()


def tiny_llm_folder(path: str | Path, arch: str = "llama", seed: int = 0,
                    ordinary_tokens: tuple[str, ...] = ()) -> Path:
    """Save a tiny random ``arch`` base model with its BPE tokenizer under ``path``."""
    tok = bpe_tokenizer(arch, ordinary_tokens=ordinary_tokens)
    vocab = len(tok) if arch == "llama" else 16 * (len(tok) // 16 + 1)  # Qwen2 pads its vocab
    model = tiny_llm(arch, vocab, seed=seed, pad_token_id=tok.pad_token_id)
    out = Path(path)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def fit_to_tokenizer(model: PreTrainedModel, vocab_size: int, scale: float = 4.0,
                     dtype: torch.dtype = torch.float64) -> PreTrainedModel:
    """``model`` with embeddings (and an untied head) resized to ``vocab_size``, logits spread by
    ``scale`` so that beams differ, in ``dtype``: a stand-in for a fine-tuned target."""
    if model.get_input_embeddings().weight.shape[0] < vocab_size:
        model.resize_token_embeddings(vocab_size)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model.to(dtype).eval()


GGUF_LAYER_NAMES = [("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"),
                    ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                    ("self_attn.o_proj", "attn_output"), ("post_attention_layernorm", "ffn_norm"),
                    ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                    ("mlp.down_proj", "ffn_down")]


def gguf_rope_order(w, heads: int):
    """GGUF keeps q/k rows of each head in interleaved rope order (HF: the two halves)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, path: str | Path) -> Path:
    """An untied Llama with a byte-level BPE tokenizer as one fp32 GGUF file."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda x: x[1])]
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in tok.all_special_tokens else 1 for t in tokens])  # 3: control
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{a}.weight": f"blk.{i}.{b}.weight" for a, b in GGUF_LAYER_NAMES})
    state = model.state_dict()
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    for hf_name, name in names.items():
        t = state[hf_name].detach().float().numpy()
        kind = name.split(".")[-2]
        w.add_tensor(name, gguf_rope_order(t, heads[kind]) if kind in heads else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
