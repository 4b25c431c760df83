"""One job across several devices, through `keras.distribution`.

The devices a job sees (its GPUs, as `lorastudy.gpus` or SLURM pinned them;
on a CPU, XLA's host devices) form a mesh of `batch` × `model` axes:

- data parallelism (`model_parallel: 1`): every device holds the whole model
  and a slice of each batch; Keras shards the batches and XLA adds the
  gradient all-reduce (`keras.distribution.DataParallel`);
- model parallelism (`model_parallel: k`): each weight is split over k
  devices by KerasHub's Gemma layout map (`GemmaBackbone.get_layout_map`),
  for a model that does not fit one device (`keras.distribution.ModelParallel`).
  The map names weights by their paths, which Gemma 1 to 4 share; Gemma 3n's
  plain Dense kernels are added in the same pattern.

Nothing here is hand-written parallelism: XLA's SPMD partitioner does the
work from the layouts.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from lorastudy.internals import distribute_data_input

log = logging.getLogger(__name__)

BATCH, MODEL = "batch", "model"


class DistributionError(ValueError):
    """The devices asked for do not fit the job's devices or its batch."""


def job_distribution(
    devices: int | str = "all", model_parallel: int = 1, batch_size: int | None = None, heads: tuple[int, int] | None = None
):
    """The `keras.distribution` for `devices` of this job's devices, or None for one device.

    Args:
        devices: how many of the job's devices to use, or "all".
        model_parallel: how many devices split each weight (the mesh's
            `model` axis); the rest of the devices split the batch.
        batch_size: checked to divide evenly over the `batch` axis.
        heads: the model's (query heads, key/value heads), for the layout map.
    """
    import keras

    available = keras.distribution.list_devices()
    n = len(available) if devices == "all" else int(devices)
    if n > len(available):
        raise DistributionError(f"devices: {n} asked for, but the job has {len(available)} ({', '.join(available)})")
    if n % model_parallel:
        raise DistributionError(f"model_parallel ({model_parallel}) must divide the devices used ({n})")
    data_parallel = n // model_parallel
    if batch_size is not None and batch_size % data_parallel:
        raise DistributionError(f"batch_size ({batch_size}) must be a multiple of the data-parallel devices ({data_parallel})")
    if n == 1:
        return None
    if devices == "all" and model_parallel == 1:
        log.info("devices: all %d of the job's devices; set train/generate devices: 1 for one", n)
    chosen = available[:n]
    if model_parallel == 1:
        return keras.distribution.DataParallel(devices=chosen)
    mesh = keras.distribution.DeviceMesh((data_parallel, model_parallel), (BATCH, MODEL), chosen)
    return keras.distribution.ModelParallel(layout_map=gemma_layout_map(mesh, heads), batch_dim_name=BATCH)


def gemma_layout_map(mesh, heads: tuple[int, int] | None = None):
    """KerasHub's Gemma layout map, with attention heads split only where they divide evenly.

    KerasHub splits the query, key and value kernels along their heads axis.
    Gemma 2B and Gemma 3 1B have a single key/value head (multi-query
    attention), which cannot be split: those kernels are split along the
    hidden axis instead, as the map does for the feed-forward kernels.
    `heads`: the backbone's (query heads, key/value heads).
    """
    import keras
    import keras_hub

    kerashub = keras_hub.models.GemmaBackbone.get_layout_map(mesh, model_parallel_dim_name=MODEL, data_parallel_dim_name=BATCH)
    ways = mesh.shape[mesh.axis_names.index(MODEL)]
    by_heads = lambda n: (MODEL, BATCH, None) if n % ways == 0 else (None, MODEL, None)  # noqa: E731
    layout_map = keras.distribution.LayoutMap(mesh)
    for key in kerashub:
        if "(query|key|value)" in key and heads is not None:
            layout_map[key.replace("(query|key|value)", "query")] = by_heads(heads[0])
            layout_map[key.replace("(query|key|value)", "(key|value)")] = by_heads(heads[1])
        else:
            layout_map[key] = kerashub[key].axes
    # Gemma 3n's paths (text_model/...), which none of the keys above match: its
    # embeddings as Gemma's, its Dense kernels [in, out] split as Gemma's feed-forward.
    layout_map["text_model/embed_tokens.*embeddings"] = (MODEL, BATCH)
    layout_map["text_model/decoder_block.*(q_proj|k_proj|v_proj|gate_proj|up_proj).kernel"] = (BATCH, MODEL)
    layout_map["text_model/decoder_block.*(o_proj|down_proj).kernel"] = (MODEL, BATCH)
    return layout_map


def data_parallel_size(distribution) -> int:
    """How many slices each batch is split into (1 without a distribution)."""
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    return mesh.shape[mesh.axis_names.index(distribution.batch_dim_name)]


@contextlib.contextmanager
def distributed(
    devices: int | str = "all", model_parallel: int = 1, batch_size: int | None = None, heads: tuple[int, int] | None = None
) -> Iterator[object]:
    """Run the block under the job's distribution (nothing changes on one device); yields it."""
    distribution = job_distribution(devices, model_parallel, batch_size, heads)
    if distribution is None:
        yield None
        return
    n, batch_ways = distribution.device_mesh.devices.size, data_parallel_size(distribution)
    log.info("%s over %d devices: batch split %d ways, weights %d ways", type(distribution).__name__, n, batch_ways, n // batch_ways)
    with distribution.scope():
        yield distribution


def shard_batch(arrays: dict, distribution) -> dict:
    """Place a batch's arrays split along their first axis over the distribution's `batch` devices."""
    if distribution is None:
        return arrays
    return {
        key: distribute_data_input(value, distribution.get_data_layout(value.shape), distribution.batch_dim_name)
        for key, value in arrays.items()
    }
