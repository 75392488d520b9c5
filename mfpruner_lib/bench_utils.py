"""What the benchmark scripts share: interleaved timing (min / median / max), peak memory, the
machine and how busy it was, tables, and generated sections of docs pages.

Busy machine: a run records the load average before and after, the CPU time that OTHER
processes used in a short sample right before the run and while it ran (from /proc/stat minus this
process's own CPU time: an exact figure, not a decaying average). When they say the machine was
busy, the scripts refuse to write their result files (`MachineBusy`, naming the figure and the
threshold); `--force` writes them anyway, marked as forced in the header and the JSON. A high load
average alone is not "busy" when the sample before the run shows idle cores: the 1-minute average
still remembers the previous benchmark for minutes after it ended.

Peak memory is the highest amount of tensor memory allocated DURING a call above what was live
when it started (weights and inputs excluded): on CUDA from the allocator's peak counter; on CPU
from the allocation / free events that the torch profiler records (`profile_memory=True`), summed
in time order. Both count torch tensors only (not the Python heap, not allocator caching).
"""

from __future__ import annotations

import os
import re
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

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


def spread(values: list[float]) -> dict[str, float]:
    """{"min", "median", "max"} of the samples."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def ms_spread(values: list[float]) -> str:
    """'median (min-max)' in milliseconds, for tables."""
    s = spread(values)
    return f"{1e3 * s['median']:.1f} ({1e3 * s['min']:.1f}-{1e3 * s['max']:.1f})"


# ----------------------------------------------------------------------------- how busy the machine is


class MachineBusy(RuntimeError):
    """The machine was busy during a benchmark: its results are not written (use --force)."""


def cpu_busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (/proc/stat, all CPUs); None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds this process (all its threads) has used."""
    times = os.times()
    return times.user + times.system


@dataclass
class MachineLoad:
    """How busy the machine was around one benchmark run.

    load_before / load_after: the 1-minute load average right before and after the run (after
    includes the benchmark's own threads). other_cores_before: the mean number of CPU cores other
    processes kept busy in a short sample right before the run; other_cores: the same during the
    run (None where /proc/stat is missing); steal counts as busy.
    """

    load_before: float
    load_after: float | None = None
    other_cores_before: float | None = None
    other_cores: float | None = None
    wall_s: float | None = None
    cores: int = os.cpu_count() or 1
    forced: bool = False
    busy: str | None = None  # why the run counts as busy, None when quiet


def cpu_snapshot() -> tuple[float, float | None, float]:
    """(wall clock, all processes' busy CPU seconds or None off Linux, this process's CPU seconds)."""
    return time.perf_counter(), cpu_busy_seconds(), own_cpu_seconds()


