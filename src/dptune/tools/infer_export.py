"""Reading an export for the inference benchmark (``dptune.tools.infer_bench``): its sizes, model
config and outputs, the torch model, and whether a batch fits in memory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dptune.errors import ConfigError, first_line


def sizes(export: Path, config) -> tuple[tuple[int, int], tuple[int, int]]:
    """The export's size (its processor's) and a non-square one, from the files alone."""
    f = export / "preprocessor_config.json"
    try:
        size = json.loads(f.read_text())["size"]
        h, w = int(size["height"]), int(size["width"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{f}: no readable size (height and width) of the image processor ({type(e).__name__}: "
                          f"{first_line(e, 300)})") from None
    from dptune.models.build import config_input_side

    p = config_input_side(config)
    return (h, w), (h, max(p, int(round(w * 1.5 / p)) * p))


# peak memory of one inference over the size of its fp32 input: measured 27x for the bench-tiny DPT
# under ONNX Runtime (12 MB a 192x192 image), rounded up
PEAK_PER_INPUT = 32


def available_memory() -> int | None:
    """Bytes this process may still allocate: the kernel's MemAvailable (free memory and the cache it
    can drop), lowered to what the cgroup's memory.max leaves; None where neither can be read."""
    got = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                got.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            got.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(got) if got else None


def out_of_memory(e: BaseException) -> bool:
    """An allocation that failed: Python's MemoryError, torch's and ONNX Runtime's own errors."""
    text = str(e).lower()
    return isinstance(e, MemoryError) or any(w in text for w in ("out of memory", "allocateraw", "failed to allocate",
                                                                   "bad_alloc", "unable to allocate"))


def model_config(part: Path):
    """The export's model config (no weights): one line when it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(part))
    except Exception as e:  # OSError, ValueError, JSONDecodeError, KeyError for an unknown model_type
        raise ConfigError(f"{part / 'config.json'}: cannot be read as a model config ({first_line(e, 300)})") from None


def expected_output(config) -> str:
    """What a task's graph output is called: ``predicted_depth`` for a depth model, else ``logits``."""
    return "predicted_depth" if any("DepthEstimation" in a for a in config.architectures or []) else "logits"


def task_dir(export: Path) -> Path:
    """The directory holding the torch model (a joint export: its segmentation part; the depth part
    is loaded beside it, see ``torch_model``)."""
    if (export / "config.json").is_file():
        return export
    if (export / "segmentation" / "config.json").is_file():
        return export / "segmentation"
    raise ConfigError(f"{export}: not a dptune export (no config.json)")


def torch_model(export: Path, part: Path) -> torch.nn.Module:
    """``pixel_values -> output(s)`` in torch: the export's model, or for a joint export both parts as
    one joint model (the depth part on the segmentation part's backbone, whose weights it shares).
    One line when the weights cannot be loaded."""
    from dptune.export.onnx import JointOutputs, TaskOutput
    from dptune.models import load_exported

    def load(d: Path):
        try:
            return load_exported(str(d)).eval().float()
        except Exception as e:  # OSError, SafetensorError, ValueError: a damaged or incomplete export
            raise ConfigError(f"{d}: the exported model cannot be loaded ({first_line(e, 300)})") from None

    model = load(part)
    if part == export:
        return TaskOutput(model).eval()
    from dptune.models.joint import JointDPT

    return JointOutputs(JointDPT(model, load(export / "depth"))).eval()
