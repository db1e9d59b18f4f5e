"""The decoding core: trie-constrained beam search and speculative beam search. Pure torch."""

from atspeed_ray.decoding.beam import DecodeResult, beam_search
from atspeed_ray.decoding.search import SearchParams
from atspeed_ray.decoding.speculative import speculative_beam_search, speculative_search

__all__ = ["DecodeResult", "SearchParams", "beam_search", "speculative_beam_search",
           "speculative_search"]
