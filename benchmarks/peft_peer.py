"""The peer of benchmarks/gpu_lora.py: transformers' Gemma with PEFT LoRA on PyTorch, at its settings.

The same shapes, random weights and settings as ours (benchmarks.gemma_shapes);
each setting one worker process, as gpu_lora runs it.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.gemma_shapes import LEARNING_RATE, WEIGHT_DECAY, compute_params, family, hf_config, vocabulary
from benchmarks.harness import emit, gpu_name, peak_flops


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# The PyTorch routes a speed-minded user picks (issue 18): eager PEFT; one line
# of torch.compile; Liger's Triton kernels (RoPE, RMSNorm, GeGLU, fused linear
# cross-entropy); both. For generation: eager, or transformers' static KV
# cache with the forward pass compiled, as its documentation recommends.
PEERS = {"train": ["eager", "compile", "liger", "liger+compile"], "generate": ["eager", "static+compile"]}


def peft_model(model: str, rank: int, peer: str = "eager"):
    import peft
    import torch
    import transformers

    if "liger" in peer:
        from liger_kernel import transformers as liger

        getattr(liger, f"apply_liger_kernel_to_{family(model)}")()
    torch.manual_seed(0)
    with torch.device(torch_device()):
        base = transformers.AutoModelForCausalLM.from_config(hf_config(model)).to(torch.bfloat16)
    lora = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return peft.get_peft_model(base, lora)


def framework(peer: str) -> str:
    return "peft" if peer == "eager" else f"peft+{peer}"


def torch_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torch_peak(reset: bool = False) -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return torch.cuda.max_memory_allocated()


def peft_train(args, model=None) -> None:
    """The peer's training steps at each shape; `model`: a PEFT model (default: random weights of args.model)."""
    import torch

    out = Path(args.out)
    peer = getattr(args, "peer", "eager")
    model = model or peft_model(args.model, args.rank, peer)
    params = compute_params(args.model, sum(p.numel() for p in model.parameters()))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    model.train()
    forward = torch.compile(model) if "compile" in peer else model
    shapes = sorted((tuple(map(int, s.split("x"))) for s in args.shapes), key=lambda s: s[0] * s[1])
    for seq, batch in shapes:
        record = dict(phase="train", framework=framework(peer), model=args.model, precision="bfloat16", rank=args.rank,
                      seq=seq, batch=batch, params=params, gpu=gpu_name())
        torch_peak(reset=True)
        tokens = torch.randint(3, model.config.vocab_size, (batch, seq + 1), device=torch_device())

        def step():
            loss = forward(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        try:
            started = time.perf_counter()
            for _ in range(3):
                step()
            torch_sync()
            warmup_s = time.perf_counter() - started
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            torch_sync()
            seconds = time.perf_counter() - started
        except torch.OutOfMemoryError as error:
            emit(out, **record, fits=False, oom=True, error=str(error)[:300])
            break
        tokens_per_s = seq * batch * args.steps / seconds
        emit(out, **record, fits=True, compile_s=warmup_s, step_ms=1000 * seconds / args.steps, tokens_per_s=tokens_per_s,
             mfu=tokens_per_s * 4 * params / peak_flops(), peak_bytes=torch_peak())


def peft_generate(args) -> None:
    import torch

    out = Path(args.out)
    model = peft_model(args.model, 4).eval()
    for batch in args.batches:
        torch_peak(reset=True)
        prompts = torch.randint(3, vocabulary(args.model), (batch, args.prompt_tokens), device=torch_device())
        kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
                      attention_mask=torch.ones_like(prompts))
        if args.peer == "static+compile":
            # With a static cache, transformers compiles the decoding step itself (its
            # generation_config.compile_config); compiling forward by hand with CUDA
            # graphs broke on the second call here (outputs overwritten).
            kwargs["cache_implementation"] = "static"
        with torch.no_grad():
            started = time.perf_counter()
            model.generate(input_ids=prompts, **kwargs)
            torch_sync()
            warmup_s = time.perf_counter() - started
            started = time.perf_counter()
            output = model.generate(input_ids=prompts, **kwargs)
            torch_sync()
            seconds = time.perf_counter() - started
        new = (output.shape[1] - args.prompt_tokens) * batch
        emit(out, phase="generate", framework=framework(args.peer), model=args.model, batch=batch, prompt_tokens=args.prompt_tokens,
             new_tokens=new, seconds=seconds, compile_s=warmup_s, new_tokens_per_s=new / seconds,
             peak_bytes=torch_peak(), gpu=gpu_name())
