import pytest

from lorastudy.prompts import CHAT_TEMPLATE, DEFAULT_TEMPLATE, PromptTemplate, fold_context


def test_default_template_is_the_kerashub_tutorials():
    t = PromptTemplate()
    assert t.template == DEFAULT_TEMPLATE
    assert t.text("Name a colour.", "Blue.") == "Instruction:\nName a colour.\n\nResponse:\nBlue."


def test_prompt_is_a_prefix_of_the_training_text():
    t = PromptTemplate("Q: {instruction}\nA: {response}")
    assert t.prompt("Why {braces}?") == "Q: Why {braces}?\nA: "
    assert t.text("x", "y").startswith(t.prompt("x"))


def test_chat_format_is_gemmas_turns_closed_by_end_of_turn():
    t = PromptTemplate(CHAT_TEMPLATE)
    assert t.prompt("Name a colour.") == "<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n"
    assert t.text("Name a colour.", "Blue.") == t.prompt("Name a colour.") + "Blue.<end_of_turn>"
    assert t.end == "<end_of_turn>" and PromptTemplate().end == ""


@pytest.mark.parametrize(
    "template, message",
    [
        ("{response} {instruction}", "must put {instruction} before {response}"),
        ("{response}", "exactly the fields"),
        ("{instruction} {context} {response}", "exactly the fields"),
    ],
)
def test_bad_templates_are_refused(template, message):
    with pytest.raises(ValueError, match=message):
        PromptTemplate(template)


def test_fold_context_only_when_present():
    assert fold_context("Summarise.", "") == "Summarise."
    assert fold_context("Summarise.", "Long text.") == "Summarise.\n\nContext:\nLong text."
