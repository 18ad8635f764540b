"""The timed jobs of ``dptune benchmark`` (each run by ``dptune.tools.jobs.run_job`` in a fresh
process): dptune's training step and the plain HF Trainer's on the same in-memory batches, the
largest batch that fits on a GPU, and the rows of ``--profile``. Images/s are steady-state: the
time between the end of the first timed step and the end of the last, after the warm-up steps."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]  # src/dptune/tools/ -> the repository
PRESETS = {
    "dpt-large-ade": REPO / "configs" / "models" / "dpt-large-ade.json",
    "dpt-tiny": REPO / "configs" / "models" / "dpt-tiny.json",
    "dpt-bench-tiny": REPO.parent / "shared" / "bench" / "dpt-bench-tiny.json",
}


def model_config(name: str, num_labels: int | None):
    from dptune.models import load_config

    path = PRESETS.get(name, Path(name))
    cfg = load_config(str(path))
    if num_labels is not None:
        cfg.num_labels = num_labels
    return cfg


def batches(cfg, batch: int, crop: int, n: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, batch, 3, crop, crop), dtype=torch.uint8, generator=g)
    masks = torch.randint(0, cfg.num_labels, (n, batch, crop, crop), dtype=torch.uint8, generator=g)
    masks[:, :, :8] = 255
    return images, masks


def peak_memory(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def time_dptune(opts: dict[str, Any]) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from dptune.labels import LabelSet
    from dptune.tasks.segmentation import SegmentationModule
    from dptune.training.memory import keep_freed_memory

    cfg = model_config(opts["model"], opts["num_labels"])
    names = [f"class{i}" for i in range(cfg.num_labels)]
    module = SegmentationModule(
        config=cfg.to_dict(), label_spec=LabelSet(names=names).to_dict(), image_size=opts["crop"],
        lr=1e-4, gradient_checkpointing=opts["gradient_checkpointing"], compile=opts["compile"],
        channels_last=opts["channels_last"], warmup_steps=0, attn_implementation=opts.get("attention", "auto"),
    )
    images, masks = batches(cfg, opts["batch"], opts["crop"], 4)
    # --profile's steps run after the timed ones: the profiler's cost stays out of images/s
    profiled, timed_end = opts.get("profile") or 0, opts["warmup"] + opts["steps"]
    data = [{"image": images[i % 4], "mask": masks[i % 4], "sizes": [(opts["crop"],) * 2] * opts["batch"]}
            for i in range(timed_end + profiled)]
    times: list[float] = []
    activities = [torch.profiler.ProfilerActivity.CPU]
    if opts["device"] == "cuda":  # kernels' own time on the GPU, not the launches'
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities, record_shapes=True) if profiled else None
    ranges: list[Any] = []

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if profiler is not None and batch_idx == timed_end:
                ranges.extend(part_ranges(pl_module))
                profiler.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if opts["device"] == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            if profiler is not None and batch_idx == len(data) - 1:
                profiler.stop()
                for hook in ranges:
                    hook.remove()

    if opts["device"] != "cuda":  # what ``dptune fit`` sets on a CPU (the plain recipe keeps glibc's defaults)
        keep_freed_memory()
    trainer = pl.Trainer(
        accelerator="gpu" if opts["device"] == "cuda" else "cpu", devices=1, precision=opts["precision"],
        max_steps=len(data), logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Timer()], limit_val_batches=0, num_sanity_val_steps=0,
        gradient_clip_val=opts.get("gradient_clip_val"),
    )
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None, shuffle=False))
    timed = times[opts["warmup"] - 1:timed_end]
    ips = opts["batch"] * (len(timed) - 1) / (timed[-1] - timed[0])
    out = {"images_per_s": ips, "peak_mem_gib": peak_memory(opts["device"])}
    if profiler is not None:
        out["profile"] = profile_rows(profiler, profiled, opts["device"])
        out["profile_parts"] = part_rows(profiler, profiled, opts["device"])
        out["profiled_steps"] = profiled
    return out


PART = "dptune.forward:"  # the named ranges of part_ranges


def _part_name(name: str) -> str | None:
    """The part of the step a module of the network belongs to (None: inside a part)."""
    if name.startswith("dpt.encoder.layer.") and name.count(".") == 3:
        return "encoder layers"  # transformers' encoder.forward is not called (models/forward.py)
    return {"dpt.embeddings": "embeddings", "backbone": "backbone", "neck": "neck (reassemble + fusion)",
            "head": "head", "auxiliary_head": "auxiliary head"}.get(name)


def part_ranges(task) -> list[Any]:
    """Put the task's forward pass, each top-level part of its network (embeddings, encoder layers,
    neck, heads) and its loss in named profiler ranges; returns what undoes it."""
    import torch

    class Undo:
        def __init__(self, fn):
            self.remove = fn

    def hooks(module, name: str) -> list[Any]:
        box: list[Any] = []

        def enter(_m, _args):
            box.append(torch.profiler.record_function(PART + name).__enter__())

        def leave(_m, _args, _out):
            box.pop().__exit__(None, None, None)

        return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    handles = hooks(task, "network")
    for name, module in task.model.named_modules():
        part = _part_name(name)
        if part is not None:
            handles += hooks(module, part)
    loss = task.loss

    def ranged_loss(*args, **kwargs):
        with torch.profiler.record_function(PART + "loss"):
            return loss(*args, **kwargs)

    task.loss = ranged_loss
    return [*handles, Undo(lambda: delattr(task, "loss"))]


def _self_time(device: str) -> str:
    # on a GPU the kernels' own time on the device; on a CPU the operators' own time
    return "self_device_time_total" if device == "cuda" else "self_cpu_time_total"


def _host_events(prof, by_shape: bool = False) -> list[Any]:
    """The profile's events of the host: operators and named ranges. On a GPU the kernels are events
    too, and so is each named range's span on the device: their time is their host operator's
    device time already, so counting them as well would count it twice."""
    return [e for e in prof.key_averages(group_by_input_shape=by_shape) if "CPU" in str(getattr(e, "device_type", "CPU"))]


def profile_rows(prof, steps: int, device: str = "cpu", top: int = 15) -> list[dict[str, Any]]:
    """The operators that took the most of ``steps`` profiled training steps (self time: the
    operator's own kernels, not what it called; on a GPU their time on the device): the ``top``
    operators in all (``shapes`` "all"), then the ``top`` by operator and input shapes, each with its
    milliseconds per step and its share of all the profiled self time. Named ranges are left out of
    the rows (``Optimizer.step#AdamW.step`` spans Lightning's whole closure, forward and backward: its
    self time is the Python around them; ``part_rows`` reads dptune's own), not out of the total."""
    rows, attr = [], _self_time(device)
    for by_shape in (False, True):
        events = _host_events(prof, by_shape)
        total = sum(getattr(e, attr) for e in events) or 1.0
        ops = [e for e in events if "#" not in e.key and not e.key.startswith(("Optimizer.", PART))]
        for e in sorted(ops, key=lambda e: getattr(e, attr), reverse=True)[:top]:
            rows.append({"op": e.key, "shapes": str([list(x) for x in e.input_shapes if x])[:90] if by_shape else "all",
                         "calls_per_step": e.count / steps, "ms_per_step": getattr(e, attr) / 1e3 / steps,
                         "share": getattr(e, attr) / total})
    return rows


def part_rows(prof, steps: int, device: str = "cpu") -> list[dict[str, Any]]:
    """The forward pass of the network, of each of its parts and the loss (``part_ranges``):
    milliseconds per step with everything they ran, and the share of the whole profiled step's self
    time (forward, loss, backward and optimizer); backward and optimizer time are in ``profile_rows``."""
    events = _host_events(prof)
    attr = _self_time(device)
    total = sum(getattr(e, attr) for e in events) or 1.0
    inclusive = "device_time_total" if device == "cuda" else "cpu_time_total"
    return [{"part": e.key[len(PART):], "ms_per_step": getattr(e, inclusive) / 1e3 / steps,
             "share": getattr(e, inclusive) / total}
            for e in sorted(events, key=lambda e: getattr(e, inclusive), reverse=True) if e.key.startswith(PART)]


def time_hf_trainer(opts: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import DPTForSemanticSegmentation, Trainer, TrainerCallback, TrainingArguments

    from dptune.models.backbones import default_normalization
    from dptune.preprocessing import Preprocessing

    cfg = model_config(opts["model"], opts["num_labels"])
    model = DPTForSemanticSegmentation(cfg)
    if opts["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
    images, masks = batches(cfg, opts["batch"], opts["crop"], 4)
    # prepared as dptune prepares this model's images (its family's normalisation, no pretrained processor)
    pixels = Preprocessing.of_task(opts["crop"], *default_normalization(cfg)[:2]).pixel_values(images, resize=False)
    rows = [{"pixel_values": pixels[i % 4, b], "labels": masks[i % 4, b].long()}
            for i in range(opts["warmup"] + opts["steps"]) for b in range(opts["batch"])]
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, *args, **kwargs) -> None:
            if opts["device"] == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=os.path.join(opts["tmp"], "hf"), max_steps=opts["warmup"] + opts["steps"],
        per_device_train_batch_size=opts["batch"], learning_rate=1e-4, lr_scheduler_type="polynomial",
        bf16="bf16" in opts["precision"], fp16=opts["precision"].startswith("16"), report_to=[],
        save_strategy="no", logging_strategy="no", dataloader_num_workers=0, use_cpu=opts["device"] == "cpu",
        disable_tqdm=True, seed=0, remove_unused_columns=False,
    )
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[Timer()]).train()
    timed = times[opts["warmup"] - 1:]
    ips = opts["batch"] * (len(timed) - 1) / (timed[-1] - timed[0])
    return {"images_per_s": ips, "peak_mem_gib": peak_memory(opts["device"])}


def max_batch(opts: dict[str, Any]) -> dict[str, Any]:
    """Largest batch whose training step fits in GPU memory (doubling, then bisection)."""
    import torch

    from dptune.labels import LabelSet
    from dptune.tasks.segmentation import SegmentationModule

    cfg = model_config(opts["model"], opts["num_labels"])
    module = SegmentationModule(
        config=cfg.to_dict(), label_spec=LabelSet(names=[f"c{i}" for i in range(cfg.num_labels)]).to_dict(),
        image_size=opts["crop"], gradient_checkpointing=opts["gradient_checkpointing"],
    ).cuda()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)

    def fits(b: int) -> bool:
        try:
            x = torch.randint(0, 256, (b, 3, opts["crop"], opts["crop"]), dtype=torch.uint8, device="cuda")
            y = torch.randint(0, cfg.num_labels, (b, opts["crop"], opts["crop"]), device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = module.loss(*module(x), y)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    lo, hi = 0, opts["batch"]
    while fits(hi) and hi < 4096:
        lo, hi = hi, hi * 2
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"max_batch": lo}
