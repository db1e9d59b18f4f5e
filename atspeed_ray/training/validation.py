"""Per-epoch decoding metrics on the validation prompts of a run (rank 0, full model copy).

* align: ``val_accept`` = mean accepted drafted steps per round of speculative beam search
  (``speculative_beam_search(target, draft, mode=val_mode)``, K = ``val_k``, N =
  ``val_draft_beams``, gamma = ``val_gamma``) over the first ``val_samples`` validation prompts:
  sum of accepted steps / sum of rounds. 0 = the draft never helps; gamma = every round accepts
  all drafted steps. Higher is faster. ``val_target_calls`` = mean target forwards per request
  (plain beam search needs L). With ``val_mode`` relaxed also ``val_recall`` (relaxed SD) and
  ``val_target_recall`` (the target's own beam search). A feature draft also reports the widths
  its codes need (``val_code{d}_{first,unrolled}_width_median``, ``training.feature``).
* target: ``val_recall@K`` and ``val_ndcg@K`` of the target's beam search on the same prompts.
"""

from __future__ import annotations

import numpy as np
import torch

from atspeed_ray.training.setup import Setup


@torch.no_grad()
def validate_model(s: Setup, model: torch.nn.Module) -> dict[str, float]:
    """Cheap per-epoch decoding metrics on ``s.val`` with a full (unsharded) copy of the model."""
    cfg = s.cfg
    if len(s.val) == 0:
        return {}
    model.eval()
    if cfg.task == "align":
        return _align_metrics(s, model)
    from atspeed_ray.metrics import evaluate_rankings

    items = beam_search_items(model, s, cfg.val_k)
    m = evaluate_rankings(items, val_targets(s), ks=(cfg.val_k,))
    return {f"val_{k}": v for k, v in m.items()}


def _align_metrics(s: Setup, draft: torch.nn.Module) -> dict[str, float]:
    from atspeed_ray.decoding import speculative_beam_search

    cfg = s.cfg
    drafter = draft
    if s.trees is not None:  # a feature draft
        from atspeed_ray.drafts.feature import FeatureDrafter

        drafter = FeatureDrafter(draft)  # type: ignore[arg-type]
    res = speculative_beam_search(s.target, drafter, s.val.prompts, s.prepared.index, cfg.val_k,
                                  draft_beams=cfg.val_draft_beams, gamma=cfg.val_gamma,
                                  mode=cfg.val_mode, seed=cfg.seed)
    acc, rounds = sum(res.stats["accepted_steps"]), sum(res.stats["rounds"])
    out = {"val_accept": acc / max(rounds, 1),
           "val_target_calls": float(np.mean(res.stats["target_calls"]))}
    if s.trees is not None:
        out.update(feature_widths(s, draft))
    if cfg.val_mode == "relaxed":
        out["val_recall"] = val_recall(s, res.items)
        if s.val_target_recall is None:
            s.val_target_recall = val_recall(s, beam_search_items(s.target, s, cfg.val_k))
        out["val_target_recall"] = s.val_target_recall
    return out


def feature_widths(s: Setup, draft: torch.nn.Module) -> dict[str, float]:
    """A feature draft: ``val_code{d}_{first,unrolled}_width_median``, the draft width whose top
    N hold the target's top K (of its trees, ``s.teacher_k``) on the validation prompts."""
    from atspeed_ray.training.feature import width_medians

    step, n = s.cfg.micro_batch, len(s.val)
    trees = [s.batch(s.val, np.arange(i, min(i + step, n))) for i in range(0, n, step)]
    widths = width_medians(draft, trees, s.prepared.index.to(s.device),  # type: ignore[arg-type]
                           s.teacher_k)
    return {f"val_{name}": v for name, v in widths.items()}


def val_targets(s: Setup) -> list[list[int]]:
    index = s.prepared.index
    targets = [index.canonical(t).tolist() for t in s.prepared.targets("valid")]
    return [targets[r] for r in s.val.rows.tolist()]


def beam_search_items(model: torch.nn.Module, s: Setup, k: int) -> list[list[int]]:
    from atspeed_ray.decoding import beam_search

    prompts, items = s.val.prompts, []
    for i in range(0, len(prompts), 64):
        items += beam_search(model, prompts[i:i + 64], s.prepared.index, k).items
    return items


def val_recall(s: Setup, items: list[list[int]]) -> float:
    from atspeed_ray.metrics import recall_at_k

    return recall_at_k(items, val_targets(s), s.cfg.val_k)
