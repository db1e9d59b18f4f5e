"""Prompt templates: the text around a user's history in the prompt of a pretrained LLM.

A prompt is ``[bos] before <history> after``, where ``<history>`` is every item's code tokens
followed by the item separator (``<a_3><b_7><c_1><d_9><sep>`` per item, oldest first) and the
model then generates the next item's code tokens. ``before`` and ``after`` are tokenized once
with the base model's tokenizer, each on its own, and the code and separator ids are put between
them, so every code token is exactly one id whatever the tokenizer would do with the text.

* ``history``: no text at all, the items only (the only template of the word-level tokenizer).
  The default: every prompt token costs on every target and draft pass (the history alone is
  about 100 tokens for 20 items of 4 codes), and a fixed instruction carries no information that
  fine-tuning on the next-item task does not already give.
* ``instruction``: an instruction / response layout in the style of LC-Rec (which fine-tunes
  LLaMA on such prompts); words the pretrained model has seen can help it start.
* ``chat``: the same request as a user message in the base model's own chat template (its
  default system prompt included), the answer being the assistant's turn; for instruction-tuned
  models such as SmolLM2-135M-Instruct.

This module imports nothing heavy, so the CLI lists the choices without loading transformers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    before: str = ""  # text before the first item
    after: str = ""  # text after the last item's separator
    chat: bool = False  # wrap ``before <history> after`` in the tokenizer's chat template

    @property
    def has_text(self) -> bool:
        return bool(self.before or self.after or self.chat)


INSTRUCTION_BEFORE = ("### Instruction:\nHere is a user's interaction history, oldest item first. "
                      "Predict the item the user will interact with next.\n\n### History:\n")
INSTRUCTION_AFTER = "\n\n### Response:\n"
CHAT_BEFORE = ("Here is a user's interaction history, oldest item first. Predict the item the "
               "user will interact with next.\n\nHistory: ")

PROMPT_TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        PromptTemplate("history"),
        PromptTemplate("instruction", INSTRUCTION_BEFORE, INSTRUCTION_AFTER),
        PromptTemplate("chat", CHAT_BEFORE, chat=True),
    )
}
TEMPLATE_NAMES: tuple[str, ...] = tuple(PROMPT_TEMPLATES)
DEFAULT_TEMPLATE = "history"


def get_template(name: str) -> PromptTemplate:
    if name not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}")
    return PROMPT_TEMPLATES[name]
