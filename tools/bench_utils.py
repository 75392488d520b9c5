"""What the benchmark scripts share: interleaved median timing, peak memory, the machine, tables.

Peak memory is the highest amount of tensor memory allocated DURING a call above what was live
when it started (weights and inputs excluded): on CUDA from the allocator's peak counter; on CPU
from the allocation / free events that the torch profiler records (`profile_memory=True`), summed
in time order. Both count torch tensors only (not the Python heap, not allocator caching).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch
import transformers
from torch.profiler import ProfilerActivity, profile


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    calls: dict[str, Callable[[], object]], repeats: int, warmup: int, device: str = "cpu"
) -> dict[str, list[float]]:
    """Seconds per call, the calls run round-robin (one of each per round), so load drift on a
    shared machine hits every call alike. `warmup` rounds are run first and discarded."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"`repeats` must be >= 1 and `warmup` >= 0, got {repeats}, {warmup}")
    samples = {name: [] for name in calls}
    for round_index in range(warmup + repeats):
        for name, call in calls.items():
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            if round_index >= warmup:
                samples[name].append(time.perf_counter() - start)
    return samples


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_memory(call: Callable[[], object], device: str = "cpu") -> tuple[int, object]:
    """(peak tensor memory allocated during `call` above what was live at its start in bytes,
    what `call` returned)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, result
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = call()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, result


def machine_description(device: str = "cpu") -> str:
    """One line: CPU model and cores (or the GPU), torch and transformers versions."""
    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        cpu = fields.get("Model name", cpu).strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    line = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    if torch.device(device).type == "cuda":
        line = f"{torch.cuda.get_device_name()} (host: {line})"
    return f"{line}; torch {torch.__version__}, transformers {transformers.__version__}"


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def megabytes(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f}"
