"""Features through the loop: for a drafter that reads the target's hidden states, every beam it
is given carries the target's last-layer hidden state where the target chose its last token,
through acceptance, compaction and finished requests leaving the batch; and they equal the
hidden states of a plain forward over the beam's path."""

from __future__ import annotations

import pytest
import torch

from atspeed_ray.data.index import ItemIndex
from atspeed_ray.decoding import beam_search
from atspeed_ray.decoding.beam import Beams
from atspeed_ray.decoding.cache import TreeCache
from atspeed_ray.decoding.drafting import DraftStep, LMDrafter, ProposeCall
from atspeed_ray.decoding.fast_llama import fast_forward
from atspeed_ray.decoding.search import SearchParams
from atspeed_ray.decoding.speculative import speculative_search
from tests.helpers import (
    assert_same_as_beam_search, random_catalog, random_model, random_prompts, vocab_size,
)


class RecordingDrafter:
    """An LM drafter that asks for features and records what each call brings."""

    def __init__(self, model: torch.nn.Module):
        self.lm = LMDrafter(model)
        self.calls: list[tuple[Beams, torch.Tensor, list[list[int]]]] = []

    @property
    def device(self) -> torch.device:
        return self.lm.device

    @property
    def wants_features(self) -> bool:
        return True

    def propose(self, call: ProposeCall, index: ItemIndex, cache: TreeCache | None
                ) -> tuple[list[DraftStep], Beams, TreeCache | None]:
        self.calls.append((call.beams, call.t, call.prompts))
        return self.lm.propose(call, index, cache)


def plain_hidden(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """The HF model's last-layer hidden state (after the final norm) at the end of ``ids``: [E]."""
    out = model.base_model(input_ids=torch.tensor([ids]))
    return out.last_hidden_state[0, -1]


@pytest.mark.parametrize("forward", ["hf", "fast"])
@pytest.mark.parametrize("k,n,gamma,keep_cache", [(1, 1, 1, True), (3, 6, 2, True),
                                                  (5, 5, 3, True), (5, 10, 3, False)])
def test_features_are_the_targets_hidden_state_where_it_chose_the_last_token(forward, k, n, gamma,
                                                                            keep_cache):
    codebook = [6, 6, 6, 6]
    index = random_catalog(600, codebook, seed=0)
    V = vocab_size(codebook)
    hf_target = random_model(V, seed=1).double()
    hf_draft = random_model(V, seed=7, hidden=16, layers=1).double()
    prompts = random_prompts(4, V, seed=2)
    target = fast_forward(hf_target) if forward == "fast" else hf_target
    draft = fast_forward(hf_draft) if forward == "fast" else hf_draft
    drafter = RecordingDrafter(draft)
    out = speculative_search(target, drafter, prompts, index, SearchParams(k, n, gamma),
                             keep_cache=keep_cache)
    assert_same_as_beam_search(out, beam_search(target, prompts, index, k))
    assert drafter.calls, "the drafter must have been asked"
    checked = 0
    for beams, t, call_prompts in drafter.calls:
        assert beams.features is not None and (t >= 1).all()  # round 1 is the target's prefill
        for b, prompt in enumerate(call_prompts):
            for m in range(beams.tokens.shape[1]):
                if not torch.isfinite(beams.scores[b, m]):
                    continue
                path = beams.tokens[b, m, : int(t[b]) - 1].tolist()  # all but the last token
                torch.testing.assert_close(beams.features[b, m], plain_hidden(hf_target, prompt + path),
                                           rtol=1e-9, atol=1e-9)
                checked += 1
    assert checked > 0


def test_an_lm_drafter_asks_for_nothing():
    codebook = [6, 6, 6, 6]
    index = random_catalog(300, codebook, seed=0)
    V = vocab_size(codebook)
    target = random_model(V, seed=1)
    seen: list[Beams] = []

    class Spy(LMDrafter):
        def propose(self, call, index, cache):
            seen.append(call.beams)
            return super().propose(call, index, cache)

    speculative_search(target, Spy(random_model(V, seed=3)), random_prompts(2, V, seed=2), index,
                       SearchParams(3, 6, 3))
    assert seen and all(b.features is None for b in seen)
