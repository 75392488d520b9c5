"""lmms-eval harness: the `mfpruner` model through the stock CLI and Python API, offline.

Runs in the eval environment (.venv-eval, built by tools/setup_eval_env.sh; .ci/run runs this
file there). The main environment has no lmms-eval and skips the file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval runs in .venv-eval: bash tools/setup_eval_env.sh")

from conftest import random_image  # noqa: E402

TASKS_SRC = Path(__file__).parent / "eval_tasks"
BUDGET = 5  # not the tiny repo's own budget (8), so the run proves model_args reach the model
TOKENS_PER_IMAGE = 36


# ----------------------------------------------------------------------------- local tasks


def write_rows(path: Path, rows: dict):
    from datasets import Dataset, Features, Image, Sequence, Value

    features = {"image": Image(), "question": Value("string")}
    for key, values in rows.items():
        if key in features:
            continue
        if isinstance(values[0], list):
            features[key] = Sequence(Value("string"))
        else:
            features[key] = Value("int64") if isinstance(values[0], int) else Value("string")
    Dataset.from_dict(rows, features=Features(features)).to_parquet(str(path))


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    """The task YAMLs plus their local rows; tiny_pope includes lmms-eval's own pope.yaml."""
    folder = tmp_path_factory.mktemp("eval_tasks")
    for name in ("utils.py", "tiny_vqa.yaml", "tiny_mc.yaml"):
        shutil.copy(TASKS_SRC / name, folder / name)
    questions = ["What color is the car?", "Is there a dog?", "How many people are there?", "What is in the image?"]
    sizes = [(96, 80), (104, 80), (112, 80), (60, 120)]  # the tall one: another LLaVA-NeXT tile grid
    images = [random_image(seed, size=size) for seed, size in enumerate(sizes)]
    write_rows(folder / "tiny_vqa.parquet", {"image": images, "question": questions, "answer": ["blue", "yes", "two", "cat"]})
    write_rows(
        folder / "tiny_mc.parquet",
        {
            "image": images[:3],
            "question": questions[:3],
            "choices": [["red", "blue", "green"], ["yes", "no"], ["one", "two", "three"]],
            "label": [1, 0, 1],
        },
    )
    write_rows(
        folder / "tiny_pope.parquet",
        {
            "image": images[:3],
            "question": ["Is there a dog in the image?", "Is there a car in the image?", "Is there a cat in the image?"],
            "answer": ["yes", "no", "yes"],
            "question_id": ["0", "1", "2"],
            "category": ["adversarial", "popular", "random"],
        },
    )
    pope_yaml = Path(lmms_eval.__file__).parent / "tasks" / "pope" / "pope.yaml"
    (folder / "tiny_pope.yaml").write_text(
        f"include: {pope_yaml}\n"
        "task: tiny_pope\n"
        "dataset_path: parquet\n"
        "dataset_kwargs:\n  data_files:\n    test: tiny_pope.parquet\n"
        "test_split: test\n"
        "generation_kwargs:\n  max_new_tokens: 2\n  temperature: 0\n  do_sample: false\n"
    )
    return folder


@pytest.fixture()
def offline_env(task_dir, tmp_path, monkeypatch):
    """Offline, with datasets' cache in a temporary folder, working in the task folder."""
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(task_dir)
    return {**os.environ, **env}


# ----------------------------------------------------------------------------- registration


def test_entry_point_registers_mfpruner_chat_and_simple():
    from lmms_eval.models import get_model, get_model_manifest

    from mfpruner_eval.model import MFPrunerChatLMM, MFPrunerLMM

    manifest = get_model_manifest("mfpruner")
    assert manifest.chat_class_path == "mfpruner_eval.model.MFPrunerChatLMM"
    assert get_model("mfpruner") is MFPrunerChatLMM
    assert get_model("mfpruner", force_simple=True) is MFPrunerLMM


# ----------------------------------------------------------------------------- stock CLI, end to end


