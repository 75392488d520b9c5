"""Runs in the vLLM virtual environment (.venv-vllm), started by tests/test_vllm.py.

    python tests/vllm_worker.py SPEC.json OUT.json

SPEC: {"repo": path, "cases": [{"name", "requests": [{"prompt", "images": [png paths],
"mm_processor_kwargs": {...} or null, optional "video_frames": [frames, height, width] (a random
video)}], "steps", optional "selection_cache_capacity": the Qwen model's selection cache
size during this case}], optional "count_vision_images": true}. Loads the repo once with vLLM
(one process, float32, greedy) and writes per case and request: the prompt token ids vLLM built,
the generated ids, each step's log-probability of the chosen token, (single-request cases) the
kept indices of the last encoder call (`model.last_pruning`), (with count_vision_images) how many
images went through the vision tower (`model.visual`) during the case, or the error text of a
rejected request.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def main(spec_path: str, out_path: str) -> None:
    import numpy as np
    from PIL import Image
    from vllm import LLM, SamplingParams

    spec = json.loads(open(spec_path).read())
    llm = LLM(
        model=spec["repo"],
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        limit_mm_per_prompt={"image": 4},
        seed=0,
        **spec.get("llm_kwargs", {}),
    )
    if spec.get("count_vision_images"):
        llm.apply_model(count_vision_images)
    results = []
    for case in spec["cases"]:
        params = SamplingParams(temperature=0.0, max_tokens=case["steps"], logprobs=0, ignore_eos=True)
        requests = []
        for request in case["requests"]:
            media = {"image": [Image.open(p).convert("RGB") for p in request["images"]]}
            if request.get("video_frames"):  # [frames, height, width] of a random RGB video
                frames, height, width = request["video_frames"]
                pixels = np.random.default_rng(0).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
                metadata = {"total_num_frames": frames, "fps": 2.0, "duration": frames / 2.0, "frames_indices": list(range(frames))}
                media["video"] = (pixels, metadata)  # decoded frames with their metadata, as vLLM's loader gives them
            data = {"prompt": request["prompt"], "multi_modal_data": media}
            if request.get("mm_processor_kwargs") is not None:
                data["mm_processor_kwargs"] = request["mm_processor_kwargs"]
            requests.append(data)
        capacity = case.get("selection_cache_capacity")
        if capacity is not None:
            default = llm.apply_model(lambda model: set_selection_cache_capacity(model, capacity))[0]
        images_before = llm.apply_model(lambda model: getattr(model, "vision_images", 0))[0]
        try:
            outputs = llm.generate(requests, params, use_tqdm=False)
        except Exception as error:  # a rejected request: report it, keep serving the next cases
            traceback.print_exc()
            results.append({"name": case["name"], "error": f"{type(error).__name__}: {error}"})
            continue
        finally:
            if capacity is not None:
                llm.apply_model(lambda model: set_selection_cache_capacity(model, default))
        entry = {"name": case["name"], "requests": []}
        if spec.get("count_vision_images"):
            entry["vision_images"] = llm.apply_model(lambda model: model.vision_images)[0] - images_before
        for output in outputs:
            completion = output.outputs[0]
            entry["requests"].append(
                {
                    "prompt_token_ids": list(output.prompt_token_ids),
                    "token_ids": list(completion.token_ids),
                    "logprobs": [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)],
                }
            )
        if len(case["requests"]) == 1:
            pruning = llm.apply_model(lambda model: model.last_pruning)[0]
            entry["keep_indices"] = [idx.tolist() for idx in pruning.keep_indices]
        results.append(entry)
    open(out_path, "w").write(json.dumps(results))


def count_vision_images(model) -> None:
    """Counts, in `model.vision_images`, the images each call of the vision tower receives (its grid rows)."""
    model.vision_images = 0

    def count(module, args, kwargs):
        model.vision_images += len(kwargs["grid_thw"] if "grid_thw" in kwargs else args[1])

    model.visual.register_forward_pre_hook(count, with_kwargs=True)


def set_selection_cache_capacity(model, capacity: int) -> int:
    """Sets the capacity of the model's selection cache, emptied; returns the previous capacity."""
    previous = model.selection_cache.capacity
    model.selection_cache.capacity = capacity
    model.selection_cache.entries.clear()
    return previous


if __name__ == "__main__":
    main(*sys.argv[1:3])
