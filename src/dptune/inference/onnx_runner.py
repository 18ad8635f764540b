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


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
              "amx_int8", "amx_bf16")


def cpu_info() -> dict:
    """The CPU's model name and the SIMD flags that decide int8 speed and accuracy (Linux /proc/cpuinfo):
    without a VNNI flag (avx512_vnni, avx_vnni) or AMX, ONNX Runtime's u8 x s8 kernels add pairs of
    products in 16 bits, which clip (see ``dptune.export.quantize``)."""
    import platform

    from dptune.cores import usable_cores

    info: dict = {"machine": platform.machine(), "cores_usable": usable_cores()}
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and "model" not in info:
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    info.setdefault("model", platform.processor() or "unknown")
    info["flags"] = sorted(f for f in flags if f in SIMD_FLAGS)
    x86 = info["machine"].lower() in ("x86_64", "amd64", "i686", "x86")
    info["vnni"] = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"}) if x86 and flags else None
    return info


def cpu_providers() -> list[str]:
    return ["CPUExecutionProvider"]


def session_options(threads: int | None = None):
    """ONNX Runtime's options with ``threads`` intra-op threads, by default the cores this process may
    use (affinity, cgroup quota): left to itself ONNX Runtime counts the machine's cores and pins a
    thread to each, outside a container's or ``taskset``'s share."""
    from dptune.cores import usable_cores

    ort = require_onnxruntime()
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or usable_cores())
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
        self.output_shapes = {o.name: list(o.shape) for o in self.session.get_outputs()}

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """(H, W) when the graph takes one input size only (DPT-Hybrid), else None."""
        h, w = self.input_shape[2:4]
        return (h, w) if isinstance(h, int) and isinstance(w, int) else None

    @property
    def fixed_batch(self) -> int | None:
        """The one batch size the graph takes, when its batch dimension is not dynamic."""
        b = self.input_shape[0] if self.input_shape else None
        return b if isinstance(b, int) else None

    def __call__(self, pixel_values) -> dict[str, np.ndarray]:
        x = pixel_values.detach().cpu().numpy() if hasattr(pixel_values, "detach") else np.asarray(pixel_values)
        got = self.session.run(self.outputs, {self.input: np.ascontiguousarray(x, dtype=np.float32)})
        return {name: np.asarray(v, dtype=np.float32) for name, v in zip(self.outputs, got, strict=True)}


def find_graph(model_dir: str | Path, precision: str = "fp32") -> Path:
    """The graph of ``precision`` (fp32, int8, fp16) in an export, or the file itself when
    ``model_dir`` is an ``.onnx`` file; one line naming what is missing otherwise.

    A joint export's parts (``segmentation/``, ``depth/``) have no graph of their own: theirs is the
    joint graph one level up, which their ``dptune.json`` says (``serving.graphs_in: ".."``). No other
    export looks above itself: a graph there is another model's."""
    p = Path(model_dir)
    if p.is_file() and p.suffix == ".onnx":
        return p
    if precision not in GRAPHS:
        raise ConfigError(f"unknown ONNX precision {precision!r} (one of {', '.join(GRAPHS)})")
    for d in (p, *([p.parent] if graphs_in(p) else [])):
        if (d / GRAPHS[precision]).is_file():
            return d / GRAPHS[precision]
    flag = {"fp32": "--onnx", "int8": "--int8", "fp16": "--onnx-fp16"}[precision]
    raise ConfigError(f"{p}: no {GRAPHS[precision]} (export with {flag} to write it)")


def graphs_in(export: Path) -> str | None:
    """Where an export's ``dptune.json`` says its graphs lie (``..`` for a joint export's part), or None."""
    import json

    try:
        serving = json.loads((export / "dptune.json").read_text()).get("serving") or {}
    except (OSError, ValueError, AttributeError):
        return None
    where = serving.get("graphs_in") if isinstance(serving, dict) else None
    return where if where == ".." else None


def check_output(graph: OnnxGraph, output: str | None, classes: int | None = None) -> OnnxGraph:
    """``graph`` when it computes ``output`` (``logits`` / ``predicted_depth``) and, for ``logits``, as
    many classes as the model has (``classes``, where known); one line otherwise (it is another task's
    or another model's graph)."""
    if output and output not in graph.outputs:
        raise ConfigError(f"{graph.path}: has no {output!r} output (its outputs: {', '.join(graph.outputs)}); it is "
                          f"not the graph of this {'segmentation' if output == 'logits' else 'depth'} model")
    shape = graph.output_shapes.get(output) or []
    if output == "logits" and classes and len(shape) > 1 and isinstance(shape[1], int) and shape[1] != classes:
        raise ConfigError(f"{graph.path}: its logits give {shape[1]} classes, the model has {classes}; it is another "
                          "model's graph")
    return graph


def config_classes(model_dir: str | Path) -> int | None:
    """The number of classes an exported segmentation model's ``config.json`` names, where it can be read."""
    import json

    try:
        labels = json.loads((Path(model_dir) / "config.json").read_text()).get("id2label")
    except (OSError, ValueError, AttributeError):
        return None
    return len(labels) if isinstance(labels, dict) and labels else None


BACKENDS = ("torch", "onnx", "onnx-int8", "onnx-fp16")


def backend_graph(ref: str, backend: str = "torch", device: str = "cpu", output: str | None = None) -> OnnxGraph | None:
    """The ONNX graph ``predict`` / ``evaluate --backend`` run instead of the torch model (None for
    ``torch``): ``onnx`` is the export's ``model.onnx``, ``onnx-int8`` / ``onnx-fp16`` its other graphs.
    ``output``: what the caller reads (``logits`` or ``predicted_depth``); a graph without it is one line."""
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
    return check_output(OnnxGraph(find_graph(ref, precision), providers=providers), output, config_classes(ref))