def run_cli(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).parent / "lmms-eval"
    return subprocess.run([str(cli), "eval", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def read_results(output: Path) -> dict:
    files = sorted(output.rglob("*_results.json"))
    assert files, f"no results JSON under {output}"
    return json.loads(files[-1].read_text())


def test_cli_chat_generation_and_pope_include_offline(llava_repo, task_dir, offline_env, tmp_path):
    output = tmp_path / "out"
    result = run_cli(
        [
            "--model", "mfpruner",
            "--model_args", f"pretrained={llava_repo},visual_token_budget={BUDGET},device=cpu",
            "--tasks", "tiny_vqa,tiny_pope",
            "--include_path", str(task_dir),
            "--batch_size", "2",
            "--output_path", str(output),
            "--log_samples",
        ],
        offline_env,
        task_dir,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    results = read_results(output)["results"]
    assert 0.0 <= results["tiny_vqa"]["accuracy,none"] <= 1.0
    for metric in ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio"):
        assert f"{metric},none" in results["tiny_pope"]
    samples = sorted(output.rglob("*_samples_tiny_pope.jsonl"))
    assert samples and len(samples[-1].read_text().splitlines()) == 3  # every local row was answered


def test_cli_rejects_bad_model_args_before_any_sample(llava_repo, task_dir, offline_env, tmp_path):
    result = run_cli(
        [
            "--model", "mfpruner",
            "--model_args", f"pretrained={llava_repo},visual_token_budgt=8",
            "--tasks", "tiny_vqa",
            "--include_path", str(task_dir),
            "--output_path", str(tmp_path / "out"),
        ],
        offline_env,
        task_dir,
    )
    # lmms-eval 0.7.3's CLI logs an evaluation error and still exits 0 (unless --verbosity DEBUG),
    # so what counts is the message, no sample run and no results file (tools/lmms_eval_tables.py
    # fails a run that wrote no results).
    log = result.stdout + result.stderr
    assert "unknown model_args ['visual_token_budgt']" in log
    assert "mfpruner generate" not in log
    assert not list((tmp_path / "out").rglob("*.json"))


# ----------------------------------------------------------------------------- Python API + LM hook


def evaluate_with_lm_hook(model_args: str, tasks: list[str], task_dir: Path, batch_size: int = 2):
    """simple_evaluate on the simple class. Returns (results, the language model's prefill length
    per row in call order, the model's `last_pruning` at each of those calls)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    lm = get_model("mfpruner", force_simple=True).create_from_arg_string(model_args, {"batch_size": batch_size})
    rows, prunings = [], []

    def record(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.shape[1] > 1:  # a prefill or a scoring forward, not a decode step
            mask = kwargs.get("attention_mask")  # None: stock generate() dropped an all-ones mask
            rows.extend(mask.sum(-1).tolist() if mask is not None else [embeds.shape[1]] * len(embeds))
            prunings.append(getattr(lm.model, "last_pruning", None))

    handle = lm.model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        output = simple_evaluate(
            model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(task_dir)), bootstrap_iters=0
        )
    finally:
        handle.remove()
    return output["results"], rows, prunings


def test_language_model_receives_pruned_length_generation_and_loglikelihood(llava_repo, task_dir, offline_env):
    tasks = ["tiny_vqa", "tiny_mc"]
    pruned_results, pruned, _ = evaluate_with_lm_hook(
        f"pretrained={llava_repo},visual_token_budget={BUDGET},device=cpu", tasks, task_dir
    )
    full_results, full, _ = evaluate_with_lm_hook(f"pretrained={llava_repo},prune_visual_tokens=False,device=cpu", tasks, task_dir)
    # 4 generation prompts + 8 scored choices, one image each: every row lost exactly 36 - BUDGET tokens
    assert len(pruned) == len(full) == 4 + 8
    assert sorted(length + TOKENS_PER_IMAGE - BUDGET for length in pruned) == sorted(full)
    for results in (pruned_results, full_results):
        assert 0.0 <= results["tiny_vqa"]["accuracy,none"] <= 1.0
        assert 0.0 <= results["tiny_mc"]["acc,none"] <= 1.0


def test_llava_next_language_model_receives_pruned_length(llava_next_repo, task_dir, offline_env):
    """LLaVA-NeXT (anyres: the token count depends on the image size) through the same tasks.
    One row per call, in the same order in both runs (same prompts, same sort), so the unpruned
    run gives each row's full length: it must shrink by exactly the pruned patch tokens, and each
    image keeps BUDGET patch tokens plus its row-closing newlines (kept outside the budget)."""
    from mfpruner_core import LAYOUT_NEWLINE

    tasks = ["tiny_vqa", "tiny_mc"]
    pruned_results, pruned, prunings = evaluate_with_lm_hook(
        f"pretrained={llava_next_repo},visual_token_budget={BUDGET},device=cpu", tasks, task_dir, batch_size=1
    )
    full_results, full, _ = evaluate_with_lm_hook(
        f"pretrained={llava_next_repo},prune_visual_tokens=False,device=cpu", tasks, task_dir, batch_size=1
    )
    assert len(pruned) == len(full) == len(prunings) == 4 + 8
    sizes = set()
    for pruned_length, full_length, pruning in zip(pruned, full, prunings):
        (keep,), (layout,), (tokens,) = pruning.keep_indices, pruning.layouts, pruning.num_visual_tokens
        is_newline = layout[:, 0] == LAYOUT_NEWLINE
        assert int((~is_newline[keep]).sum()) == BUDGET and bool(is_newline[keep].sum() == is_newline.sum())
        assert full_length - pruned_length == tokens - len(keep)
        sizes.add(tokens)
    assert len(sizes) > 1  # the task images differ in size, hence in visual token count
    for results in (pruned_results, full_results):
        assert 0.0 <= results["tiny_vqa"]["accuracy,none"] <= 1.0
        assert 0.0 <= results["tiny_mc"]["acc,none"] <= 1.0


@pytest.mark.parametrize("repo_fixture", ["llava_repo", "llava_next_repo"])
def test_ratio_and_single_cue_reach_the_model(repo_fixture, request, offline_env):
    from lmms_eval.models import get_model

    repo = request.getfixturevalue(repo_fixture)
    lm = get_model("mfpruner").create_from_arg_string(f"pretrained={repo},visual_token_ratio=0.25,mfpruner_cues=attention,device=cpu")
    assert lm.model.config.visual_token_ratio == 0.25 and lm.model.config.visual_token_budget is None
    assert lm.model.config.mfpruner_cues == ["attention"]


def chat_requests(lm, images: list, question: str) -> list:
    """Chat-class generate_until requests, one per image, over a one-split task set on `lm`."""
    from lmms_eval.api.instance import Instance

    lm.task_dict = {"t": {"test": [{"image": image} for image in images]}}
    messages = lambda doc: [{"role": "user", "content": [{"type": "image", "url": doc["image"]}, {"type": "text", "text": question}]}]  # noqa: E731
    return [
        Instance("generate_until", ("", messages, {"max_new_tokens": 2}, i, "t", "test"), idx=0,
                 metadata={"task": "t", "doc_id": i, "repeats": 1})
        for i in range(len(images))
    ]


def test_exported_repo_with_clip_processor_drives_the_papers_relevance_cue(tmp_path, offline_env):
    """An exported repo (tools.export) with a CLIP text tower: its processor's CLIP inputs reach the
    model through the adapter (relevance_source=clip_text raises without them)."""
    from lmms_eval.models import get_model

    from tools.export import export
    from mfpruner_lib.tiny_models import build_tiny_clip, build_tiny_llava, rewrite_as_hub_layout

    base = rewrite_as_hub_layout(build_tiny_llava(tmp_path / "base", stock=True))
    clip = build_tiny_clip(tmp_path / "clip", vision_from=base)
    repo = export(str(base), tmp_path / "repo", budget=5, clip_text=str(clip), base_model="llava-hf/llava-1.5-7b-hf")
    lm = get_model("mfpruner").create_from_arg_string(
        f"pretrained={repo},relevance_source=clip_text,device=cpu", {"batch_size": 2}
    )
    requests = chat_requests(lm, [random_image(seed) for seed in range(2)], "What color is the car?")
    assert len(lm.generate_until(requests)) == 2
    assert [len(k) for k in lm.model.last_pruning.keep_indices] == [5, 5]
    assert "relevance" in lm.model.last_pruning.cue_scores


def test_llava_next_chat_batch_of_different_image_sizes(llava_next_repo, offline_env):
    """The chat class on LLaVA-NeXT: one left-padded batch whose images give different token counts."""
    from lmms_eval.models import get_model

    from mfpruner_core import LAYOUT_NEWLINE

    lm = get_model("mfpruner").create_from_arg_string(
        f"pretrained={llava_next_repo},visual_token_budget={BUDGET},device=cpu", {"batch_size": 2}
    )
    requests = chat_requests(lm, [random_image(0, (112, 56)), random_image(1, (60, 60))], "What is in the image?")
    assert len(lm.generate_until(requests)) == 2
    pruning = lm.model.last_pruning
    assert len(set(pruning.num_visual_tokens)) == 2  # one batch, two token counts
    for keep, layout in zip(pruning.keep_indices, pruning.layouts):
        assert int((layout[keep, 0] != LAYOUT_NEWLINE).sum()) == BUDGET


def test_loglikelihood_is_the_negative_log_likelihood_of_the_continuation(llava_repo, llava_processor, offline_env):
    """The value lmms-eval's argmin scorer reads: -sum log p(continuation | prompt, image)."""
    import torch
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    image = random_image(3)
    requests = [
        Instance("loglikelihood", ("Is it red?", cont, lambda doc: [doc["image"]], 0, "t", "test"), idx=i,
                 metadata={"task": "t", "doc_id": 0, "repeats": 1})
        for i, cont in enumerate([" yes", " no"])
    ]
    scores = {}
    for batch_size in (1, 2):  # one at a time, and one left-padded batch
        lm = get_model("mfpruner", force_simple=True).create_from_arg_string(
            f"pretrained={llava_repo},device=cpu", {"batch_size": batch_size}
        )
        lm.task_dict = {"t": {"test": [{"image": image}]}}
        scores[batch_size] = [result.text[0] for result in lm.loglikelihood(requests)]
    assert scores[2] == pytest.approx(scores[1], rel=1e-4)
    nll_yes, nll_no = scores[1]

    prompt = "USER: <image>\nIs it red? ASSISTANT:"  # the tiny repo's chat template
    for continuation, nll in ((" yes", nll_yes), (" no", nll_no)):
        inputs = llava_processor(images=image, text=prompt + continuation, return_tensors="pt")
        length = len(llava_processor.tokenizer(continuation, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logits = lm.model(**inputs).logits[0]
        log_probs = torch.log_softmax(logits[-length - 1 : -1], dim=-1)
        expected = -log_probs.gather(-1, inputs["input_ids"][0, -length:, None]).sum().item()
        assert nll == pytest.approx(expected, rel=1e-5)
        assert nll > 0


def test_generation_errors_propagate_instead_of_empty_answers(llava_repo, offline_env):
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    lm = get_model("mfpruner").create_from_arg_string(f"pretrained={llava_repo},device=cpu")
    lm.task_dict = {"t": {"test": [{"image": random_image(0)}]}}
    messages = lambda doc: [{"role": "user", "content": [{"type": "image", "url": doc["image"]}, {"type": "text", "text": "Hi"}]}]  # noqa: E731
    request = Instance("generate_until", ("Hi", messages, {"max_new_tokens": -1}, 0, "t", "test"), idx=0,
                       metadata={"task": "t", "doc_id": 0, "repeats": 1})
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.generate_until([request])


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "model_args, message",
    [
        ("visual_token_budgt=8", "unknown model_args ['visual_token_budgt']"),
        ("visual_token_budget=0", "`visual_token_budget` must be a positive int"),
        ("visual_token_ratio=1.5", "visual_token_ratio"),
        ("visual_token_budget=8,visual_token_ratio=0.5", "only one of"),
        ("mfpruner_cues=attention+colour", "`mfpruner_cues` must be distinct names"),
        ("prune_visual_tokens=maybe", "`prune_visual_tokens` must be True or False"),
        ("batch_size=0", "`batch_size` must be a positive int"),
    ],
)
def test_bad_model_args_raise_clear_errors(llava_repo, offline_env, model_args, message):
    from lmms_eval.models import get_model

    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("`", "`")):
        get_model("mfpruner").create_from_arg_string(f"pretrained={llava_repo},{model_args}")


def test_stock_checkpoint_is_not_an_mfpruner_repo(llava_stock_repo, offline_env):
    from lmms_eval.models import get_model

    with pytest.raises(ValueError, match="is not an MFPruner repo \\(model_type 'llava'\\)"):
        get_model("mfpruner").create_from_arg_string(f"pretrained={llava_stock_repo}")


def test_repo_without_a_multimodal_processor_is_a_clear_error(llava_repo, tmp_path, offline_env):
    from lmms_eval.models import get_model

    repo = shutil.copytree(llava_repo, tmp_path / "no-processor")
    (repo / "processor_config.json").unlink()
    with pytest.raises(ValueError, match="no multimodal processor could be loaded"):
        get_model("mfpruner").create_from_arg_string(f"pretrained={repo},device=cpu")


def test_missing_pretrained_is_a_clear_error(offline_env):
    from lmms_eval.models import get_model

    with pytest.raises(ValueError, match="must give `pretrained`"):
        get_model("mfpruner").create_from_arg_string("visual_token_budget=8")


# ----------------------------------------------------------------------------- Qwen2.5-VL: needs its real processor


def refuse_weights(monkeypatch):
    """The processor check runs before any weight is loaded."""
    from mfpruner_eval import model as adapter

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the processor was checked")

    monkeypatch.setattr(adapter.AutoModelForImageTextToText, "from_pretrained", refuse)


def without_its_processor(qwen_repo: Path, folder: Path) -> Path:
    """A copy of the tiny Qwen2.5-VL repo without the processor it ships (MFPrunerQwen2_5_VLProcessor):
    a tokenizer and an image processor only, as a repo exported from a hub checkpoint holds them."""
    repo = shutil.copytree(qwen_repo, folder)
    (repo / "processor_config.json").unlink()
    tokenizer_config = json.loads((repo / "tokenizer_config.json").read_text())
    for key in ("auto_map", "processor_class"):
        tokenizer_config.pop(key, None)
    (repo / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return repo


def test_qwen_repo_without_its_processor_is_a_clear_error(qwen_repo, tmp_path, offline_env, monkeypatch):
    """A Qwen2.5-VL repo with a tokenizer and an image processor but no Qwen2_5_VLProcessor
    (transformers 5.x builds it only with torchvision). The adapter does not stitch one together:
    the placeholder expansion is the processor's job, so it stops with the remedy."""
    from lmms_eval.models import get_model

    repo = without_its_processor(qwen_repo, tmp_path / "qwen-without-processor")
    refuse_weights(monkeypatch)
    with pytest.raises(ValueError, match="not a multimodal processor.*Qwen2_5_VLProcessor.*needs torchvision"):
        get_model("mfpruner").create_from_arg_string(f"pretrained={repo},device=cpu")


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("torchvision") is not None,
    reason="with torchvision installed the Qwen2.5-VL processor loads",
)
def test_qwen_repo_with_its_processor_but_no_torchvision_is_a_clear_error(qwen_repo, tmp_path, offline_env, monkeypatch):
    """A real Qwen2.5-VL repo names `Qwen2_5_VLProcessor` in preprocessor_config.json; without
    torchvision loading it raises ImportError, which the adapter turns into a ValueError with the remedy."""
    from lmms_eval.models import get_model

    repo = without_its_processor(qwen_repo, tmp_path / "qwen-like-hub")
    config = json.loads((repo / "preprocessor_config.json").read_text())
    (repo / "preprocessor_config.json").write_text(json.dumps({**config, "processor_class": "Qwen2_5_VLProcessor"}))
    refuse_weights(monkeypatch)
    with pytest.raises(ValueError, match=r"(?s)no multimodal processor could be loaded .*Torchvision.*needs torchvision"):
        get_model("mfpruner").create_from_arg_string(f"pretrained={repo},device=cpu")
