"""Bilinear resizing as matrix products (``dptune.models.resize``): the same function as PyTorch's
kernel, values and gradients, used where dptune says it is and nowhere else."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TINY
from transformers import DPTConfig, DPTForSemanticSegmentation

from dptune.losses.segmentation import cross_entropy, dice_loss
from dptune.models import resize
from dptune.models.forward import segment

CASES = [  # (h, w), (H, W), align_corners, scale_factor
    ((96, 96), (192, 192), True, None),
    ((96, 96), (192, 192), False, None),
    ((12, 12), (192, 192), False, None),  # the auxiliary logits to the label size
    ((45, 60), (360, 480), False, None),
    ((7, 5), (11, 13), False, None),  # not a whole factor
    ((7, 5), (11, 13), True, None),
    ((9, 8), (4, 3), False, None),  # smaller
    ((5, 7), (7, 10), False, (1.5, 1.5)),  # a factor PyTorch reads positions by, not out / in
    ((1, 6), (3, 12), True, None),  # one row: no corners to align
]


@pytest.mark.parametrize("small,big,align,scale", CASES)
def test_products_compute_pytorchs_bilinear_resize_values_and_gradients(small, big, align, scale):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *small, dtype=torch.float64, generator=gen, requires_grad=True)
    grad = torch.randn(2, 3, *big, dtype=torch.float64, generator=gen)
    if scale is None:
        expected = F.interpolate(x, size=big, mode="bilinear", align_corners=align)
    else:
        expected = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=align)
    assert tuple(expected.shape[-2:]) == big
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    got = resize.bilinear_products(x, big, align, scale)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_grad, expected_grad, rtol=0, atol=1e-12)


@pytest.fixture
def native(monkeypatch):
    """As on a CPU with native bf16 (the products' arithmetic is the same where bf16 is emulated)."""
    monkeypatch.setattr(resize, "_native_bf16", lambda: True)


def test_products_run_in_bfloat16_with_autograd_on_a_native_cpu_only(native, monkeypatch):
    def refused(*args, **kwargs):
        raise AssertionError("PyTorch's kernel ran")

    x = torch.randn(2, 11, 24, 24)
    tracked = x.bfloat16().requires_grad_(True)
    expected = F.interpolate(x.bfloat16().float(), size=(48, 48), mode="bilinear", align_corners=False)
    assert resize.products_pay(tracked)
    assert not resize.products_pay(x.requires_grad_(True))  # float32 keeps the kernel
    assert not resize.products_pay(tracked.detach())  # a forward alone (validation, prediction) too
    with torch.no_grad():
        assert not resize.products_pay(tracked)
    with monkeypatch.context() as m:
        m.setattr(F, "interpolate", refused)
        got = resize.resize_bilinear(tracked, (48, 48))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=2e-2)  # bf16 rounding of the result
    with resize.kernel_only():
        assert not resize.products_pay(tracked)
    monkeypatch.setattr(resize, "_native_bf16", lambda: False)
    assert not resize.products_pay(tracked)


def test_a_forward_alone_and_float32_keep_the_heads_own_upsampling(native):
    """Validation and prediction (no autograd) and float32 training run the head as transformers built
    it: its upsampling module runs (hooks on it fire) and is never swapped."""
    model = _model()
    seen = []
    model.head.head[-1].register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, torch.is_grad_enabled())))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        segment(model, x)
    segment(model, x)
    assert seen == [(torch.bfloat16, False), (torch.float32, True)]


def test_sizes_past_the_cost_limit_keep_pytorchs_kernel(native, monkeypatch):
    """The products' cost per output element grows with the sizes (a whole row and column), the kernel's
    does not: past ``MAX_COST`` multiply-adds per element (2048 x 2048 logits from 1024 x 1024) the kernel runs."""
    calls = []
    kernel = F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    small = torch.randn(1, 2, 96, 96, dtype=torch.bfloat16, requires_grad=True)
    big = torch.randn(1, 2, 1024, 1024, dtype=torch.bfloat16, requires_grad=True)
    assert resize.products_cost((96, 96), (192, 192)) <= resize.MAX_COST < resize.products_cost((1024, 1024), (2048, 2048))
    resize.resize_bilinear(small, (192, 192))
    assert calls == []
    resize.resize_bilinear(big, (2048, 2048))
    assert calls == [1]


