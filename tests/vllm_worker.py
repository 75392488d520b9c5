"""Runs in the vLLM virtual environment (.venv-vllm), started by tests/test_vllm.py.

    python tests/vllm_worker.py SPEC.json OUT.json

SPEC: {"repo": path, "cases": [{"name", "requests": [{"prompt", "images": [png paths],
"mm_processor_kwargs": {...} or null, optional "videos": [{"path": .npy of (T, H, W, 3) uint8
frames, "fps"}], optional "video_frames": [frames, height, width] (a random video at 2 fps)}],
"steps", optional "selection_cache_capacity": the Qwen model's selection cache size during
this case, optional "record_mrope_positions": true (a Qwen single-request case that keeps every
token)}], optional "count_vision_images": true, optional "dtype" (default "float32")}. Loads the
repo once with vLLM (one process, greedy) and writes per case and request: the prompt token ids vLLM built, the generated
ids, each step's log-probability of the chosen token, (single-request cases) the kept indices of
the case's encoder calls (`model.last_pruning` after each; vLLM calls the encoder per modality, so
an image-then-video prompt lists the image's, then the video's), (with count_vision_images) how
many images / videos went through the vision tower (`model.visual`) during the case, (with
record_mrope_positions) the M-RoPE positions the model gave the prompt and those its stock parent
class gives the same prompt, or the error text of a rejected request.
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
        dtype=spec.get("dtype", "float32"),
        enforce_eager=True,
        max_model_len=512,
        limit_mm_per_prompt={"image": 4, "video": 2},
        seed=0,
        **spec.get("llm_kwargs", {}),
    )
    if spec.get("count_vision_images"):
        llm.apply_model(count_vision_images)
    llm.apply_model(record_encoder_calls)
    results = []
    for case in spec["cases"]:
        params = SamplingParams(temperature=0.0, max_tokens=case["steps"], logprobs=0, ignore_eos=True)
        requests = []
        for request in case["requests"]:
            media = {"image": [Image.open(p).convert("RGB") for p in request["images"]]}
            videos = [(np.load(video["path"]), video["fps"]) for video in request.get("videos", [])]
            if request.get("video_frames"):  # [frames, height, width] of a random RGB video
                frames, height, width = request["video_frames"]
                videos.append((np.random.default_rng(0).integers(0, 256, (frames, height, width, 3), dtype=np.uint8), 2.0))
            if videos:  # decoded frames with their metadata, as vLLM's loader gives them
                media["video"] = [(frames, video_metadata(len(frames), fps)) for frames, fps in videos]
            data = {"prompt": request["prompt"], "multi_modal_data": media}
            if request.get("mm_processor_kwargs") is not None:
                data["mm_processor_kwargs"] = request["mm_processor_kwargs"]
            requests.append(data)
        capacity = case.get("selection_cache_capacity")
        if capacity is not None:
            default = llm.apply_model(lambda model: set_selection_cache_capacity(model, capacity))[0]
        images_before = llm.apply_model(lambda model: getattr(model, "vision_images", 0))[0]
        llm.apply_model(lambda model: model.encoder_calls.clear())
        if case.get("record_mrope_positions"):
            llm.apply_model(record_mrope_positions)
        try:
            outputs = llm.generate(requests, params, use_tqdm=False)
        except Exception as error:  # a rejected request: report it, keep serving the next cases
            traceback.print_exc()
            results.append({"name": case["name"], "error": f"{type(error).__name__}: {error}"})
            continue
        finally:
            if capacity is not None:
                llm.apply_model(lambda model: set_selection_cache_capacity(model, default))
            if case.get("record_mrope_positions"):  # the class's method again
                llm.apply_model(lambda model: delattr(model, "get_mrope_input_positions"))
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
            calls = llm.apply_model(lambda model: model.encoder_calls)[0]
            entry["keep_indices"] = [idx.tolist() for pruning in calls for idx in pruning.keep_indices]
            if case.get("record_mrope_positions"):
                entry["mrope_positions"], entry["stock_mrope_positions"] = llm.apply_model(lambda model: model.mrope_positions)[0]
        results.append(entry)
    open(out_path, "w").write(json.dumps(results))


def count_vision_images(model) -> None:
    """Counts, in `model.vision_images`, the images each call of the vision tower receives (its grid rows)."""
    model.vision_images = 0

    def count(module, args, kwargs):
        model.vision_images += len(kwargs["grid_thw"] if "grid_thw" in kwargs else args[1])

    model.visual.register_forward_pre_hook(count, with_kwargs=True)


def video_metadata(frames: int, fps: float) -> dict:
    """What vLLM's video loader returns with the frames: every frame kept, at `fps`."""
    return {"total_num_frames": frames, "fps": fps, "duration": frames / fps, "frames_indices": list(range(frames))}


def record_encoder_calls(model) -> None:
    """Appends `model.last_pruning` to `model.encoder_calls` after each `embed_multimodal` call
    (on this instance: vLLM calls it per modality, so a prompt with an image and a video makes two)."""
    model.encoder_calls = []
    embed = model.embed_multimodal

    def embed_and_record(**kwargs):
        embeddings = embed(**kwargs)
        model.encoder_calls.append(model.last_pruning)
        return embeddings

    model.embed_multimodal = embed_and_record


def record_mrope_positions(model) -> None:
    """Until removed, keeps in `model.mrope_positions` the last prompt's M-RoPE positions, the
    model's and its stock parent class's for the same prompt (the stock method expects every
    visual token: only for prompts that keep them all)."""
    ours, stock = model.get_mrope_input_positions, super(type(model), model).get_mrope_input_positions

    def ours_and_stock(input_tokens, mm_features):
        result = ours(input_tokens, mm_features)
        model.mrope_positions = (result[0].tolist(), stock(input_tokens, mm_features)[0].tolist())
        return result

    model.get_mrope_input_positions = ours_and_stock


def set_selection_cache_capacity(model, capacity: int) -> int:
    """Sets the capacity of the model's selection cache, emptied; returns the previous capacity."""
    previous = model.selection_cache.capacity
    model.selection_cache.capacity = capacity
    model.selection_cache.entries.clear()
    return previous


if __name__ == "__main__":
    main(*sys.argv[1:3])
