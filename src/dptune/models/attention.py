"""Which attention kernel a run trains with under ``attn_implementation: auto``.

transformers runs a ViT's self-attention either as PyTorch's fused
``scaled_dot_product_attention`` (``sdpa``, its default) or as ``softmax(Q K^T / sqrt(d)) V`` in
plain matrix products (``eager``). Both compute the same function. On a CPU in bfloat16 the fused
kernel is the slower one on short sequences: forward + backward on the 2-core AVX-512 EPYC of
docs/benchmarks.md, eager is 3.0-4.0x faster at 8 x 3 heads x 145-197 tokens x 64 (the bench-tiny
DPT at 192-224 px) and 2.5x at 325 tokens; from 577 tokens (DPT-Large at 384 px) the two run from
a tie to 1.3x either way between runs, and at 1025 sdpa was faster (eager 0.75x). In float32 sdpa
is as fast or faster (eager 0.9-1.1x on short sequences, 0.4-0.75x from 325 tokens), on the native
and the AVX2 dispatch alike. ``python -m dptune.models.attention`` prints these times on the
machine it runs on.

So ``auto`` (the default) is ``eager`` for a CPU run in bfloat16 (``bf16-mixed``, ``bf16-true``)
whose sequences are at most ``EAGER_MAX_TOKENS`` long, and ``sdpa`` otherwise: longer sequences,
float32 on a CPU, every GPU run, float16 (eager's ``Q K^T`` in float16 can overflow where the fused
kernel, which scales ``Q`` first, does not), and backbones whose sequence length the config does
not give (Swin's windows). A rule, not a timing at start: two runs with the same settings compute
the same way."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

ROUNDS = 3  # timed rounds after one warm-up round; each kernel's best round counts
EAGER_MAX_TOKENS = 400  # longest sequence (patches + CLS) that trains with eager under auto


def sequence_length(config, size: tuple[int, int]) -> int | None:
    """Tokens of the model's self-attention on ``size`` (h, w) inputs (patches + the CLS token), or
    None where the config does not give it (windowed attention: Swin)."""
    backbone = getattr(config, "backbone_config", None)
    # DPT-Hybrid's backbone_config is its convolutional stem: the attention is DPT's own ViT
    cfg = backbone if backbone is not None and not getattr(config, "is_hybrid", False) else config
    if getattr(cfg, "window_size", None):
        return None
    patch = getattr(cfg, "patch_size", None)
    if not isinstance(patch, int) or patch <= 0:
        return None
    return (int(size[0]) // patch) * (int(size[1]) // patch) + 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)


def auto_attention(device_type: str, precision: object, tokens: int | None) -> tuple[str, str]:
    """(``sdpa`` or ``eager``, why) for ``attn_implementation: auto`` on ``device_type`` at ``precision``
    with sequences of ``tokens`` (None: unknown)."""
    where = f"{'CPU' if device_type == 'cpu' else device_type} at {precision}"
    if device_type == "cpu" and str(precision).startswith("bf16"):
        if tokens is not None and tokens <= EAGER_MAX_TOKENS:
            return "eager", (f"{where}, {tokens} tokens: PyTorch's fused attention (sdpa) is the slower kernel on "
                             f"short sequences in bfloat16 on a CPU (dptune.models.attention)")
        return "sdpa", f"{where}, {tokens or 'an unknown number of'} tokens (eager only up to {EAGER_MAX_TOKENS})"
    return "sdpa", where


def choose_attention(config, device_type: str, precision: object, sizes: list) -> tuple[str, str]:
    """(kernel, why) that ``auto`` picks for a model of ``config`` trained or run on ``sizes`` (ints
    for squares or (h, w); the longest sequence counts, an unknown one makes it unknown)."""
    lengths = [sequence_length(config, (s, s) if isinstance(s, int) else tuple(s)) for s in sizes if s]
    longest = None if not lengths or None in lengths else max(lengths)
    return auto_attention(device_type, precision, longest)


@contextlib.contextmanager
def transformers_quiet() -> Iterator[None]:
    """``transformers``' own log at errors only, for the block."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def set_attention(model: torch.nn.Module, kernel: str) -> None:
    """``kernel`` on every transformers model inside ``model``; a model without sdpa (DPT-Hybrid's BiT
    stem, Depth Anything's head) or one transformers refuses the kernel for keeps its own."""
    from transformers import PreTrainedModel

    with transformers_quiet():  # its note on sub-configs it sets without a sub-model (DINOv2, BEiT)
        for m in model.modules():
            if not isinstance(m, PreTrainedModel) or m.config._attn_implementation == kernel:
                continue
            if kernel == "sdpa" and not getattr(m, "_supports_sdpa", False):
                continue
            try:
                m.set_attn_implementation(kernel)
            except ValueError:
                continue


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # as transformers' eager_attention_forward computes it (no mask, no dropout)
    return torch.softmax(torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5, dim=-1) @ v


KERNELS = {"sdpa": F.scaled_dot_product_attention, "eager": _eager}


def time_attention(shape: tuple[int, int, int], batch: int, dtype: torch.dtype) -> dict[str, float]:
    """Seconds per forward + backward of each kernel on ``batch`` x (heads, tokens, head width) in
    ``dtype``: the best of ``ROUNDS`` rounds, the kernels alternating, after a warm-up round."""
    heads, tokens, width = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(batch, heads, tokens, width, generator=gen).to(dtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    best = dict.fromkeys(KERNELS, math.inf)
    for r in range(ROUNDS + 1):
        for name, kernel in KERNELS.items():
            start = time.perf_counter()
            kernel(q, k, v).backward(grad)
            took = time.perf_counter() - start
            q.grad = k.grad = v.grad = None
            if r:
                best[name] = min(best[name], took)
    return best


SHAPES = (((3, 145, 64), 8), ((3, 197, 64), 8), ((6, 325, 64), 8), ((6, 401, 64), 8), ((12, 577, 64), 8),
          ((16, 577, 64), 2), ((16, 1025, 64), 2))  # (heads, tokens, head width), batch: bench-tiny at 192 px ...


def main() -> None:
    print(f"# forward + backward, ms (best of {ROUNDS}); {torch.get_num_threads()} threads")
    for dtype in (torch.float32, torch.bfloat16):
        for shape, batch in SHAPES:
            t = time_attention(shape, batch, dtype)
            print(f"{str(dtype).removeprefix('torch.'):9s} {batch} x {shape}: sdpa {t['sdpa'] * 1e3:8.2f}  "
                  f"eager {t['eager'] * 1e3:8.2f}  eager / sdpa speed {t['sdpa'] / t['eager']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
