"""Serving benchmark: vLLM's OpenAI-compatible server, the stock architecture vs MFPruner at the
paper's budgets, under N concurrent clients, the same weights, prompts and images.

    python tools/benchmark_vllm.py --output-dir benchmarks --docs docs/vllm.md     (cpu size, every family)
    python tools/benchmark_vllm.py --smoke                                          (toy size, seconds)

Run it with the vLLM environment's python (tools/setup_vllm_env.sh); the servers run with the same
python (`--vllm-python` to use another). Families, at the prefill benchmark's "cpu" geometry
(tools/benchmark_prefill.py: towers narrow and shallow, LLM 8 x 1024, the real token counts), random
weights, built once into a temporary folder with the tiny builders (mfpruner_lib.tiny_models):
  LLaVA-1.5    336 px images, 576 visual tokens; budgets 192 / 128 / 64 / 32
  Qwen2.5-VL   1024 x 1024 images, 1,369 visual tokens; keep-ratios 0.444 / 0.333 / 0.222
  Qwen3.5      1024 x 1024 images, 1,024 visual tokens; keep-ratios 0.444 / 0.333 / 0.222; bfloat16 (vLLM's
               CPU kernel of the Gated DeltaNet layers takes nothing else)

Per family two servers on 127.0.0.1, one after the other: "stock" (the repo's weights served as
vLLM's stock architecture via `hf_overrides`, no pruning) and "mfpruner" (the repo's architecture,
through mfpruner_vllm; the budget is sent per request, `--trust-request-mm-kwargs`). For every
setting and every N of `--clients`, N client threads send a fixed list of streaming chat requests
(one image + a question each, greedy, `--max-tokens` output tokens, EOS ignored); each image is
sent once per server and setting (no cache can serve a repeated one). Measured per (setting, N):
requests/s and output tokens/s over the wall time of the list, time to first token p50 / p95
(the first streamed chunk: vLLM sends it with the first generated token), prompt tokens and KV-cache
blocks per request (ceil((prompt + output tokens) / block size): the server's usage and the
block size its /metrics reports). Each budget's requests/s is compared with the stock one and with
the FLOPs-ideal prefill speed-up of the same geometry (mfpruner_lib.flops).

Run alone: the machine-load check of the prefill benchmark (mfpruner_lib.bench_utils) refuses to
write results when other processes were busy (`--force` writes them marked FORCED).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script (`python tools/benchmark_vllm.py`): the checkout's packages
    sys.path.append(str(ROOT))

from mfpruner_core import resolve_budget  # noqa: E402
from mfpruner_lib import bench_utils, flops  # noqa: E402
from mfpruner_lib.cli import ArgumentParser, refusals_as_errors  # noqa: E402
from tools.benchmark_prefill import (  # noqa: E402
    LLAVA_1_5_SIZES, QWEN3_5_SIZES, QWEN_RATIOS, QWEN_SIZES, paper_budgets, ratio_budgets,
)

SIZES = ("smoke", "cpu")
DEFAULTS = {  # clients, requests per client count, output tokens per request, the servers' context
    "cpu": dict(clients=[1, 4, 16], requests=[4, 8, 16], max_tokens=16, max_model_len=2048),
    "smoke": dict(clients=[1, 4, 16], requests=[2, 4, 16], max_tokens=4, max_model_len=512),
}
# The default cpu run on a quiet 2-core machine, estimated from the quiet prefill tables (vLLM's engine on
# one thread: about twice the 2-thread prefill) and a reduced run on a busy machine (docs/vllm.md).
EXPECTED_MINUTES = {"llava-1.5": 5, "qwen2.5-vl": 10, "qwen3.5": 4}
QUESTIONS = [
    "What is in the image? Answer in one short sentence.",
    "Describe the picture in detail: the colors, the objects and where they are.",
    "How many people are there, and what are they doing?",
    "Is there a dog or a cat in the picture? What color is the car?",
]
TARGET = dict(family="llava-1.5", setting=64, clients=16, pct_of_ideal=80.0)  # issue 25's target


# ----------------------------------------------------------------------------- the served models


def without_vocab(text: dict) -> dict:
    """The LLM sizes without the vocabulary: the repo keeps its tokenizer's 320 words, so random
    outputs stay decodable. The prefill is unchanged (the LM head reads one position); a 32,064-word
    head would add about a third to each decode step's weights (docs/vllm.md)."""
    return {name: value for name, value in text.items() if name != "vocab_size"}


