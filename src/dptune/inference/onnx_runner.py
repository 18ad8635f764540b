"""ONNX Runtime sessions of an export's graphs (``model.onnx``, ``model_int8.onnx``, ``model_fp16.onnx``):
``pixel_values`` (B, 3, H, W) float32 in, the graph's named outputs out, as numpy arrays.

The one place dptune opens an ONNX Runtime session: the export's accuracy measurement, the inference
benchmark and ``predict`` / ``evaluate --backend onnx`` all run graphs through ``OnnxGraph``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dptune.errors import ConfigError

INSTALL = "pip install 'dptune[onnx]' (or: pip install onnx onnxruntime)"

# what each file of an export holds
GRAPHS = {"fp32": "model.onnx", "int8": "model_int8.onnx", "fp16": "model_fp16.onnx"}


class OnnxMissing(ConfigError):
    """onnx / onnxruntime is not installed; the message says how to install it."""


def require_onnxruntime(what: str = "ONNX graphs"):
    """``onnxruntime``, or one line saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise OnnxMissing(f"{what} need onnxruntime, which is not installed: {INSTALL}") from None
    return onnxruntime


def require_onnx(what: str = "ONNX export"):
    try:
        import onnx
    except ImportError:
        raise OnnxMissing(f"{what} needs the onnx package, which is not installed: {INSTALL}") from None
    return onnx


def cpu_providers() -> list[str]:
    return ["CPUExecutionProvider"]


def session_options(threads: int | None = None):
    ort = require_onnxruntime()
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.log_severity_level = 3  # warnings about unused initialisers etc. are not the user's business
    return so


class OnnxGraph:
    """One ONNX graph run by ONNX Runtime (CPU unless ``providers`` says otherwise)."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        ort = require_onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"{self.path}: no such ONNX graph")
        try:
            self.session = ort.InferenceSession(str(self.path), session_options(threads),
                                                providers=providers or cpu_providers())
        except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise ConfigError(f"{self.path}: ONNX Runtime cannot load it ({str(e).strip().splitlines()[0]})") from None
        inp = self.session.get_inputs()[0]
        self.input = inp.name
        self.input_shape = list(inp.shape)
        self.outputs = [o.name for o in self.session.get_outputs()]

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """(H, W) when the graph takes one input size only (DPT-Hybrid), else None."""
        h, w = self.input_shape[2:4]
        return (h, w) if isinstance(h, int) and isinstance(w, int) else None

    def __call__(self, pixel_values) -> dict[str, np.ndarray]:
        x = pixel_values.detach().cpu().numpy() if hasattr(pixel_values, "detach") else np.asarray(pixel_values)
        got = self.session.run(self.outputs, {self.input: np.ascontiguousarray(x, dtype=np.float32)})
        return {name: np.asarray(v, dtype=np.float32) for name, v in zip(self.outputs, got, strict=True)}


def find_graph(model_dir: str | Path, precision: str = "fp32") -> Path:
    """The graph of ``precision`` (fp32, int8, fp16) in an export, or the file itself when
    ``model_dir`` is an ``.onnx`` file; one line naming what is missing otherwise."""
    p = Path(model_dir)
    if p.is_file() and p.suffix == ".onnx":
        return p
    if precision not in GRAPHS:
        raise ConfigError(f"unknown ONNX precision {precision!r} (one of {', '.join(GRAPHS)})")
    for d in (p, p.parent):  # a joint export's graph lies above its segmentation/ and depth/ parts
        if (d / GRAPHS[precision]).is_file():
            return d / GRAPHS[precision]
    flag = {"fp32": "--onnx", "int8": "--int8", "fp16": "--onnx-fp16"}[precision]
    raise ConfigError(f"{p}: no {GRAPHS[precision]} (export with {flag} to write it)")


BACKENDS = ("torch", "onnx", "onnx-int8", "onnx-fp16")


def backend_graph(ref: str, backend: str = "torch", device: str = "cpu") -> OnnxGraph | None:
    """The ONNX graph ``predict`` / ``evaluate --backend`` run instead of the torch model (None for
    ``torch``): ``onnx`` is the export's ``model.onnx``, ``onnx-int8`` / ``onnx-fp16`` its other graphs."""
    if backend in (None, "torch"):
        return None
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend}: one of {', '.join(BACKENDS)}")
    if not Path(ref).is_dir():
        raise ConfigError(f"--backend {backend}: {ref} is not an exported directory; the ONNX backend runs an "
                          "export's graph (scripts/export.py --onnx / --int8 / --onnx-fp16)")
    require_onnxruntime(f"--backend {backend}")
    precision = backend.partition("-")[2] or "fp32"
    providers = None
    if str(device).startswith("cuda"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return OnnxGraph(find_graph(ref, precision), providers=providers)
