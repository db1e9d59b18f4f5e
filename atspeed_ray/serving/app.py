"""App builders for ``serve run`` / ``serve deploy`` configs and for ``serve.run`` in Python.

``import_path: atspeed_ray.serving.app:build_app`` with ``args`` = ``AppArgs`` fields::

    args:
      target: runs/beauty/target     # HF model dirs (what the training commands export)
      draft: runs/beauty/draft       # omit (or target_only: true) for the target-only baseline
      data: data/beauty-prepared     # prepared folder: index.json + tokenizer (+ history_len)

``build_target_only_app`` is the baseline: the same ingress and TargetModel, no DraftModel.
Deployment sizes and autoscaling are in the YAML ``deployments:`` overrides.
"""

from typing import Any

from ray.serve import Application

from atspeed_ray.serving.config import AppArgs
from atspeed_ray.serving.deployments import DraftModel, Recommender, TargetModel


def build(args: AppArgs, options: dict[str, dict[str, Any]] | None = None) -> Application:
    """The app graph; ``options`` = per-deployment ``.options(...)`` overrides, by deployment name
    (what a YAML ``deployments:`` list does), e.g. ``{"DraftModel": {"num_replicas": 2}}``."""
    args.check_paths()  # a bad path: one line now, not a replica traceback per retry
    opts = options or {}

    def dep(d: Any) -> Any:
        return d.options(**opts[d.name]) if d.name in opts else d

    target = dep(TargetModel).bind(args.model_settings("target").model_dump())
    draft = dep(DraftModel).bind(args.model_settings("draft").model_dump()) if args.speculative else None
    return dep(Recommender).bind(args.model_dump(), target, draft)


def build_app(args: dict[str, Any]) -> Application:
    """Speculative app (or the baseline with ``target_only: true``)."""
    return build(AppArgs.model_validate(args))


def build_target_only_app(args: dict[str, Any]) -> Application:
    """Target-only baseline: plain target beam search behind the same HTTP API."""
    return build(AppArgs.model_validate({**args, "target_only": True}))
