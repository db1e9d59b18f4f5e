"""Pydantic settings of the serving app and the HTTP request/response schemas.

Limits (documented in the OpenAPI schema at /docs):

* ``history``: 1 to ``MAX_HISTORY`` (50) item ids, oldest first. Only the most recent
  ``history_window`` items (default: the prepared data's ``history_len``, 20) go into the prompt,
  exactly as training built its prompts. Longer histories get a 422 naming ``history``.
* ``k``: 1 to ``MAX_K`` (50), and at most the app's ``max_k`` and the number of distinct items.
* the body: at most ``MAX_BODY_BYTES`` (64 KiB; more gets a 413 before parsing). A 422 echoes
  at most 200 characters of the input it names.
* ``mode``: ``strict`` (lossless: the target's own beam search) or ``relaxed`` (sampling
  verification; add ``seed``, 0 to ``SEED_MAX``, for a reproducible answer; without one the
  ingress draws one at random, ``random_seed``, and reports it as ``stats.seed``).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from atspeed_ray.serving.routing import LOADS, PROBE_BACKOFF, PROBE_EVERY, Arm, Load, RouterConfig
from atspeed_ray.settings import (
    DEFAULT_DRAFT_BEAMS, DEFAULT_GAMMA, DEFAULT_MODE, EXPAND_LAST, Dtype, Forward, Mode,
)
from atspeed_ray.width_policy import WidthPolicy, measured_widths_at

MAX_HISTORY = 50
MAX_K = 50
MAX_BODY_BYTES = 64 * 1024  # POST bodies: 50 ids of 19 digits are ~1 KiB
SEED_MAX = 2**62  # a request's seed: 0..SEED_MAX (inside SearchParams' int64 range)


def random_seed() -> int:
    """The seed of a relaxed request that brought none (uniform over a request's seeds)."""
    return secrets.randbelow(SEED_MAX + 1)

ItemId = Annotated[int, Field(strict=True, ge=0, le=2**62)]


# --------------------------------------------------------------------------------------- HTTP
class RecommendRequest(BaseModel):
    """Body of ``POST /recommend``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    history: list[ItemId] = Field(
        min_length=1, max_length=MAX_HISTORY,
        description=f"Item ids the user interacted with, oldest first (1 to {MAX_HISTORY}; the "
                    "most recent history_window of them are used).")
    k: int = Field(default=10, ge=1, le=MAX_K, description="Number of items to return.")
    mode: Mode = Field(default=DEFAULT_MODE, description="strict: exact target beam search; "
                                                     "relaxed: sampling verification.")
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX,
                             description="relaxed mode: seed for a reproducible answer (without "
                                         "one, a random seed is drawn and reported as stats.seed).")


class RecommendResponse(BaseModel):
    items: list[int] = Field(description="Recommended item ids, best first (at most k).")
    scores: list[float] = Field(description="Target log-probability of each item's semantic ID.")
    stats: dict[str, int | float | str | bool | None] = Field(
        description="path (speculative | fallback | target_only), rounds, accepted_steps, "
                    "target_calls, draft_forwards, handle_calls, latency_ms, ...")


# ------------------------------------------------------------------------------------ settings
class BatchSettings(BaseModel):
    """``@serve.batch`` settings of a model replica's methods (the decorators in
    ``deployments.py`` start from these defaults; a replica applies its own in ``__init__``)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=16, ge=1, le=256)
    batch_wait_timeout_s: float = Field(default=0.002, ge=0.0, le=1.0)


class CacheLimits(BaseModel):
    """Bounds of a model replica's per-request tree caches (``cache: replica``): least recently
    used sessions are evicted beyond ``max_sessions`` or ``max_mb``, and a session unused for
    ``ttl_s`` is dropped (a request whose ingress died never sends its release)."""

    model_config = ConfigDict(extra="forbid")

    max_sessions: int = Field(default=256, ge=1, le=1_000_000)
    max_mb: float = Field(default=512.0, gt=0.0, le=1_000_000.0)
    ttl_s: float = Field(default=30.0, gt=0.0, le=3600.0)


class ModelSettings(BaseModel):
    """What a model replica (``DraftModel`` / ``TargetModel``) needs."""

    model_config = ConfigDict(extra="forbid")

    model: str  # HF model directory
    data: str | None = None  # prepared data folder (item index); None: index.json beside catalog_model
    catalog_model: str | None = None  # model dir with index.json + tokenizer when data is None (the target)
    device: str = "auto"  # "auto" (cuda if present), "cpu", "cuda", ...
    dtype: Dtype = "auto"
    forward: Forward = "fast"  # FastLlama for Llama checkpoints, or the HF forward
    torch_threads: int | None = Field(default=None, ge=1, le=256)  # None: Ray's per-actor default
    batch: BatchSettings = BatchSettings()
    cache: CacheLimits | None = None  # None: stateless calls only (no session store)


