"""How many answers an evaluation job generates at once: `generate.batch_size: auto`.

On a GPU, the largest batch whose key/value cache and temporaries fit half
the device's free memory (all 500 test prompts at once on an H200); on a CPU
a fixed batch, where a larger one gains nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from lorastudy.backbones import sizes
from lorastudy.tokens import round_up

# On a CPU, "auto" answers this many prompts at a time: larger batches buy little there.
CPU_BATCH_SIZE = 16


def resolve_batch_size(batch_size: int | str, backbone, prompt_ids: Sequence[list[int]], max_new_tokens: int, pad_multiple: int) -> int:
    """`generate.batch_size`, with "auto" resolved for this device (see `auto_batch_size`)."""
    if batch_size != "auto":
        return int(batch_size)
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return min(CPU_BATCH_SIZE, len(prompt_ids))
    width = answer_width(max(len(row) for row in prompt_ids), max_new_tokens, pad_multiple)
    free = stats["bytes_limit"] - stats["bytes_in_use"]
    return auto_batch_size(len(prompt_ids), row_bytes(backbone, width), free)


def answer_width(longest_prompt: int, max_new_tokens: int, pad_multiple: int) -> int:
    """A batch's width: its longest prompt and the new tokens, rounded up to `pad_multiple`.

    KerasHub's generation loop decodes from the batch's shortest prompt to
    the end of this width, so the rounding costs a decode step for every row.
    """
    return round_up(longest_prompt + max_new_tokens, pad_multiple)


def answer_batches(prompt_ids: Sequence[list[int]], batch_size: int, max_new_tokens: int, pad_multiple: int) -> list[tuple[list[int], int]]:
    """The batches an evaluation answers, longest prompts first: each batch's prompt indices and its width."""
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    return [(batch, answer_width(max(len(prompt_ids[i]) for i in batch), max_new_tokens, pad_multiple)) for batch in batches]


def row_bytes(backbone, width: int) -> int:
    """Device memory one answer of `width` tokens takes while generating, with room to spare.

    Counted: its key/value cache; the prefill's attention scores of one layer
    and a few hidden-state buffers; a step's logits. Doubled, for XLA's
    temporaries that are not counted.
    """
    b = sizes(backbone)
    item = 2 if "16" in backbone.dtype_policy.compute_dtype else 4
    cache = b.layers * 2 * width * b.key_value_heads * b.head_dim * item
    prefill = b.query_heads * width * width * 4 + 4 * width * b.hidden * 4
    logits = 2 * b.vocabulary * 4
    return 2 * (cache + prefill + logits)


def auto_batch_size(prompts: int, per_row: int, free: int, multiple: int = 1) -> int:
    """The batch for `prompts` answers when each takes `per_row` bytes and `free` bytes are free.

    Every prompt at once if half of the free memory holds them; else as few
    batches as fit, of equal size (so the last is not mostly filler), each a
    multiple of `multiple` (the data-parallel devices).
    """
    fit = max(multiple, int(0.5 * free // per_row) // multiple * multiple)
    batches = -(-prompts // fit)
    return min(fit, round_up(-(-prompts // batches), multiple))
