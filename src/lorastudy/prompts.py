"""The prompt template that training and generation share.

A record becomes `template.format(instruction=..., response=...)`. The template
must end with `{response}`: everything before it is the prompt, which is what
the model sees at generation time and what the loss mask hides in training.
Keeping both uses on one object is what makes the two agree.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

DEFAULT_TEMPLATE = "Instruction:\n{instruction}\n\nResponse:\n{response}"
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
            `{response}`, ending with `{response}`.

    Examples:
    >>> t = PromptTemplate()
    >>> t.prompt("Name a colour.")
    'Instruction:\\nName a colour.\\n\\nResponse:\\n'
    >>> t.prompt("Name a colour.") + "Blue." == t.text("Name a colour.", "Blue.")
    True
    """

    template: str = DEFAULT_TEMPLATE

    def __post_init__(self) -> None:
        fields = _fields(self.template)
        if sorted(fields) != ["instruction", "response"]:
            raise ValueError(
                f"prompt.template must use exactly the fields {{instruction}} and {{response}} "
                f"once each; it uses {fields}"
            )
        if not self.template.endswith("{response}"):
            raise ValueError(
                "prompt.template must end with {response}: the text before it is the prompt "
                "that generation continues"
            )

    def prompt(self, instruction: str) -> str:
        """The text up to where the response begins."""
        return self.template[: -len("{response}")].format(instruction=instruction)

    def text(self, instruction: str, response: str) -> str:
        """The whole training text: prompt followed by response."""
        return self.prompt(instruction) + response


def fold_context(instruction: str, context: str, context_template: str = DEFAULT_CONTEXT_TEMPLATE) -> str:
    """Fold a non-empty context into the instruction (`include` mode)."""
    if not context.strip():
        return instruction
    return context_template.format(instruction=instruction, context=context)