class FaultConfig(BaseModel):
    """Chaos hook of ``DraftModel``, set at runtime through its Serve ``user_config`` (applied in
    place by ``reconfigure``, no restart): ``raise`` fails every call, ``delay`` sleeps first."""

    model_config = ConfigDict(extra="forbid")

    fault: Literal["none", "raise", "delay"] = "none"
    fault_delay_s: float = Field(default=5.0, ge=0.0, le=600.0)


class RetryConfig(BaseModel):
    """What the ingress does when a model replica dies (``serving/retry.py``)."""

    model_config = ConfigDict(extra="forbid")

    attempts: int = Field(default=3, ge=1, le=10,
                          description="tries of one target call whose replica died (1: no retry)")
    backoff_s: float = Field(default=0.05, ge=0.0, le=10.0,
                             description="wait before the third try, doubling after (the second goes at once)")
    draft_cooldown_s: float = Field(default=1.0, ge=0.0, le=60.0,
                                    description="after a draft failure, the target alone for this long "
                                                "(0: try the draft on every request)")
    draft_cooldown_max_s: float = Field(default=8.0, ge=0.0, le=600.0,
                                        description="the cooldown doubles while the draft keeps failing, up to this")


class AppArgs(BaseModel):
    """``args`` of the app builder (``serve_configs/*.yaml``) and of ``atspeed-ray serve``."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(description="target model directory (HF format)")
    draft: str | None = Field(default=None, description="draft model directory; None: target-only app")
    data: str | None = Field(default=None, description="prepared data folder (index.json + tokenizer); "
                                                       "default: index.json beside the target model")
    target_only: bool = Field(default=False, description="serve plain target beam search (baseline)")
    device: str = "auto"
    dtype: Dtype = "auto"
    forward: Forward = Field(
        default="fast", description="model forward: 'fast' = compact FastLlama for Llama "
                                    "checkpoints (others keep HF's), 'hf' = the HF model's own")
    gamma: int = Field(default=DEFAULT_GAMMA, ge=0, le=16, description="draft steps per round")
    expand_last: int = Field(
        default=EXPAND_LAST, ge=0, le=100_000,
        description="strict: a round's last drafted step holds every trie child of the step before "
                    "it when there are at most this many per request (0: the draft's top N)")
    draft_beams_factor: Annotated[float, Field(ge=1.0, le=8.0)] | str = Field(
        default=DEFAULT_DRAFT_BEAMS, description="draft width N = ceil(factor * k); auto: N per k measured when the "
                                 "app is built (draft_widths); or any width policy as bench's "
                                 "--draft-beams writes it (20, 2k, or per code position 2k/8k/2k)")
    draft_widths: dict[int, int | str] = Field(
        default_factory=dict,
        description="measured draft width per k: an N, or one per drafted level as a width policy "
                    "text at that k (10/200/20 or 1k/20k/2k; draft_beams_factor auto fills it when "
                    "the app is built; bench/evaluate --draft-beams auto print it); a k not listed "
                    "takes each level's N/k of the nearest k listed. Given, it overrides "
                    "draft_beams_factor")
    max_k: int = Field(default=MAX_K, ge=1, le=MAX_K)
    history_window: int | None = Field(default=None, ge=1, le=MAX_HISTORY,
                                       description="items of the history used (default: the data's history_len)")
    draft_timeout_s: float = Field(default=2.0, gt=0.0, le=600.0,
                                   description="deadline of one draft call; then target-only fallback")
    target_timeout_s: float = Field(default=30.0, gt=0.0, le=600.0)
    retry: RetryConfig = RetryConfig()
    routing: Literal["speculative", "adaptive"] = Field(
        default="speculative",
        description="adaptive: strict requests go to whichever of speculative decoding and plain target "
                    "beam search has been faster lately (same answer either way; see serving/routing.py)")
    probe_every: int = Field(default=PROBE_EVERY, ge=2, le=10_000,
                             description="adaptive routing: at most every n-th request probes the other path "
                                         "(serving/routing.py)")
    probe_backoff: int = Field(default=PROBE_BACKOFF, ge=1, le=1000,
                               description="adaptive routing: while probes keep confirming the faster "
                                           "path, the probe interval doubles up to probe_every * this "
                                           "(1 = always every probe_every-th request)")
    route_start: dict[Load, dict[int, Arm]] = Field(
        default_factory=dict,
        description="adaptive routing: load (alone: no other request in flight; batched) -> k -> "
                    "the path its strict requests start on, with no warm-up (the other is probed "
                    "as usual); a plain {k: path} holds for both loads. draft_beams_factor auto "
                    "fills it when the app is built, from speculation's measured speedup over beam "
                    "search on the example histories, one per call and in batches (a k with no "
                    "clear winner is left out: the warm-up decides)")
    cache: Literal["stateless", "replica"] = Field(
        default="stateless",
        description="stateless: every round resends and recomputes prompt + beams on any replica; "
                    "replica: the rounds of a request go to the same DraftModel / TargetModel "
                    "replicas (AffinityRouter), which keep its tree caches between rounds "
                    "(a miss recomputes: same answer)")
    cache_limits: CacheLimits = CacheLimits()
    graph: Literal["separate", "chained", "colocated"] = Field(
        default="separate",
        description="separate: DraftModel and TargetModel deployments, the ingress drives each "
                    "round (2 handle calls per round); chained: the same deployments, the "
                    "TargetModel drives the loop and calls the draft itself (1 call from the "
                    "ingress + 1 per drafting round); colocated: one SpeculativeModel replica holds "
                    "both models and answers a request in one handle call")
    draft_threads: int | None = Field(default=None, ge=1, le=256)
    target_threads: int | None = Field(default=None, ge=1, le=256)
    draft_batch: BatchSettings = BatchSettings()
    target_batch: BatchSettings = BatchSettings()

    def router_config(self) -> RouterConfig:
        """The adaptive router's settings (the app's ``Routing`` and each ingress replica's own)."""
        return RouterConfig(probe_every=self.probe_every, max_backoff=self.probe_backoff)

    @field_validator("draft_beams_factor")
    @classmethod
    def _width_text(cls, value: float | str) -> float | str:
        if isinstance(value, str):
            WidthPolicy.parse(value, "draft_beams_factor")  # a ValueError names the field
        return value

    @field_validator("route_start", mode="before")
    @classmethod
    def _route_loads(cls, value: object) -> object:
        """A plain ``{k: path}`` (no load named) holds for both loads."""
        if isinstance(value, dict) and value and not set(map(str, value)) & set(LOADS):
            return {load: value for load in LOADS}
        return value

    @field_validator("route_start")
    @classmethod
    def _route_keys(cls, value: dict[Load, dict[int, Arm]]) -> dict[Load, dict[int, Arm]]:
        for load, starts in value.items():
            if any(k < 1 for k in starts):
                raise ValueError(f"route_start: k must be >= 1, got {sorted(starts)} ({load})")
        return value

    @field_validator("draft_widths")
    @classmethod
    def _widths_text(cls, value: dict[int, int | str]) -> dict[int, int | str]:
        for k, w in value.items():
            measured_widths_at(w, k)  # a ValueError names the field
        return value

    @model_validator(mode="after")
    def _draft_needed(self) -> "AppArgs":
        if self.draft is None and not self.target_only:
            raise ValueError("draft is required unless target_only is true")
        return self

    def check_paths(self) -> None:
        """Refuse, in one line, paths the replicas could not start from (before they start)."""
        from atspeed_ray.data.catalog import catalog_source_error
        from atspeed_ray.data.errors import DataError
        from atspeed_ray.data.llm import check_checkpoint

        models = [("target", self.target)] + ([("draft", self.draft)] if self.speculative else [])
        for name, path in models:
            if path is None or not (Path(path) / "config.json").is_file():
                raise ValueError(f"{name} {path}: not a model folder (no config.json)")
        if self.speculative:  # every registered draft kind is served; refuse an unknown one
            from atspeed_ray.drafts import draft_kind

            draft_kind(self.draft)  # type: ignore[arg-type]
        error = catalog_source_error(self.data, self.target)
        if error is not None:
            raise ValueError(error)
        for name, path in models:  # a truncated or foreign weight file: refused here in < 1 s
            try:
                check_checkpoint(path)  # type: ignore[arg-type]
            except DataError as e:
                raise ValueError(f"{name}: {e}") from None

    @property
    def speculative(self) -> bool:
        return not self.target_only and self.draft is not None

    @property
    def width_policy(self) -> WidthPolicy:
        """The draft width policy: ``draft_widths`` when given (measured: auto with them), else
        ``draft_beams_factor``."""
        if self.draft_widths:
            return WidthPolicy().with_measured({k: measured_widths_at(w, k)
                                                for k, w in self.draft_widths.items()})
        if isinstance(self.draft_beams_factor, str):
            return WidthPolicy.parse(self.draft_beams_factor, "draft_beams_factor")
        return WidthPolicy.factor(self.draft_beams_factor)

    @property
    def auto_width(self) -> bool:
        """``draft_beams_factor: auto`` with no ``draft_widths`` yet: the builder measures them."""
        return self.width_policy.auto and not self.draft_widths

    def draft_width(self, k: int) -> int | tuple[int, ...]:
        """The ``SearchParams.draft_beams`` of a top-``k`` request (``WidthPolicy.resolve``)."""
        return self.width_policy.resolve(k)

    def model_settings(self, which: Literal["target", "draft"]) -> ModelSettings:
        draft = which == "draft"
        model = self.draft if draft else self.target
        assert model is not None
        return ModelSettings(
            model=model, data=self.data, catalog_model=self.target, device=self.device, dtype=self.dtype,
            forward=self.forward,
            torch_threads=self.draft_threads if draft else self.target_threads,
            batch=self.draft_batch if draft else self.target_batch,
            cache=self.cache_limits if self.cache == "replica" else None,
        )