def other_cores_since(start: tuple[float, float | None, float], own_extra_s: float = 0.0) -> tuple[float, float | None]:
    """(wall seconds since the `cpu_snapshot` `start`, the mean number of CPU cores OTHER processes
    kept busy meanwhile: None off Linux or when no time passed). own_extra_s: CPU seconds of the
    benchmark's own child processes (servers), not other processes' either."""
    wall, busy, own = cpu_snapshot()
    elapsed = wall - start[0]
    if busy is None or start[1] is None or elapsed <= 0:
        return elapsed, None
    return elapsed, max(0.0, ((busy - start[1]) - (own - start[2]) - own_extra_s) / elapsed)


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU seconds a process and all its live descendants have used, with the children each has
    waited for (/proc; 0.0 off Linux). Read it before stopping a server: a process that exits is
    counted in its parent only when the parent waits for it, which a server's engine processes do
    not always get."""
    parents, cpu = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        process = int(stat.parent.name)
        parents[process] = int(fields[1])
        cpu[process] = sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime
    tree, frontier = set(), [pid]
    while frontier:
        process = frontier.pop()
        tree.add(process)
        frontier += [child for child, parent in parents.items() if parent == process and child not in tree]
    return sum(cpu.get(process, 0.0) for process in tree)


def other_cores_now(sample_s: float) -> float | None:
    """Mean CPU cores that other processes keep busy over the next `sample_s` seconds (this process
    sleeps meanwhile); None off Linux."""
    start = cpu_snapshot()
    time.sleep(sample_s)
    return other_cores_since(start)[1]


class LoadMonitor:
    """Measures how busy the machine is right before (a `sample_s` sample) and while the benchmark
    runs:

        with LoadMonitor() as load: ...run...
        # load: MachineLoad, filled in on exit
    """

    def __init__(self, sample_s: float = 2.0):
        self.sample_s = sample_s
        self.own_extra_s = 0.0  # add the CPU seconds of the benchmark's own servers (process_tree_cpu_seconds)

    def __enter__(self) -> MachineLoad:
        self.load = MachineLoad(load_before=os.getloadavg()[0])
        if self.sample_s > 0:
            self.load.other_cores_before = other_cores_now(self.sample_s)
        self._start = cpu_snapshot()
        return self.load

    def __exit__(self, *exc) -> None:
        self.load.wall_s, self.load.other_cores = other_cores_since(self._start, self.own_extra_s)
        self.load.load_after = os.getloadavg()[0]


DEFAULT_MAX_OTHER_CORES = 0.25


def default_max_load(cores: int | None = None) -> float:
    """Busy threshold of the 1-minute load average BEFORE a run: 0.75 x cores (1.5 on 2 cores)."""
    return 0.75 * (cores or os.cpu_count() or 1)


def busy_reason(load: MachineLoad, max_load: float, max_other_cores: float = DEFAULT_MAX_OTHER_CORES) -> str | None:
    """Why this run counts as busy (None: quiet). Busy when other processes used more than
    `max_other_cores` cores right before or during the run; without a sample before the run (no
    /proc/stat), when the load average before it was above `max_load`. A load average above
    `max_load` with idle cores in the sample is the decaying memory of an earlier run: not busy."""
    reasons = []
    if load.other_cores_before is not None:
        if load.other_cores_before > max_other_cores:
            reasons.append(
                f"other processes used {load.other_cores_before:.2f} CPU cores right before the run "
                f"> threshold {max_other_cores:.2f}"
            )
    elif load.load_before > max_load:
        reasons.append(f"load average before the run {load.load_before:.2f} > threshold {max_load:.2f}")
    if load.other_cores is not None and load.other_cores > max_other_cores:
        reasons.append(
            f"other processes used {load.other_cores:.2f} CPU cores during the run > threshold {max_other_cores:.2f}"
        )
    return "; ".join(reasons) or None


def check_quiet(load: MachineLoad, force: bool, max_load: float | None = None,
                max_other_cores: float = DEFAULT_MAX_OTHER_CORES) -> MachineLoad:
    """Sets load.busy / load.forced; raises MachineBusy (results must not be written) when the
    run was busy and not forced."""
    load.busy = busy_reason(load, default_max_load(load.cores) if max_load is None else max_load, max_other_cores)
    load.forced = bool(force and load.busy)
    if load.busy and not force:
        raise MachineBusy(
            f"the machine was busy: {load.busy}. No result files written; re-run when it is quiet "
            "(the lead runs benchmarks alone), or pass --force to write them marked as forced."
        )
    return load


def describe_load(load: MachineLoad) -> str:
    """One sentence for report headers."""
    def cores(value):
        return "n/a" if value is None else f"{value:.2f}"

    text = (
        f"Load average (1 min) {load.load_before:.2f} before, {load.load_after:.2f} after "
        f"({load.cores} cores); other processes' CPU right before the run: {cores(load.other_cores_before)} "
        f"cores, during it: {cores(load.other_cores)} cores."
    )
    if load.forced:
        text += f" FORCED: written although the machine was busy ({load.busy}); do not publish."
    return text


def load_record(load: MachineLoad) -> dict:
    return asdict(load)


def add_load_arguments(parser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="write result files even when the machine was busy (marked as forced)")
    parser.add_argument("--max-load", type=float, default=None,
                        help="without /proc/stat: busy above this 1-minute load average before the run "
                             "(default: 0.75 x cores)")
    parser.add_argument("--max-other-cores", type=float, default=DEFAULT_MAX_OTHER_CORES,
                        help="busy when other processes used more CPU cores than this right before (a 2 s "
                             "sample) or during the run")


# ----------------------------------------------------------------------------- random model inputs


def vision_attention_inputs(attn, length: int, generator, device, dtype: torch.dtype):
    """Random inputs of one Qwen2.5-VL vision attention module `attn` over `length` patches in one
    segment: hidden states (S, C) in `dtype`, cu_seqlens [0, S] and rotary (cos, sin), each
    (S, Dh). For timing: the cost does not depend on the values."""
    hidden = torch.randn(length, attn.dim, generator=generator).to(device, dtype)
    angles = torch.rand(length, attn.head_dim // 2, generator=generator) * length**0.5
    emb = torch.cat([angles, angles], dim=-1).to(device)
    cu_seqlens = torch.tensor([0, length], dtype=torch.int32, device=device)
    return hidden, cu_seqlens, (emb.cos(), emb.sin())


# ----------------------------------------------------------------------------- generated docs sections


def marker_lines(key: str) -> tuple[str, str]:
    if not key or "--" in key or "\n" in key:
        raise ValueError(f"a docs section key must be a non-empty single line without '--', got {key!r}")
    return f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"


def write_between_markers(path: str | Path, key: str, content: str) -> None:
    """Puts `content` between `<!-- BEGIN key -->` and `<!-- END key -->` in the page at `path`,
    leaving everything outside the markers byte for byte as it was. A page without that section
    gets it appended (a missing page is created). Broken markers (one without the other, or
    repeated) are an error, never guessed at."""
    begin, end = marker_lines(key)
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    starts = [m.start() for m in re.finditer(re.escape(begin), text)]
    ends = [m.start() for m in re.finditer(re.escape(end), text)]
    block = f"{begin}\n<!-- generated by the benchmark scripts: do not edit by hand -->\n{content.strip()}\n{end}"
    if not starts and not ends:
        separator = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        text = f"{text}{separator}{block}\n"
    elif len(starts) == 1 and len(ends) == 1 and starts[0] < ends[0]:
        text = text[: starts[0]] + block + text[ends[0] + len(end):]
    else:
        raise ValueError(f"{path}: markers for {key!r} are broken ({len(starts)} BEGIN, {len(ends)} END); fix by hand")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


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
