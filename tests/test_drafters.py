"""The drafter contract: a new draft kind is one file and one registry line.

This file is such a kind: ``FirstChildren`` proposes, at every drafted step, the first N trie
children of the step before (no model at all), registered under its own name and loaded from a
checkpoint folder whose config names it. Strict speculation must return exactly the target's
beam search through it, over the same grid every draft runs.
"""

from __future__ import annotations

import json

import pytest
import torch

from atspeed_ray.data.errors import DataError
from atspeed_ray.data.index import ItemIndex
from atspeed_ray.decoding import beam_search
from atspeed_ray.decoding.beam import Beams
from atspeed_ray.decoding.cache import TreeCache
from atspeed_ray.decoding.drafting import (
    Drafter, DraftStep, LMDrafter, ProposeCall, as_drafter, children_step,
)
from atspeed_ray.drafts import (
    DRAFT_KIND_KEY, DRAFT_KINDS, DraftKind, draft_kind, kind_name, load_drafter, register,
)
from atspeed_ray.models import CODE_HEAD_KEY, COMPACT_VOCAB_KEY, DeviceConfig
from tests.helpers import (
    STRICT_GRID, assert_same_as_beam_search, random_catalog, random_model, random_prompts,
    strict_runs, vocab_size,
)


class FirstChildren:
    """A ``Drafter`` without a model: step j holds the first N trie children of step j - 1."""

    def __init__(self, device: torch.device):
        self._device = device

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def wants_features(self) -> bool:
        return False

    def propose(self, call: ProposeCall, index: ItemIndex, cache: TreeCache | None
                ) -> tuple[list[DraftStep], Beams, TreeCache | None]:
        L, N = index.L, call.params.N
        steps, parents = [], call.beams
        for j in range(1, int(call.g.max()) + 1):
            depth = (call.t + j - 1).clamp(max=L - 1)
            step = children_step(parents, depth, index, N)
            child = parents.extend(step, depth)
            valid = torch.isfinite(step.score) & (j <= call.g)[:, None]
            steps.append(DraftStep(child, step.parent, valid, None, None))
            parents = child
        return steps, call.beams, cache


FIRST_CHILDREN = register(DraftKind("test-first-children",
                                    lambda path, device: FirstChildren(device.torch_device()),
                                    "the trie's first N children (a test kind)",
                                    lambda prepared, path: None))


@pytest.fixture(scope="module")
def setup():
    codebook = [6, 6, 6, 6]
    index = random_catalog(600, codebook, seed=0)
    V = vocab_size(codebook)
    return index, random_model(V, seed=1), random_prompts(3, V, seed=2)


@pytest.mark.parametrize("k,n_mult,gamma", STRICT_GRID)
def test_a_registered_kind_runs_the_strict_grid(tmp_path_factory, setup, k, n_mult, gamma):
    index, target, prompts = setup
    folder = tmp_path_factory.mktemp("draft")
    (folder / "config.json").write_text(json.dumps({DRAFT_KIND_KEY: FIRST_CHILDREN.name}))
    drafter = load_drafter(folder, DeviceConfig(device="cpu"))
    assert isinstance(drafter, FirstChildren) and isinstance(drafter, Drafter)
    for batch in (prompts[:1], prompts):
        ref = beam_search(target, batch, index, k)
        for _, out in strict_runs(target, drafter, batch, index, k, k * n_mult, gamma):
            assert_same_as_beam_search(out, ref)


def test_kinds_are_read_from_the_config_and_older_exports_still_load(tmp_path):
    assert {"lm", "code-head", "compact-vocab", FIRST_CHILDREN.name} <= set(DRAFT_KINDS)
    assert kind_name({}) == "lm"  # exports before draft_kind: by the keys they carry
    assert kind_name({CODE_HEAD_KEY: [3, 4]}) == "code-head"
    assert kind_name({COMPACT_VOCAB_KEY: {"token_ids": [-1], "full_vocab_size": 4}}) == "compact-vocab"
    assert kind_name({DRAFT_KIND_KEY: "lm", CODE_HEAD_KEY: [3]}) == "lm"  # the key decides
    (tmp_path / "config.json").write_text(json.dumps({DRAFT_KIND_KEY: "nope"}))
    with pytest.raises(ValueError, match="config.json: unknown draft_kind 'nope'; known: "):
        draft_kind(tmp_path)
    (tmp_path / "config.json").write_text("{\n  bad")
    with pytest.raises(ValueError, match=r"config.json:2: "):
        draft_kind(tmp_path)
    with pytest.raises(DataError, match="no config.json"):  # the project's bad-input error
        draft_kind(tmp_path / "missing")
    with pytest.raises(ValueError, match="registered already"):
        register(DraftKind("lm", FIRST_CHILDREN.load, "another lm", FIRST_CHILDREN.fits))


def test_a_causal_lm_is_an_lm_drafter(setup):
    index, target, _ = setup
    drafter = as_drafter(target)
    assert isinstance(drafter, LMDrafter) and drafter.model is target
    assert not drafter.wants_features and drafter.device == torch.device("cpu")
    assert as_drafter(drafter) is drafter