def build_llava_1_5(folder: Path, size: str) -> Path:
    from mfpruner_lib.tiny_models import build_tiny_llava

    if size == "smoke":
        return build_tiny_llava(folder, hub_layout=True, text_heads=2)
    sizes = LLAVA_1_5_SIZES["cpu"]
    return build_tiny_llava(folder, hub_layout=True, image_size=sizes["vision"]["image_size"], vision=sizes["vision"],
                            text=without_vocab(sizes["text"]))


def build_qwen2_5_vl(folder: Path, size: str) -> Path:
    from mfpruner_lib.tiny_models import build_tiny_qwen2_5_vl

    if size == "smoke":
        return build_tiny_qwen2_5_vl(folder, text_heads=2)
    sizes = QWEN_SIZES["cpu"]
    return build_tiny_qwen2_5_vl(folder, max_pixels=flops.QWEN_MAX_PIXELS, vision=sizes["vision"],
                                 text=without_vocab(sizes["text"]))


def build_qwen3_5(folder: Path, size: str) -> Path:
    from mfpruner_lib.tiny_models import build_tiny_qwen3_5

    if size == "smoke":
        return build_tiny_qwen3_5(folder, linear_head_dim=64)  # vLLM's CPU kernel: 64- or 128-wide heads
    sizes = QWEN3_5_SIZES["cpu"]
    return build_tiny_qwen3_5(folder, max_pixels=flops.QWEN3_VL_MAX_PIXELS, vision=sizes["vision"],
                              text=without_vocab(sizes["text"]))


@dataclass
class ServedFamily:
    """One family: build(folder, size) -> an MFPruner repo; its stock architecture; the image size
    per benchmark size; budgets(num_visual_tokens) -> [(label, paper value, mm_processor_kwargs)];
    the servers' dtype unless `--dtype` says."""

    name: str
    build: object
    stock_architecture: str
    image_hw: dict
    budgets: object
    dtype: str = "float32"


def llava_budgets(num_visual_tokens: int) -> list[tuple[str, object, dict]]:
    return [(label, int(label.split()[0]), kwargs) for label, kwargs in paper_budgets(num_visual_tokens)]


def qwen_budgets(num_visual_tokens: int) -> list[tuple[str, object, dict]]:
    return [(label, kwargs["visual_token_ratio"], kwargs) for label, kwargs in ratio_budgets(QWEN_RATIOS)(num_visual_tokens)]


FAMILIES = {
    "llava-1.5": ServedFamily("LLaVA-1.5", build_llava_1_5, "LlavaForConditionalGeneration",
                              {"smoke": (84, 84), "cpu": (336, 336)}, llava_budgets),
    "qwen2.5-vl": ServedFamily("Qwen2.5-VL", build_qwen2_5_vl, "Qwen2_5_VLForConditionalGeneration",
                               {"smoke": (112, 112), "cpu": (1024, 1024)}, qwen_budgets),
    "qwen3.5": ServedFamily("Qwen3.5", build_qwen3_5, "Qwen3_5ForConditionalGeneration",
                            {"smoke": (256, 256), "cpu": QWEN3_5_SIZES["cpu"]["image_hw"]}, qwen_budgets, dtype="bfloat16"),
}


def picture(seed: int, image_hw: tuple[int, int]) -> str:
    """A smooth random picture (an upsampled 6 x 6 color grid) as a JPEG data URL."""
    import numpy as np
    from PIL import Image

    grid = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize(image_hw[::-1], Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_body(model: str, image_url: str, question: str, max_tokens: int, mm_kwargs: dict | None) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": question},
        ]}],
        "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }
    if mm_kwargs:
        body["mm_processor_kwargs"] = mm_kwargs
    return body


