"""Data: item index and trie, tokenizers, release loader, synthetic generator, prepared Parquet."""

from atspeed_ray.data.errors import DataError
from atspeed_ray.data.index import ItemIndex
from atspeed_ray.data.tokenizer import PromptFormat, add_code_tokens, build_tokenizer, code_token

__all__ = ["DataError", "ItemIndex", "PromptFormat", "add_code_tokens", "build_tokenizer", "code_token"]
