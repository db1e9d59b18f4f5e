"""The names every layer shares, defined once: verification modes, forward types, dtype and
precision names, alignment loss names.

Training, decoding, serving and the CLI import these instead of spelling the literals again.
This module imports nothing heavy (no torch, no ray), so the CLI's ``--help`` and the
torch-free serving config can use it.
"""

from __future__ import annotations

from typing import Literal, get_args

# Verification mode of speculative beam search: strict top-K (lossless: equals the target's
# beam search) or relaxed sampling (the target's sampled beam search by recursive rejection sampling,
# judged by recall).
Mode = Literal["strict", "relaxed"]
MODES: tuple[str, ...] = get_args(Mode)
# relaxed mode's choice of the K beams at each step: "sample" = K draws without replacement from
# the target's p (the target's sampled beam search, exact for any draft); "top" = an
# experimental variant closer to beam search: drafts accepted by min(1, p/q), the K accepted ones
# with the best target scores kept, the target's own top-K where a round stops and at its bonus
# step (not a sample of any fixed distribution: it depends on the draft; results/relaxed/RUN.md)
RelaxedKeep = Literal["sample", "top"]
RELAXED_KEEPS: tuple[str, ...] = get_args(RelaxedKeep)
DEFAULT_RELAXED_KEEP: RelaxedKeep = "sample"
DEFAULT_MODE: Mode = "strict"

# Forward implementation for decoding: ``fast`` = FastLlama (Llama-family checkpoints; other
# architectures keep their HF forward), ``hf`` = the transformers forward.
Forward = Literal["fast", "hf"]
FORWARDS: tuple[str, ...] = get_args(Forward)
DEFAULT_FORWARD: Forward = "fast"

# ``torch.compile`` of FastLlama's per-layer dense blocks (``FastLlama.compile_step``). Off by
# default: on the shared 2-core CPU inductor's first compile of the tiny test models had not
# finished after 1500 s (load ~20), which no request batch pays back there; on CUDA turn it on
# by config (``DeviceConfig.compile``, ``--compile``). README: "Decoding step".
DEFAULT_COMPILE = False

# Pack FastLlama's projection weights once for the CPU GEMM library (``FastLlama.pack_weights``:
# oneDNN for bf16, MKL for fp32; nothing on CUDA or in fp64). On by default: it makes a
# SmolLM2-135M forward no slower at any length and faster at most, measured on a 2-core CPU in
# ``results/beauty-llm/pass_costs.json``. ``DeviceConfig.pack``, ``--no-pack``. README:
# "Decoding step".
DEFAULT_PACK = True

# Parameter dtype of a decoding model, by torch name; ``auto`` keeps the checkpoint's dtype
# (fp32 on CPU).
Dtype = Literal["auto", "float32", "bfloat16", "float16", "float64"]
DTYPES: tuple[str, ...] = get_args(Dtype)

# Training precision; ``auto`` = fp32 on CPU, bf16 on a GPU that supports it (else fp16).
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

# Alignment objectives (the registry of their definitions is ``training.losses.LOSSES``, keyed
# by exactly these names; a test checks the two agree).
LossName = Literal["sft", "seqkd", "wordkd", "tvdkd", "atspeed-s", "atspeed-r"]
LOSS_NAMES: tuple[str, ...] = get_args(LossName)


# the K values (top-K list lengths) bench, evaluate and the reference recommenders report by
# default: the paper's
DEFAULT_KS: tuple[int, ...] = (1, 3, 5, 10, 20)

# draft steps per round of a speculative search (``SearchParams.gamma``, ``--gamma``, the serve
# config's ``gamma``)
DEFAULT_GAMMA = 3

# the draft width policy (``width_policy.WidthPolicy``) where none is given: N = K
DEFAULT_DRAFT_BEAMS = "1k"
# ``--draft-beams auto`` / ``draft_beams_factor: auto``: the draft widths chosen per K by measured
# cost (``atspeed_ray.width``): first one width for every level, N = ceil(f * K) for these
# factors f; then per drafted level (code position), holding the others, the wider N = ceil(f * K)
# for the level factors, a change kept only where the expected time falls; at most
# AUTO_LEVEL_CANDIDATES such per-level candidates are measured (each: one strict search of the
# calibration prompts and its timed round)
AUTO = "auto"
AUTO_WIDTH_FACTORS: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0)
AUTO_LEVEL_FACTORS: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0, 20.0)
AUTO_LEVEL_CANDIDATES = 15
# validation prompts the choice is measured on
AUTO_WIDTH_PROMPTS = 8

# torch threads while timing on the CPU (bench, evaluate, the width chooser): with one thread a
# background load only slows the clock, and both sides of a pair alike; with several, a thread
# that shares its core with another process makes every parallel op wait for its time slice,
# which changes the two sides' relative cost (results/trust/RUN.md). 0: torch's own default.
TIMING_THREADS = 1
# ``loadtest --baseline-url``: the load in this many rounds, each sent to both apps back to back
# with the first app alternating (``serving.loadtest.compare_load``); the same idea as the paired
# timing above, for a server whose requests cannot be paired one by one.
LOADTEST_ROUNDS = 3

# strict: a round ends with children steps (every trie child of the step before) from the first
# step after which every step left has at most this many per request (``SearchParams.expand_last``;
# 0 = always the draft's top N)
EXPAND_LAST = 0


def check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming ``what`` and the choices."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    return value
