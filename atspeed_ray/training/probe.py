"""The probe: one validation batch and the trained module's logits on it, saved with the export
(the ``save_probe`` testing hook) so a test can check that the exported HF model reproduces
them (the tests' ``load_probe`` reads it back).
"""

from __future__ import annotations

from pathlib import Path

import torch

from atspeed_ray.training.core import Batch, forward_branches

PROBE = "probe.safetensors"

# the Batch tensors a probe stores (``visible`` is stored as uint8: safetensors has no bool)
FIELDS = ("input_ids", "position_ids", "query", "qmap", "codes", "branch_valid", "nodes")


def save_probe(model: torch.nn.Module, batch: Batch, path: Path) -> None:
    """The probe batch and the trained module's logits on it (checks the export)."""
    from safetensors.torch import save_file

    with torch.no_grad():
        logits = forward_branches(model, batch).float().cpu()
    tensors = {k: getattr(batch, k).cpu().contiguous() for k in FIELDS}
    tensors["visible"] = batch.visible.to(torch.uint8).cpu().contiguous()
    tensors["logits"] = logits.contiguous()
    save_file(tensors, str(path))
