"""Generation's first pass over the prompts only, not over the answers to come.

KerasHub's `generate_step` seeds its key/value cache with one forward pass
over the batch's whole width: the prompts, and the positions of every token
still to be generated, whose keys and values the decoding loop writes again
before any query reads them. With 64 new tokens after prompts of 11-50
tokens that pass is two to five times the prompts' own work: on the main
job's evaluations (Gemma 3 270M, batches of 25, 2 CPU cores) 9,400
positions where the prompts' region holds 3,000, and an evaluation takes
0.86x the time without them (benchmarks/results/generate_width.csv).

`prefill_prompts_only` narrows that pass to the batch's prompt region, its
width less the new tokens (`answer_batch.answer_width` rounds the longest
prompt's end up, so the region holds every prompt). The cache keeps its
full width: the pass writes positions [0, region) in place, as a decoding
step writes its one, and its queries see the keys they saw in the whole
pass, under the same masks; the padding in the region is written again by
the loop, as it was. Answers do not change (tests/test_generate.py, and
tests/test_architectures.py for Gemma 2, 3, 3n and 4).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

from keras import ops

# Arguments of `call_with_cache` that a text-only prefill may set; any other
# (images, audio) left set means a multimodal prompt, whose pass stays whole.
_TEXT_ONLY = ("token_ids", "cache", "cache_update_index", "padding_mask", "cache_update_mask")


@contextmanager
def prefill_prompts_only(causal_lm, new_tokens: int) -> Iterator[None]:
    """While tracing generation within, `causal_lm`'s cache-seeding pass covers each batch's width less `new_tokens`."""
    original = causal_lm.call_with_cache
    signature = inspect.signature(original)

    def call_with_cache(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        width = bound.arguments["token_ids"].shape[1]
        region = width - new_tokens
        if not _is_prefill(bound.arguments) or not 0 < region < width:
            return original(*args, **kwargs)
        # The padding mask keeps its width: it masks keys, and the cache is as wide as ever.
        bound.arguments["token_ids"] = bound.arguments["token_ids"][:, :region]
        logits, hidden, cache = original(*bound.args, **bound.kwargs)
        return _widen(logits, width), _widen(hidden, width), cache

    shadowed = causal_lm.__dict__.get("call_with_cache")
    causal_lm.call_with_cache = call_with_cache
    try:
        yield
    finally:
        if shadowed is None:
            del causal_lm.call_with_cache
        else:
            causal_lm.call_with_cache = shadowed


def _is_prefill(arguments: dict) -> bool:
    """The pass that seeds the cache: from position 0 (a Python int; decoding steps pass a traced index), text only."""
    index = arguments["cache_update_index"]
    text_only = all(value is None for name, value in arguments.items() if name not in _TEXT_ONLY)
    return isinstance(index, int) and index == 0 and text_only


def _widen(x, width: int):
    """[batch, region, ...] zero-padded to [batch, width, ...]: the shapes KerasHub's sampler expects."""
    return ops.pad(x, [(0, 0), (0, width - x.shape[1])] + [(0, 0)] * (len(x.shape) - 2))