def test_a_traced_graph_keeps_pytorchs_resize(native):
    seen = []

    def f(x):
        seen.append(resize.products_pay(x))
        return resize.resize_bilinear(x, (8, 8))

    torch.jit.trace(f, torch.randn(1, 2, 4, 4, dtype=torch.bfloat16, requires_grad=True), check_trace=False)
    assert seen == [False]


def _model():
    torch.manual_seed(0)
    model = DPTForSemanticSegmentation(DPTConfig(**TINY, num_labels=5)).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _step(model, x, target):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, aux = segment(model, x)
        loss = cross_entropy(logits, target) + dice_loss(logits, target) + 0.4 * cross_entropy(aux, target)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach().float(), loss.detach(), grads


def test_a_bf16_training_step_with_products_gives_the_kernels_loss_and_gradients(native, monkeypatch):
    """The head's final upsampling and the auxiliary logits' run as products (PyTorch's kernel is
    never called on the logits), the head keeps its own module, and the loss and every gradient are
    those of the kernel to bf16 rounding."""
    model = _model()
    x, target = torch.randn(4, 3, 64, 64), torch.randint(0, 5, (4, 64, 64))
    with resize.kernel_only():
        ref_logits, ref_loss, ref_grads = _step(model, x, target)
    kernel, sizes = F.interpolate, []

    def counted(inp, *args, **kwargs):
        sizes.append(tuple(inp.shape))
        return kernel(inp, *args, **kwargs)

    heads = []
    hook = model.head.register_forward_hook(lambda *_: heads.append(1))
    with monkeypatch.context() as m:
        m.setattr(F, "interpolate", counted)
        logits, loss, grads = _step(model, x, target)
    hook.remove()
    assert not [s for s in sizes if s[1] == 5], sizes  # no logits through the kernel (the neck's still are)
    assert heads == [1] and isinstance(model.head.head[-1], torch.nn.Upsample)
    assert (logits - ref_logits).abs().max() <= 0.02 * ref_logits.abs().max()
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        ref = ref_grads[name]
        assert (g - ref).norm() <= 0.05 * ref.norm() + 1e-6, name


def test_weights_made_under_inference_mode_serve_a_training_step_later(native):
    """The interpolation weights are cached: made first under ``torch.inference_mode`` (prediction),
    they must still be usable in a graph that backpropagates (an inference tensor could not be)."""
    model = _model()
    x, target = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    resize._weights.cache_clear()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        segment(model, x)
    _, loss, grads = _step(model, x, target)
    assert torch.isfinite(loss) and grads


def test_the_timing_tool_times_both_kernels(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = subprocess.run([sys.executable, "-m", "dptune.tools.resize_step", "--rounds", "1", "--model", str(config)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^products median +[0-9.]+ ms/step", out.stdout, re.M), out.stdout
    assert re.search(r"^kernel +median +[0-9.]+ ms/step", out.stdout, re.M), out.stdout
    assert re.search(r"^products over kernel: [0-9.]+x", out.stdout, re.M), out.stdout


@pytest.mark.parametrize("args,said", [
    (["--rounds", "0"], "--rounds 0: at least 1"),
    (["--sizes", "--rounds", "-1"], "--rounds -1: at least 1"),
    (["--model", "no-such.json"], "no-such.json: model config not found"),
    (["--model", "configs/models/depth-anything-tiny.json"], "this tool times DPT segmentation"),
])
def test_the_timing_tool_refuses_what_it_cannot_time_in_one_line(args, said):
    out = subprocess.run([sys.executable, "-m", "dptune.tools.resize_step", *args], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and said in out.stderr and "Traceback" not in out.stderr, out.stderr