# ----------------------------------------------------------------------------- one server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """vLLM's OpenAI-compatible server on one repo, 127.0.0.1 only, stopped (and waited for) on exit."""

    def __init__(self, python: str, repo: Path, log: Path, args, stock_architecture: str | None, dtype: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            python, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(self.port),
            "--model", str(repo), "--dtype", dtype, "--enforce-eager", "--max-model-len", str(args.max_model_len),
            "--limit-mm-per-prompt", '{"image": 1}', "--trust-request-mm-kwargs",
            # every request is new: no prefix or processor cache may serve a part of it
            "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0",
        ]
        if stock_architecture:
            self.command += ["--hf-overrides", json.dumps({"architectures": [stock_architecture]})]
        self.command += args.server_arg
        self.env = {
            **os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gb), "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1",
        }
        if args.engine_threads is not None:  # vLLM's CPU engine otherwise leaves one core to the front-end
            self.env["OMP_NUM_THREADS"] = str(args.engine_threads)
        self.log = log

    def settings(self) -> list[str]:
        """The server's arguments that set what it serves and how (not where: no host, port, repo path)."""
        arguments = self.command[self.command.index("--model") + 2:]
        if "--hf-overrides" in arguments:  # the stock server's: the same settings otherwise
            at = arguments.index("--hf-overrides")
            arguments = arguments[:at] + arguments[at + 2:]
        return arguments

    def __enter__(self) -> "Server":
        self.log_file = self.log.open("w")
        self.process = subprocess.Popen(self.command, env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 900
        while True:
            if self.process.poll() is not None:
                tail = self.log.read_text()[-3000:]
                raise RuntimeError(f"the vLLM server exited ({self.process.returncode}); its log {self.log} ends:\n{tail}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the vLLM server did not start in 15 minutes; see {self.log}")
            time.sleep(1)
        with urllib.request.urlopen(self.url + "/v1/models") as response:
            self.model = json.loads(response.read())["data"][0]["id"]
        with urllib.request.urlopen(self.url + "/metrics") as response:
            metrics = response.read().decode()
        found = re.search(r'vllm:cache_config_info\{[^}]*block_size="(\d+)"', metrics)
        if found is None:
            raise RuntimeError("the server's /metrics has no vllm:cache_config_info block_size")
        self.block_size = int(found.group(1))
        return self

    def __exit__(self, *exc) -> None:
        self.cpu_s = bench_utils.process_tree_cpu_seconds(self.process.pid)  # the benchmark's own work
        self.process.terminate()
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log_file.close()


def stream_chat(port: int, body: dict) -> dict:
    """One streaming chat completion: seconds to the first chunk and to the end, the usage."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"the server answered {response.status}: {response.read()[:2000]!r}")
    first, usage = None, None
    for line in response:
        if not line.startswith(b"data: "):
            continue
        data = line[len(b"data: "):].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(f"the server failed a request: {chunk['error']}")
        if chunk.get("choices") and first is None:
            first = time.perf_counter() - start
        if chunk.get("usage"):
            usage = chunk["usage"]
    end = time.perf_counter() - start
    connection.close()
    if first is None or usage is None:
        raise RuntimeError("a streamed answer had no token or no usage")
    return {"ttft_s": first, "latency_s": end, "prompt_tokens": usage["prompt_tokens"],
            "output_tokens": usage["completion_tokens"]}


def run_clients(port: int, bodies: list[dict], clients: int) -> tuple[float, list[dict]]:
    """`clients` threads take the requests in order until none is left: (wall seconds, answers in request order)."""
    answers, errors, lock = [None] * len(bodies), [], threading.Lock()
    next_index = iter(range(len(bodies)))

    def client():
        while True:
            with lock:
                index = next(next_index, None)
            if index is None or errors:
                return
            try:
                answers[index] = stream_chat(port, bodies[index])
            except Exception as error:  # reported by the main thread
                errors.append(error)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start, answers


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linear between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def measure(server: Server, bodies: list[dict], clients: int) -> dict:
    wall, answers = run_clients(server.port, bodies, clients)
    ttft = [a["ttft_s"] for a in answers]
    return {
        "clients": clients, "requests": len(answers), "wall_s": wall,
        "requests_per_s": len(answers) / wall,
        "output_tokens_per_s": sum(a["output_tokens"] for a in answers) / wall,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
        "prompt_tokens": [a["prompt_tokens"] for a in answers],
        "output_tokens": [a["output_tokens"] for a in answers],
        "kv_blocks": [math.ceil((a["prompt_tokens"] + a["output_tokens"]) / server.block_size) for a in answers],
    }


# ----------------------------------------------------------------------------- one family


def progress(start: float, message: str) -> None:
    print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)


def run_family(key: str, args, folder: Path, start: float, monitor: bench_utils.LoadMonitor) -> dict:
    from transformers import AutoConfig

    family = FAMILIES[key]
    image_hw = family.image_hw[args.size]
    if args.model:
        repo = Path(args.model)
    else:
        progress(start, f"{family.name}: building the {args.size}-size repo (random weights)")
        repo = family.build(folder / key, args.size)
    config = AutoConfig.from_pretrained(repo, trust_remote_code=True)
    visual_tokens = flops.geometry(config, image_hw).visual_tokens
    budgets = family.budgets(visual_tokens)
    # one request list per client count, each image once; the same lists for every server and setting
    request_lists = {
        clients: [(picture(1000 * clients + i, image_hw), QUESTIONS[i % len(QUESTIONS)]) for i in range(count)]
        for clients, count in zip(args.clients, args.requests)
    }
    settings = [("stock", None, None, None)] + [("mfpruner", label, paper, kwargs) for label, paper, kwargs in budgets]
    rows, block_size = [], None
    dtype = args.dtype or family.dtype
    for variant in ("stock", "mfpruner"):
        stock = family.stock_architecture if variant == "stock" else None
        progress(start, f"{family.name}: starting the {variant} server")
        with Server(args.vllm_python, repo, folder / f"{key}-{variant}.log", args, stock, dtype) as server:
            block_size = server.block_size
            for name, label, paper, kwargs in (s for s in settings if s[0] == variant):
                # warm-up: two new images, not measured
                warm = [chat_body(server.model, picture(10**6 + i, image_hw), QUESTIONS[0], 2, kwargs) for i in range(2)]
                run_clients(server.port, warm, 2)
                for clients in args.clients:
                    bodies = [chat_body(server.model, url, question, args.max_tokens, kwargs)
                              for url, question in request_lists[clients]]
                    row = measure(server, bodies, clients)
                    kept = visual_tokens if kwargs is None else resolve_budget(
                        visual_tokens, kwargs.get("visual_token_budget"), kwargs.get("visual_token_ratio"))
                    row.update(variant=name, setting=label or "stock", paper_setting=paper, kept=kept)
                    rows.append(row)
                    progress(start, f"{family.name} {row['setting']} N={clients}: {row['requests_per_s']:.2f} req/s, "
                                    f"TTFT p95 {row['ttft_p95_s']:.2f} s")
        monitor.own_extra_s += server.cpu_s
    stock_rows = {r["clients"]: r for r in rows if r["variant"] == "stock"}
    text_tokens = round(statistics.mean(stock_rows[args.clients[0]]["prompt_tokens"])) - visual_tokens
    full = flops.prefill_flops(config, text_tokens, None, image_hw)
    for row in rows:
        reference = stock_rows[row["clients"]]
        pruned = flops.prefill_flops(config, text_tokens, row["kept"], image_hw) if row["variant"] != "stock" else full
        row["flops_ideal"] = full.total / pruned.total
        row["requests_per_s_ratio"] = row["requests_per_s"] / reference["requests_per_s"]
        row["pct_of_ideal"] = 100 * row["requests_per_s_ratio"] / row["flops_ideal"]
        row["ttft_p95_ratio"] = reference["ttft_p95_s"] / row["ttft_p95_s"]
        # the pruning shows in the prompt: the stock prompt minus the dropped visual tokens, request by request
        row["prompt_tokens_as_expected"] = row["prompt_tokens"] == [
            n - (visual_tokens - row["kept"]) for n in reference["prompt_tokens"]
        ]
    return {
        "key": key, "family": family.name, "size": args.size, "repo_config": describe_config(config),
        "image_hw": list(image_hw), "visual_tokens": visual_tokens, "text_tokens": text_tokens,
        "block_size": block_size, "kv_cache_gb": args.kv_cache_gb, "clients": args.clients, "requests": args.requests,
        "max_tokens": args.max_tokens, "engine_threads": args.engine_threads,
        "server_args": server.settings(), "rows": rows, "target": target_verdict(key, rows, args.clients),
    }


def describe_config(config) -> str:
    v, t = config.vision_config, config.text_config
    tower = getattr(v, "num_hidden_layers", None) or getattr(v, "depth", None)
    return (f"vision {tower} layers x {v.hidden_size}; LLM {t.num_hidden_layers} layers x {t.hidden_size} "
            f"(MLP {t.intermediate_size}, {t.num_attention_heads} heads, {t.num_key_value_heads} KV heads, "
            f"vocabulary {t.vocab_size})")


def target_verdict(key: str, rows: list[dict], clients: list[int]) -> dict | None:
    """Issue 25's target on LLaVA-1.5 at 64 tokens: requests/s ratio at N = 16 >= 80% of the FLOPs-ideal
    prefill ratio, and TTFT p95 better than stock at every N. Reported, never asserted."""
    if key != TARGET["family"]:
        return None
    at_budget = [r for r in rows if r["variant"] == "mfpruner" and r["paper_setting"] == TARGET["setting"]]
    at_n = [r for r in at_budget if r["clients"] == TARGET["clients"]]
    throughput = at_n[0]["pct_of_ideal"] >= TARGET["pct_of_ideal"] if at_n else None
    ttft = all(r["ttft_p95_ratio"] > 1 for r in at_budget)
    return {"throughput_met": throughput, "ttft_p95_met": ttft,
            "met": bool(throughput and ttft), "pct_of_ideal": at_n[0]["pct_of_ideal"] if at_n else None}


# ----------------------------------------------------------------------------- report


def markdown_report(result: dict) -> str:
    load = result.get("load")
    header = (
        f"### {result['family']} serving ({result['size']} size), vLLM OpenAI server, N concurrent clients\n\n"
        f"Model: {result['repo_config']}; random weights. One {result['image_hw'][0]}x{result['image_hw'][1]} image "
        f"({result['visual_tokens']} visual tokens) + about {result['text_tokens']} text tokens per request, "
        f"{result['max_tokens']} output tokens (greedy, EOS ignored); requests per N: "
        + ", ".join(f"{n}: {r}" for n, r in zip(result["clients"], result["requests"]))
        + f". KV-cache block size {result['block_size']} (the server's /metrics). "
        f"Machine: {result['machine']}. Server settings: `{' '.join(result['server_args'])}`, "
        f"env VLLM_CPU_KVCACHE_SPACE={result['kv_cache_gb']} VLLM_CPU_OMP_THREADS_BIND=nobind"
        + (f" OMP_NUM_THREADS={result['engine_threads']}" if result["engine_threads"] else "")
        + " (the stock server adds `--hf-overrides` "
        "with the stock architecture; the MFPruner rows send the budget per request)."
        + (f" {bench_utils.describe_load(bench_utils.MachineLoad(**load))}" if load else "")
        + "\n"
    )
    headers = ["setting", "kept / visual", "N", "prompt tokens", "KV blocks / request", "requests/s",
               "output tokens/s", "TTFT p50 ms", "TTFT p95 ms", "requests/s vs stock", "FLOPs-ideal prefill",
               "% of ideal", "TTFT p95 vs stock"]
    rows = []
    for r in result["rows"]:
        rows.append([
            r["setting"], f"{r['kept']} / {result['visual_tokens']}", r["clients"],
            f"{statistics.mean(r['prompt_tokens']):.0f}", f"{statistics.mean(r['kv_blocks']):.1f}",
            f"{r['requests_per_s']:.3f}", f"{r['output_tokens_per_s']:.1f}",
            f"{1e3 * r['ttft_p50_s']:.0f}", f"{1e3 * r['ttft_p95_s']:.0f}",
            f"{r['requests_per_s_ratio']:.2f}x", f"{r['flops_ideal']:.2f}x", f"{r['pct_of_ideal']:.0f}%",
            f"{r['ttft_p95_ratio']:.2f}x",
        ])
    text = header + "\n" + bench_utils.markdown_table(headers, rows) + "\n"
    if not all(r["prompt_tokens_as_expected"] for r in result["rows"]):
        text += "\nWARNING: some MFPruner prompts are not the stock prompts minus the dropped visual tokens.\n"
    target = result["target"]
    if target is not None:
        pct = (f"no N = {TARGET['clients']} row" if target["pct_of_ideal"] is None
               else f"{target['pct_of_ideal']:.0f}% of ideal at N = {TARGET['clients']}")
        text += (
            f"\nTarget (issue 25: at {TARGET['setting']} tokens the requests/s ratio at N = {TARGET['clients']} is at "
            f"least {TARGET['pct_of_ideal']:.0f}% of the FLOPs-ideal prefill ratio, and TTFT p95 improves at every N): "
            f"{'met' if target['met'] else 'NOT met'} ({pct}; TTFT p95 better at every N: "
            f"{'yes' if target['ttft_p95_met'] else 'no'}).\n"
        )
    return text


def server_versions(python: str) -> str:
    """The server python's vLLM distribution (vllm or vllm-cpu), transformers and torch, with versions."""
    code = ("import importlib.metadata as m; names = m.packages_distributions(); "
            "print(', '.join(f'{d} {m.version(d)}' for d in (names['vllm'][0], 'transformers', 'torch')))")
    return "server: " + subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def positive_ints(text: str, name: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"`{name}` must be a comma-separated list of positive integers, got {text!r}")
    return values


@refusals_as_errors
def main(argv=None) -> list[dict]:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES), help="repeatable; default: all")
    parser.add_argument("--size", choices=SIZES, default="cpu")
    parser.add_argument("--smoke", action="store_true", help="toy models, few short requests: seconds (the test)")
    parser.add_argument("--clients", help="concurrent clients, comma-separated (default 1,4,16)")
    parser.add_argument("--requests", help="requests sent at each client count, comma-separated (cpu default 4,8,16)")
    parser.add_argument("--max-tokens", type=int, help="output tokens per request (cpu default 16)")
    parser.add_argument("--max-model-len", type=int, help="the servers' context (cpu default 2048)")
    parser.add_argument("--kv-cache-gb", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE of each server")
    parser.add_argument("--engine-threads", type=int,
                        help="OMP_NUM_THREADS of each server (default: vLLM's choice, all cores but one on CPU)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="the servers' dtype (default: float32; Qwen3.5 bfloat16, the only one vLLM's CPU "
                             "Gated DeltaNet kernel takes)")
    parser.add_argument("--model", help="serve this MFPruner repo (one --family, its images) instead of building one")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for every server (repeatable), e.g. --server-arg=--max-num-seqs=32")
    parser.add_argument("--vllm-python", default=sys.executable, help="the python that runs the servers")
    parser.add_argument("--output-dir", help="write vllm_serving_<family>_<size>.md / .json here")
    parser.add_argument("--docs", help="also write each table into this page between the markers "
                        "<!-- BEGIN vllm serving FAMILY SIZE --> / <!-- END ... --> (docs/vllm.md)")
    bench_utils.add_load_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.size = "smoke"
    defaults = DEFAULTS[args.size]
    args.clients = positive_ints(args.clients, "--clients") if args.clients else defaults["clients"]
    args.requests = positive_ints(args.requests, "--requests") if args.requests else defaults["requests"]
    args.max_tokens = defaults["max_tokens"] if args.max_tokens is None else args.max_tokens
    args.max_model_len = defaults["max_model_len"] if args.max_model_len is None else args.max_model_len
    if len(args.requests) != len(args.clients):
        raise ValueError(f"`--requests` needs one count per client count {args.clients}, got {args.requests}")
    if any(r < n for r, n in zip(args.requests, args.clients)):
        raise ValueError(f"`--requests` must be at least the clients at each N ({args.clients}), got {args.requests}")
    if args.max_tokens < 1 or args.max_model_len < 1 or args.kv_cache_gb < 1:
        raise ValueError("`--max-tokens`, `--max-model-len` and `--kv-cache-gb` must be >= 1")
    if args.engine_threads is not None and args.engine_threads < 1:
        raise ValueError(f"`--engine-threads` must be >= 1, got {args.engine_threads}")
    if args.model and (not args.family or len(args.family) != 1 or not Path(args.model, "config.json").is_file()):
        raise ValueError("`--model` needs one `--family` and an MFPruner repo folder (with config.json), "
                         f"got {args.model!r} with families {args.family}")
    if not Path(args.vllm_python).exists():
        raise ValueError(f"`--vllm-python` {args.vllm_python!r} does not exist (tools/setup_vllm_env.sh builds one)")

    keys = args.family or list(FAMILIES)
    machine = f"{bench_utils.machine_description()}; {server_versions(args.vllm_python)}"
    if args.size == "cpu" and not args.model and args.clients == defaults["clients"] and args.requests == defaults["requests"]:
        print(f"Expected duration: about {sum(EXPECTED_MINUTES[key] for key in keys)} minutes on a quiet 2-core "
              "machine, most of it the Qwen prefills (progress below).", flush=True)
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for key in keys:
            monitor = bench_utils.LoadMonitor()
            with monitor as load:
                result = run_family(key, args, Path(folder), start, monitor)
            busy = None
            try:
                bench_utils.check_quiet(load, args.force, args.max_load, args.max_other_cores)
            except bench_utils.MachineBusy as error:
                busy = error
            result.update(machine=machine, load=bench_utils.load_record(load))
            results.append(result)
            report = markdown_report(result)
            print(report, flush=True)
            if busy is not None:  # the table is printed for a look, never written
                raise busy
            if args.docs:
                bench_utils.write_between_markers(args.docs, f"vllm serving {key} {args.size}", report)
            if args.output_dir:
                out = Path(args.output_dir)
                out.mkdir(parents=True, exist_ok=True)
                (out / f"vllm_serving_{key}_{args.size}.md").write_text(report)
                (out / f"vllm_serving_{key}_{args.size}.json").write_text(json.dumps(result, indent=2) + "\n")
    progress(start, "done")
    return results


if __name__ == "__main__":
    main()
