"""The prompt template that training and generation share.

A record becomes `template.format(instruction=..., response=...)`. Everything
before `{response}` is the prompt, which is what the model sees at generation
time and what the loss mask hides in training. Text after `{response}` (the
chat format's `<end_of_turn>`) closes the response: it is trained on, and
generation stops at it. Keeping both uses on one object is what makes the
two agree.

Two formats (`prompt.format`):
- `plain`: the Dolly instruction/response template of the KerasHub Gemma LoRA
  tutorial, for pretrained checkpoints;
- `chat`: Gemma's chat turns, which its instruction-tuned checkpoints
  (`gemma2_instruct_2b_en`, `gemma3_instruct_1b`, ...) were trained on.
  Gemma 4 marks turns with its own tokens (`<|turn>` ... `<turn|>`), so
  the chat template depends on the model (`template_for`).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

DEFAULT_TEMPLATE = "Instruction:\n{instruction}\n\nResponse:\n{response}"
# The tokens that open and close a chat turn: Gemma 1 to 3 and 3n share one pair; Gemma 4 has its own.
CHAT_TURNS = {"gemma": ("<start_of_turn>", "<end_of_turn>"), "gemma4": ("<|turn>", "<turn|>")}
_CHAT = "{start}user\n{{instruction}}{end}\n{start}model\n{{response}}{end}"
CHAT_TEMPLATE = _CHAT.format(start=CHAT_TURNS["gemma"][0], end=CHAT_TURNS["gemma"][1])
TEMPLATES = {"plain": DEFAULT_TEMPLATE, "chat": CHAT_TEMPLATE}


def chat_turns(architecture: str) -> tuple[str, str]:
    """The (open, close) tokens of a chat turn for a KerasHub architecture (`gemma`, ..., `gemma4`)."""
    return CHAT_TURNS["gemma4" if architecture == "gemma4" else "gemma"]


def template_for(prompt_format: str, architecture: str = "gemma") -> str:
    """The template of `prompt_format` (plain or chat) for a model of `architecture`."""
    if prompt_format == "chat":
        start, end = chat_turns(architecture)
        return _CHAT.format(start=start, end=end)
    return TEMPLATES[prompt_format]
# How `filter_context` folds a record's context into its instruction in
# `include` mode, so that one template serves both modes.
DEFAULT_CONTEXT_TEMPLATE = "{instruction}\n\nContext:\n{context}"


def _fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


@dataclass(frozen=True)
class PromptTemplate:
    """Turns (instruction, response) into the text a causal LM trains on.

    Args:
        template: a `str.format` template with the fields `{instruction}` and
            `{response}`; text after `{response}` closes the response.

    Examples:
    >>> t = PromptTemplate()
    >>> t.prompt("Name a colour.")
    'Instruction:\\nName a colour.\\n\\nResponse:\\n'
    >>> t.prompt("Name a colour.") + "Blue." == t.text("Name a colour.", "Blue.")
    True
    >>> PromptTemplate(CHAT_TEMPLATE).end
    '<end_of_turn>'
    """

    template: str = DEFAULT_TEMPLATE

    def __post_init__(self) -> None:
        fields = _fields(self.template)
        if sorted(fields) != ["instruction", "response"]:
            raise ValueError(
                f"prompt.template must use exactly the fields {{instruction}} and {{response}} "
                f"once each; it uses {fields}"
            )
        if "{instruction}" in self._parts()[1]:
            raise ValueError(
                "prompt.template must put {instruction} before {response}: the text before "
                "{response} is the prompt that generation continues"
            )

    def _parts(self) -> tuple[str, str]:
        before, after = self.template.split("{response}", 1)
        return before, after

    @property
    def end(self) -> str:
        """The text that closes a response ('' when the template ends with {response})."""
        return self._parts()[1].format()

    def prompt(self, instruction: str) -> str:
        """The text up to where the response begins."""
        return self._parts()[0].format(instruction=instruction)

    def text(self, instruction: str, response: str) -> str:
        """The whole training text: prompt, response and the text that closes it."""
        return self.prompt(instruction) + response + self.end


def fold_context(instruction: str, context: str, context_template: str = DEFAULT_CONTEXT_TEMPLATE) -> str:
    """Fold a non-empty context into the instruction (`include` mode)."""
    if not context.strip():
        return instruction
    return context_template.format(instruction=instruction, context=context)
