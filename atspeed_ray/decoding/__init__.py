"""The decoding core: trie-constrained beam search and speculative beam search. Pure torch.

Its two contracts: ``Decoder`` (a model's forward over tree nodes: ``FastLlama``, or any HF
causal LM through ``HFDecoder``) and ``Drafter`` (a round's proposals: ``LMDrafter`` for every
causal-LM draft; other kinds in ``atspeed_ray.drafts``)."""

from atspeed_ray.decoding.beam import DecodeResult, beam_search
from atspeed_ray.decoding.decoder import Decoder, HFDecoder, as_decoder
from atspeed_ray.decoding.drafting import Drafter, LMDrafter, as_drafter
from atspeed_ray.decoding.search import SearchParams
from atspeed_ray.decoding.speculative import speculative_beam_search, speculative_search

__all__ = ["DecodeResult", "Decoder", "Drafter", "HFDecoder", "LMDrafter", "SearchParams",
           "as_decoder", "as_drafter", "beam_search", "speculative_beam_search",
           "speculative_search"]
