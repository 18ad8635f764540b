"""ONNX export of either task's network, checked against torch with ONNX Runtime."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dptune.inference.onnx_runner import session_options
from dptune.metrics import require_finite
from dptune.models import segment
from dptune.models.build import input_side


class TaskOutput(nn.Module):
    """``pixel_values -> logits`` (segmentation; auxiliary head skipped) or ``-> predicted_depth``
    (depth), through dptune's forward passes (any H x W that is a multiple of the patch size)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.depth = "DepthEstimation" in type(model).__name__
        self.output = "predicted_depth" if self.depth else "logits"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.depth:
            from dptune.models.depth import depth_forward

            return depth_forward(self.model, pixel_values)
        return segment(self.model, pixel_values, with_aux=False)[0]


def onnx_dynamic_size(model: nn.Module) -> bool:
    """Whether the ONNX graph can take any H x W. DPT-Hybrid's BiT stem computes its "same"
    padding in Python, and Depth Anything's head its output size (``int(patches * patch_size)``),
    which tracing freezes to the traced size: their graphs keep the processor's size (the bundled
    image processor resizes every image to it anyway)."""
    return not (getattr(model.config, "is_hybrid", False) or model.config.model_type == "depth_anything")


def export_onnx(model: nn.Module, path: Path, size: tuple[int, int], opset: int = 17) -> Path:
    """ONNX with dynamic batch, height and width (see ``onnx_dynamic_size``); input
    ``pixel_values``, output ``logits`` (segmentation) or ``predicted_depth`` (depth).

    Traced on an input whose patch grid is odd both ways: the fusion blocks then take their
    resize-the-skip-connection branch, which the graph must hold for odd grids (for even grids
    it resizes to the same size, an exact copy)."""
    wrapper = TaskOutput(model).eval().float()
    p = input_side(model)
    if onnx_dynamic_size(model):
        x = torch.randn(1, 3, *((s // p) // 2 * 2 * p + p for s in size))
        dyn = {0: "batch", 2: "height", 3: "width"}
    else:
        x = torch.randn(1, 3, *size)
        dyn = {0: "batch"}
    out_dyn = dyn if wrapper.output == "logits" else {k - (k > 0): v for k, v in dyn.items()}  # (B, H, W) depth
    with tracing_quietly():
        torch.onnx.export(wrapper, (x,), str(path), input_names=["pixel_values"], output_names=[wrapper.output],
                          dynamic_axes={"pixel_values": dyn, wrapper.output: out_dyn}, opset_version=opset,
                          dynamo=False)
    return path


@contextlib.contextmanager
def tracing_quietly() -> Iterator[None]:
    """The tracer's "might not generalize to other inputs" warnings (six per DPT: shape checks of
    transformers and dptune that are constant for a traced size) left out: an export never trusts
    the trace on faith, it checks the graph against torch at square, non-square and other batch
    sizes (``onnx_parity``) and refuses one that differs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def parity_input(b: int, h: int, w: int, g: torch.Generator, prep=None) -> torch.Tensor:
    """A random (B, 3, H, W) model input: random pixels normalised by ``prep`` (a ``Preprocessing``)
    where given, inside the range real images reach (a model fine on images may overflow on a
    normal-distributed input far outside it); else a normal-distributed one."""
    if prep is None:
        return torch.randn(b, 3, h, w, generator=g)
    return prep.pixel_values(torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8), resize=False)


def onnx_parity(model: nn.Module, path: Path, shapes: list[tuple[int, int, int]], seed: int = 0,
                prep=None) -> float:
    """Largest |torch - onnxruntime| / max|torch| over random inputs of the given (B, H, W) shapes
    (see ``parity_input``)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    wrapper = TaskOutput(model).eval().float()
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b, h, w in shapes:
        x = parity_input(b, h, w, g, prep)
        with torch.no_grad():
            ref = wrapper(x).numpy()
        got = sess.run([wrapper.output], {"pixel_values": x.numpy()})[0]
        if got.shape != ref.shape:
            raise ValueError(f"ONNX output {got.shape} != torch {ref.shape} for input {b}x3x{h}x{w}")
        worst = max(worst, relative_difference(got, ref))
    return worst


def relative_difference(got: np.ndarray, ref: np.ndarray) -> float:
    """``max|got - ref| / max|ref|``; infinite where the graph's output is not finite (``max`` would
    skip a NaN), and a ``ModelOutputError`` where the torch model's own output is not."""
    require_finite(ref, "the model's output on a random image")
    d = float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))
    return d if np.isfinite(d) else np.inf


class JointOutputs(nn.Module):
    """``pixel_values -> (logits, predicted_depth)`` of a joint segmentation + depth DPT."""

    def __init__(self, joint: nn.Module) -> None:
        super().__init__()
        self.joint = joint

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _, depth = self.joint(pixel_values)
        return logits, depth


def export_joint_onnx(joint: nn.Module, path: Path, size: tuple[int, int], opset: int = 17,
                      check: Callable[[Path], object] | None = None, prep=None) -> float:
    """One ONNX graph with both outputs (dynamic batch, height and width), and its parity: the
    largest |torch - onnxruntime| / max|torch| over both outputs, square and non-square inputs
    (``prep``: see ``parity_input``). ``check``: called with the graph as soon as it is written, before the parity is measured."""
    import onnxruntime as ort

    wrapper = JointOutputs(joint).eval()
    p = input_side(joint.seg)
    x = torch.randn(1, 3, *((s // p) // 2 * 2 * p + p for s in size))  # odd grid: see export_onnx
    dyn = {0: "batch", 2: "height", 3: "width"}
    with tracing_quietly():
        torch.onnx.export(wrapper, (x,), str(path), input_names=["pixel_values"],
                          output_names=["logits", "predicted_depth"],
                          dynamic_axes={"pixel_values": dyn, "logits": dyn,
                                        "predicted_depth": {0: "batch", 1: "height", 2: "width"}},
                          opset_version=opset, dynamo=False)
    if check is not None:
        check(path)
    sess = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for b, h, w in [(1, *size), (2, size[0], size[1] + 2 * p)]:
        x = parity_input(b, h, w, g, prep)
        with torch.no_grad():
            refs = [r.numpy() for r in wrapper(x)]
        for ref, got in zip(refs, sess.run(["logits", "predicted_depth"], {"pixel_values": x.numpy()}), strict=True):
            worst = max(worst, relative_difference(got, ref))
    return worst

