"""tools.export: stock checkpoint -> hub-ready MFPruner repo, loaded back in a fresh process."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tools import export as export_module
from tools.export import ARCHITECTURES, export, main
from mfpruner_lib.families import FAMILIES
from mfpruner_lib.tiny_models import build_tiny_clip, build_tiny_llava, rewrite_as_hub_layout

from conftest import refused

ROOT = Path(__file__).resolve().parents[1]
LONG_QUESTION = "What is in the image? Describe the picture in detail. How many people are there? Is there a dog?"
PROMPT = f"USER: <image>\n{LONG_QUESTION} ASSISTANT:"

# Runs in a fresh interpreter, outside the repo (nothing importable from it), hub offline: loads
# OUT through the Auto classes with trust_remote_code, compares the weights with BASE loaded by
# the stock class, prunes one image, and saves what it saw for the test to check. The inputs come
# from OUT's AutoProcessor, or (INPUTS_FILE given: repos whose base has no full processor, the tiny
# Qwen2.5-VL) were made by the test from OUT's tokenizer and image processor, which are loaded here too.
FRESH_PROCESS_CHECK = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch, transformers
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    out, base, result_file, prompt, stock_class, inputs_file = sys.argv[1:7]
    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    plain = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    if inputs_file == "-":
        processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
        preprocessing = [type(processor).__name__]
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 100, 3), dtype=np.uint8))
        inputs = processor(images=image, text=prompt, return_tensors="pt")
    else:
        processor = AutoImageProcessor.from_pretrained(out, trust_remote_code=True)
        preprocessing = [type(AutoTokenizer.from_pretrained(out, trust_remote_code=True)).__name__, type(processor).__name__]
        inputs = torch.load(inputs_file)
    stock = getattr(transformers, stock_class).from_pretrained(base).eval().state_dict()
    weights = model.state_dict()
    identical = all(torch.equal(weights[k], v) for k, v in stock.items())
    plain_identical = all(torch.equal(plain.state_dict()[k], v) for k, v in stock.items())
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    pruning = model.last_pruning
    torch.save(
        {
            "classes": [type(config).__name__, type(model).__name__, type(plain).__name__, *preprocessing],
            "modules": [type(model).__module__, type(processor).__module__],
            "identical": identical,
            "plain_identical": plain_identical,
            "extra_keys": sorted(set(weights) - set(stock)),
            "inputs": dict(inputs),
            "keep_indices": pruning.keep_indices,
            "cue_scores": pruning.cue_scores,
            "num_visual_tokens": pruning.num_visual_tokens,
            "layouts": getattr(pruning, "layouts", None),
            "lm_input_length": pruning.lm_input_length,
            "output": output,
        },
        result_file,
    )
    """
)


def run_fresh(out: Path, base: Path, tmp: Path, stock_class="LlavaForConditionalGeneration", prompt=PROMPT, inputs=None) -> dict:
    script, result, inputs_file = tmp / "check.py", tmp / "result.pt", tmp / "inputs.pt"
    script.write_text(FRESH_PROCESS_CHECK)
    if inputs is not None:
        torch.save(dict(inputs), inputs_file)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", HF_MODULES_CACHE=str(tmp / "modules"))
    done = subprocess.run(
        [sys.executable, str(script), str(out), str(base), str(result), prompt, stock_class, str(inputs_file) if inputs is not None else "-"],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(result, weights_only=False)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="session")
def stock_base(llava_stock_repo) -> Path:
    """The 5.x save_pretrained layout (`vision_tower.encoder.*`), one model.safetensors."""
    return llava_stock_repo


@pytest.fixture(scope="session")
def hub_base(export_dir) -> Path:
    """The hub's old layout (`vision_tower.vision_model.*`), 4 shards, legacy config fields."""
    path = build_tiny_llava(export_dir / "llava-hub-layout", stock=True, seed=3)
    return rewrite_as_hub_layout(path, max_shard_bytes=200_000)


@pytest.fixture(scope="session")
def tiny_clip(export_dir, hub_base) -> Path:
    """A tiny CLIP whose vision model is hub_base's vision tower (as LLaVA-1.5's is openai's)."""
    return build_tiny_clip(export_dir / "clip-for-hub-base", vision_from=hub_base)


@pytest.fixture(scope="session")
def plain_export(export_dir, stock_base) -> Path:
    return export(str(stock_base), export_dir / "out-plain", budget=5, base_model="llava-hf/llava-1.5-7b-hf")


@pytest.fixture(scope="session")
def clip_export(export_dir, hub_base, tiny_clip) -> Path:
    out = export_dir / "out-clip"
    main([str(hub_base), str(out), "--ratio", "0.25", "--clip-text", str(tiny_clip), "--base-model-id", "llava-hf/llava-1.5-7b-hf", "--license", "llama2"])
    return out


# ----------------------------------------------------------------------------- the repo, loaded fresh


def test_plain_export_loads_fresh_with_identical_weights_and_prunes(plain_export, stock_base, tmp_path):
    result = run_fresh(plain_export, stock_base, tmp_path)
    assert result["classes"] == [
        "MFPrunerLlavaConfig", "MFPrunerLlavaForConditionalGeneration", "MFPrunerLlavaForConditionalGeneration", "LlavaProcessor"
    ]
    assert result["modules"][0].startswith("transformers_modules")  # the repo's code, not this checkout
    assert result["identical"] and result["plain_identical"] and result["extra_keys"] == []
    assert [len(k) for k in result["keep_indices"]] == [5]  # --budget 5 is the repo's default
    assert "clip_input_ids" not in result["inputs"]
    assert result["lm_input_length"] == result["inputs"]["input_ids"].shape[1] - 36 + 5
    assert torch.equal(result["output"][:, : result["inputs"]["input_ids"].shape[1]], result["inputs"]["input_ids"])
    # the weight file is BASE's, byte for byte (the stock layout is kept)
    assert filecmp.cmp(stock_base / "model.safetensors", plain_export / "model.safetensors", shallow=False)


def test_clip_export_loads_fresh_and_the_processor_drives_the_clip_cue(clip_export, hub_base, tiny_clip, tmp_path):
    result = run_fresh(clip_export, hub_base, tmp_path)
    assert result["classes"] == [
        "MFPrunerLlavaConfig", "MFPrunerLlavaForConditionalGeneration", "MFPrunerLlavaForConditionalGeneration", "MFPrunerLlavaProcessor"
    ]
    assert result["modules"][1].startswith("transformers_modules")
    assert result["identical"] and result["plain_identical"]
    assert result["extra_keys"] == sorted(k for k in result["extra_keys"] if k.startswith(("clip_text_model.", "clip_visual_projection.")))
    assert [len(k) for k in result["keep_indices"]] == [9]  # --ratio 0.25 of 36 tokens
    assert set(result["cue_scores"]) == {"attention", "uniqueness", "relevance"}

    # the processor's CLIP inputs, by hand: the question (last user turn, no <image>), tokenized
    # with the CLIP tokenizer, zero-padded to a multiple of the 16-position window, cut in segments
    from transformers import AutoTokenizer, CLIPModel, LlavaForConditionalGeneration

    ids = AutoTokenizer.from_pretrained(tiny_clip)(LONG_QUESTION)["input_ids"]
    window = 16
    segments = -(-len(ids) // window)
    assert segments >= 2  # the instruction is longer than one window
    padded = torch.tensor(ids + [0] * (segments * window - len(ids))).view(1, segments, window)
    mask = torch.tensor([1] * len(ids) + [0] * (segments * window - len(ids))).view(1, segments, window)
    assert torch.equal(result["inputs"]["clip_input_ids"], padded)
    assert torch.equal(result["inputs"]["clip_attention_mask"], mask)

    # the cue, by hand: r_i = mean_m(-cos(v_i, t_m)), min-max normalised, v from the select layer
    # after post_layernorm and CLIP's visual_projection, t from CLIP's text tower
    clip = CLIPModel.from_pretrained(tiny_clip).eval()
    llava = LlavaForConditionalGeneration.from_pretrained(hub_base).eval()
    with torch.no_grad():
        text = clip.get_text_features(input_ids=padded[0], attention_mask=mask[0])
        text = getattr(text, "pooler_output", text)  # (M, E)
        hidden = llava.model.vision_tower(result["inputs"]["pixel_values"], output_hidden_states=True).hidden_states[-2]
        image = clip.visual_projection(llava.model.vision_tower.post_layernorm(hidden[0, 1:]))  # (N, E)
    relevance = -(F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T).mean(dim=-1)
    expected = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min() + 1e-6)
    torch.testing.assert_close(result["cue_scores"]["relevance"][0], expected, atol=1e-5, rtol=1e-5)


def test_clip_export_adds_one_shard_and_keeps_the_base_shards_byte_identical(clip_export, hub_base):
    base_index = json.loads((hub_base / "model.safetensors.index.json").read_text())
    index = json.loads((clip_export / "model.safetensors.index.json").read_text())
    base_shards = sorted(set(base_index["weight_map"].values()))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == len(base_shards) + 1
    for old, new in zip(base_shards, shards):
        assert filecmp.cmp(hub_base / old, clip_export / new, shallow=False)
    assert {k: v for k, v in index["weight_map"].items() if k in base_index["weight_map"]} == {
        k: shards[base_shards.index(v)] for k, v in base_index["weight_map"].items()
    }
    assert index["metadata"]["total_size"] > base_index["metadata"]["total_size"]
    config = json.loads((clip_export / "config.json").read_text())
    assert config["model_type"] == "mfpruner_llava" and config["visual_token_ratio"] == 0.25
    assert config.get("visual_token_budget") is None
    assert config["auto_map"]["AutoProcessor"] == "processing_mfpruner.MFPrunerLlavaProcessor"
    assert {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"} <= set(config["auto_map"])
    for name in ("configuration_mfpruner.py", "modeling_mfpruner_llava.py", "mfpruner_core.py", "processing_mfpruner.py"):
        assert (clip_export / name).read_text() == (ROOT / name).read_text()
    assert not (clip_export / "clip_tokenizer" / "tokenizer_config.json").read_text().count("local_files_only")


def test_clip_checkpoint_as_bin_gives_the_same_shard(clip_export, hub_base, tiny_clip, tmp_path):
    """openai/clip-vit-large-patch14-336 ships pytorch_model.bin: it is read as well."""
    import shutil

    from safetensors.torch import load_file

    clip = tmp_path / "clip-bin"
    shutil.copytree(tiny_clip, clip)
    torch.save(load_file(clip / "model.safetensors"), clip / "pytorch_model.bin")
    (clip / "model.safetensors").unlink()
    out = export(str(hub_base), tmp_path / "out", ratio=0.25, clip_text=str(clip), base_model="llava-hf/llava-1.5-7b-hf")
    last = sorted(p.name for p in out.glob("model-*.safetensors"))[-1]
    expected = load_file(clip_export / last)
    got = load_file(out / last)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert (out / "config.json").read_text() == (clip_export / "config.json").read_text()


def test_plain_export_has_no_custom_processor(plain_export):
    config = json.loads((plain_export / "config.json").read_text())
    assert "AutoProcessor" not in config["auto_map"] and config["visual_token_budget"] == 5
    assert not (plain_export / "processing_mfpruner.py").exists()


# ----------------------------------------------------------------------------- processor


@pytest.fixture(scope="module")
def clip_processor(clip_export):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(clip_export, trust_remote_code=True)


def test_processor_finds_the_instruction(clip_processor, tiny_clip):
    from PIL import Image
    from transformers import AutoTokenizer

    from processing_mfpruner import clip_segments

    clip_tokenizer = AutoTokenizer.from_pretrained(tiny_clip)

    def expected(*questions):
        return torch.tensor(clip_segments(clip_tokenizer(list(questions))["input_ids"], 16)[0])

    def clip_ids(text, **kwargs):
        images = [Image.new("RGB", (84, 84))] * text.count("<image>") or None
        return clip_processor(images=images, text=text, return_tensors="pt", **kwargs)["clip_input_ids"]

    assert (clip_processor.user_turn_prefix, clip_processor.turn_end) == ("USER:", "ASSISTANT:")
    # the last user turn of a multi-turn prompt, without the image placeholder
    multi = "USER: <image>\nIs there a dog? ASSISTANT: No. USER: What color is the car? ASSISTANT:"
    assert torch.equal(clip_ids(text=multi), expected("What color is the car?"))
    # an explicit instruction wins
    assert torch.equal(clip_ids(text=multi, instruction="Is there a dog?"), expected("Is there a dog?"))
    # a prompt without the markers is one user turn
    assert torch.equal(clip_ids(text="<image>\nHow many people are there?"), expected("How many people are there?"))
    # a batch: short samples get all-zero segments after their own
    batch = clip_processor(text=[LONG_QUESTION, "USER: Yes. ASSISTANT:"], return_tensors="pt", padding=True)
    assert torch.equal(batch["clip_input_ids"], expected(LONG_QUESTION, "Yes."))
    assert batch["clip_attention_mask"][1, 1:].sum() == 0
    # a chat: the text of the last user message
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a dog?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "No."}]},
        {"role": "user", "content": [{"type": "text", "text": "What color is the car?"}]},
    ]
    inputs = clip_processor.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"images": [Image.new("RGB", (84, 84))]},
    )
    assert torch.equal(inputs["clip_input_ids"], expected("What color is the car?"))
    with pytest.raises(ValueError, match="instruction"):
        clip_processor(text=[LONG_QUESTION, LONG_QUESTION], instruction=["one"])


def test_batched_clip_inputs_drive_the_model(clip_export, clip_processor, tiny_clip):
    """Two prompts of different lengths: the padding segments change nothing."""
    from transformers import AutoModelForImageTextToText

    from conftest import random_image

    model = AutoModelForImageTextToText.from_pretrained(clip_export, trust_remote_code=True).eval()
    images = [random_image(1), random_image(2)]
    prompts = [PROMPT, "USER: <image>\nIs there a dog? ASSISTANT:"]
    batch = clip_processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=1, do_sample=False)
        batched = model.last_pruning.cue_scores["relevance"]
        single = []
        for image, prompt in zip(images, prompts):
            model.generate(**clip_processor(images=image, text=prompt, return_tensors="pt"), max_new_tokens=1, do_sample=False)
            single.append(model.last_pruning.cue_scores["relevance"][0])
    for b, s in zip(batched, single):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, s, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- model card


def test_model_card_metadata(clip_export, plain_export):
    from huggingface_hub import ModelCard

    card = ModelCard.load(clip_export / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "llava-hf/llava-1.5-7b-hf"
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-text-to-text"
    assert data["license"] == "llama2"
    assert {"mfpruner", "llava"} <= set(data["tags"])
    assert "trust_remote_code=True" in card.text and "AutoProcessor" in card.text
    assert "25.0% of each image's visual tokens" in card.text
    plain = ModelCard.load(plain_export / "README.md")
    assert plain.data.to_dict()["license"] == "unknown"  # no --license and no card in BASE
    assert "keeps 5 visual tokens per image" in plain.text


@pytest.mark.parametrize("export_fixture", ["clip_export", "llava_next_clip_export"])
def test_the_card_usage_snippet_runs(export_fixture, request, tmp_path):
    """The card's code block, pointed at the exported folder and a real image file, runs as written."""
    from huggingface_hub import ModelCard

    from conftest import random_image

    exported = request.getfixturevalue(export_fixture)
    text = ModelCard.load(exported / "README.md").text
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    random_image(4).save(tmp_path / "photo.jpg")
    code = code.replace(f'"your-name/{exported.name}"', repr(str(exported))).replace('"photo.jpg"', repr(str(tmp_path / "photo.jpg")))
    namespace = {}
    exec(compile(code, "card-snippet", "exec"), namespace)
    inputs, processor = namespace["inputs"], namespace["processor"]
    question = processor.clip_tokenizer("What is shown?")["input_ids"]  # the user turn of the card's chat
    assert inputs["clip_input_ids"][0, 0, : len(question)].tolist() == question
    assert namespace["out"].shape[1] > inputs["input_ids"].shape[1]
def test_license_is_inherited_from_the_base_card(stock_base, tmp_path):
    import shutil

    from huggingface_hub import ModelCard

    base = tmp_path / "base"
    shutil.copytree(stock_base, base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    out = export(str(base), tmp_path / "out", base_model="org/base")
    assert ModelCard.load(out / "README.md").data.to_dict()["license"] == "apache-2.0"


# ----------------------------------------------------------------------------- push to hub


class FakeHubApi:
    """Stands in for huggingface_hub.HfApi: 'uploads' into a local folder."""

    calls: list = []

    def __init__(self, hub: Path):
        self.hub = hub

    def create_repo(self, repo_id, repo_type="model", private=False, exist_ok=False):
        FakeHubApi.calls.append(("create_repo", repo_id, repo_type, private, exist_ok))

    def upload_folder(self, folder_path, repo_id, repo_type="model", commit_message=None):
        import shutil

        FakeHubApi.calls.append(("upload_folder", repo_id, repo_type))
        shutil.copytree(folder_path, self.hub / repo_id, dirs_exist_ok=True)


def test_push_to_hub_uploads_the_finished_folder(stock_base, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    FakeHubApi.calls = []
    monkeypatch.setattr(export_module, "HfApi", lambda: FakeHubApi(hub))
    out = tmp_path / "out"
    main([str(stock_base), str(out), "--push-to-hub", "me/tiny-mfpruner", "--private", "--base-model-id", "org/base"])
    assert FakeHubApi.calls == [("create_repo", "me/tiny-mfpruner", "model", True, True), ("upload_folder", "me/tiny-mfpruner", "model")]
    uploaded = sorted(p.relative_to(hub / "me/tiny-mfpruner") for p in (hub / "me/tiny-mfpruner").rglob("*"))
    assert uploaded == sorted(p.relative_to(out) for p in out.rglob("*"))
    assert 'repo = "me/tiny-mfpruner"' in (out / "README.md").read_text()


def test_nothing_reaches_the_hub_unless_asked(stock_base, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the hub was contacted")

    monkeypatch.setattr(export_module, "HfApi", refuse)
    monkeypatch.setattr(export_module, "snapshot_download", refuse)
    export(str(stock_base), tmp_path / "out")
    with pytest.raises(ValueError, match="--allow-download"):
        export("llava-hf/llava-1.5-7b-hf", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_download_only_with_permission(stock_base, tiny_clip, hub_base, tmp_path, monkeypatch):
    """--allow-download: hub ids go through huggingface_hub (here a fake that serves local folders)."""
    served = {"llava-hf/llava-1.5-7b-hf": hub_base, "openai/clip-vit-large-patch14-336": tiny_clip}
    downloads = []

    class FakeListing:
        def list_repo_files(self, repo_id):
            return [p.name for p in served[repo_id].iterdir()]

    def fake_snapshot_download(repo_id, allow_patterns):
        downloads.append((repo_id, "*.safetensors" in allow_patterns, "*.bin" in allow_patterns))
        return str(served[repo_id])

    monkeypatch.setattr(export_module, "HfApi", FakeListing)
    monkeypatch.setattr(export_module, "snapshot_download", fake_snapshot_download)
    with pytest.raises(ValueError, match="pass --allow-download"):
        export("llava-hf/llava-1.5-7b-hf", tmp_path / "out")
    assert downloads == []
    out = export(
        "llava-hf/llava-1.5-7b-hf", tmp_path / "out", clip_text="openai/clip-vit-large-patch14-336", allow_download=True
    )
    assert downloads == [("llava-hf/llava-1.5-7b-hf", True, False), ("openai/clip-vit-large-patch14-336", True, False)]
    from huggingface_hub import ModelCard

    assert ModelCard.load(out / "README.md").data.to_dict()["base_model"] == "llava-hf/llava-1.5-7b-hf"


def test_base_model_id_from_a_hub_cache_snapshot(tmp_path):
    snapshot = tmp_path / "hub" / "models--llava-hf--llava-1.5-7b-hf" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert export_module.base_model_id(snapshot, None, None) == "llava-hf/llava-1.5-7b-hf"
    assert export_module.base_model_id(snapshot, None, "org/given") == "org/given"
    assert export_module.base_model_id(tmp_path, None, None) is None


def test_push_needs_a_base_model_id(stock_base, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "HfApi", lambda: pytest.fail("no upload expected"))
    with pytest.raises(ValueError, match="--base-model-id"):
        export(str(stock_base), tmp_path / "out", push_to_hub="me/x")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- bad input


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_unsupported_architecture(tmp_path):
    base = tmp_path / "bert"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"'bert' checkpoint; the export supports model_type \['llava'"):
        export(str(base), tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_an_mfpruner_repo_is_not_a_base(llava_repo, tmp_path):
    with pytest.raises(ValueError, match="already an MFPruner repo"):
        export(str(llava_repo), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_missing_base_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nope"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: BASE folder") and "does not exist" in err
    with pytest.raises(ValueError, match="BASE folder .* does not exist"):
        export(str(tmp_path / "nope"), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_non_empty_output_needs_overwrite(stock_base, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty; pass --overwrite"):
        export(str(stock_base), out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and leftovers(tmp_path) == []
    export(str(stock_base), out, overwrite=True)
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_failure_midway_leaves_nothing_behind(stock_base, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the previous export")

    def broken_card(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_module, "model_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        export(str(stock_base), out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"] and leftovers(tmp_path) == []


def test_clip_checkpoint_of_another_vision_tower_is_refused(stock_base, tiny_clip, tmp_path):
    # tiny_clip's vision model is hub_base's tower (seed 3), not stock_base's (seed 0)
    with pytest.raises(ValueError, match="vision weights differ from BASE's vision tower"):
        export(str(stock_base), tmp_path / "out", clip_text=str(tiny_clip))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_bad_budget_is_refused_before_writing(stock_base, tmp_path):
    with pytest.raises(ValueError, match="visual_token_budget"):
        export(str(stock_base), tmp_path / "out", budget=0)
    with pytest.raises(ValueError, match="visual_token_ratio"):
        export(str(stock_base), tmp_path / "out", ratio=1.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_every_architecture_row_names_importable_classes():
    from transformers import PretrainedConfig, PreTrainedModel

    for model_type, arch in ARCHITECTURES.items():
        assert issubclass(export_module.import_object(arch.config_class), PretrainedConfig), model_type
        assert issubclass(export_module.import_object(arch.model_class), PreTrainedModel), model_type


# ----------------------------------------------------------------------------- memory


MEMORY_CHECK = textwrap.dedent(
    """
    import resource, sys
    from tools.export import export

    warm_base, base, out = sys.argv[1:4]
    export(warm_base, out + "-warm-up")  # imports and first-call costs, on a tiny checkpoint
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    export(base, out)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """
)
SHARDS, SHARD_FLOATS = 6, 4 * 1024 * 1024  # 6 x 16 MB


def test_bin_shards_are_converted_one_at_a_time(stock_base, tmp_path):
    """A .bin checkpoint of 6 x 16 MB shards: peak RSS grows by about one shard, not the model."""
    import shutil

    from safetensors.torch import load_file

    base = tmp_path / "bin-base"
    shutil.copytree(stock_base, base)
    state = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    weight_map = {}
    for i in range(SHARDS):
        name = f"pytorch_model-{i + 1:05d}-of-{SHARDS:05d}.bin"
        shard = {f"padding.{i}": torch.randn(SHARD_FLOATS)}  # bulk, not a model weight
        if i == 0:
            shard.update(state)
        torch.save(shard, base / name)
        weight_map.update({k: name for k in shard})
    (base / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_CHECK, str(stock_base), str(base), str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    growth = int(done.stdout.strip().splitlines()[-1])
    total = SHARDS * SHARD_FLOATS * 4
    assert growth < total / 2, f"peak RSS grew by {growth / 2**20:.0f} MB for {total / 2**20:.0f} MB of weights"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    names = [f"model-{i:05d}-of-{SHARDS:05d}.safetensors" for i in range(1, SHARDS + 1)]
    assert sorted(set(index["weight_map"].values())) == names
    converted = {}
    for name in names:
        converted.update(load_file(out / name))
    assert all(torch.equal(converted[k], v) for k, v in state.items())
    assert not any(name.endswith(".bin") for name in os.listdir(out))


def test_turn_markers_of_a_chatml_template():
    """The markers come from rendering the template, so other chat formats work too (Qwen's ChatML)."""
    from processing_mfpruner import instruction_from_prompt, user_turn_markers

    def render(messages):
        text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        for m in messages:
            content = "".join(item["text"] for item in m["content"] if item["type"] == "text")
            text += f"<|im_start|>{m['role']}\n{content}<|im_end|>\n"
        return text + "<|im_start|>assistant\n"

    prefix, end = user_turn_markers(render)
    assert (prefix, end) == ("<|im_end|>\n<|im_start|>user", "<|im_end|>\n<|im_start|>assistant")
    prompt = render([{"role": "user", "content": [{"type": "text", "text": "<|vision_start|><|image_pad|><|vision_end|>What is this?"}]}])
    placeholders = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
    assert instruction_from_prompt(prompt, prefix, end, placeholders) == "What is this?"


# ----------------------------------------------------------------------------- other model families
# One fresh-process round trip per MFPruner class, from a tiny STOCK checkpoint of that family.


def kept_patch_tokens(result: dict) -> list[int]:
    """Kept tokens per image that count against the budget (LLaVA-NeXT's newlines are kept outside it)."""
    from mfpruner_core import LAYOUT_NEWLINE

    if not result["layouts"]:  # only LLaVA-NeXT records layouts
        return [len(k) for k in result["keep_indices"]]
    return [int((layout[keep, 0] != LAYOUT_NEWLINE).sum()) for keep, layout in zip(result["keep_indices"], result["layouts"])]


def patch_tokens(result: dict) -> list[int]:
    from mfpruner_core import LAYOUT_NEWLINE

    if not result["layouts"]:  # only LLaVA-NeXT records layouts
        return list(result["num_visual_tokens"])
    return [int((layout[:, 0] != LAYOUT_NEWLINE).sum()) for layout in result["layouts"]]


def assert_pruned_and_prompt_kept(result: dict, expected_kept: list[int]) -> None:
    assert kept_patch_tokens(result) == expected_kept
    removed = sum(n - len(k) for n, k in zip(result["num_visual_tokens"], result["keep_indices"]))
    assert removed > 0 and result["lm_input_length"] == result["inputs"]["input_ids"].shape[1] - removed
    prompt_length = result["inputs"]["input_ids"].shape[1]
    assert torch.equal(result["output"][:, :prompt_length], result["inputs"]["input_ids"])  # stock generate() output


@pytest.fixture(scope="session")
def llava_next_hub_base(export_dir) -> Path:
    """A stock LLaVA-NeXT checkpoint in the hub's key layout (`vision_tower.vision_model.*`)."""
    from mfpruner_lib.tiny_models import build_tiny_llava_next

    return build_tiny_llava_next(export_dir / "llava-next-hub-layout", stock=True, hub_layout=True, seed=3)


@pytest.fixture(scope="session")
def llava_next_clip_export(export_dir, llava_next_hub_base) -> Path:
    """LLaVA-NeXT with the CLIP text tower of its vision tower's CLIP, at the family's default ratio."""
    clip = build_tiny_clip(export_dir / "clip-for-llava-next", vision_from=llava_next_hub_base)
    out = export_dir / "out-llava-next-clip"
    main([str(llava_next_hub_base), str(out), "--clip-text", str(clip), "--base-model-id", "llava-hf/llava-v1.6-vicuna-7b-hf"])
    return out


def test_llava_next_clip_export_loads_fresh_with_identical_weights_and_prunes(llava_next_clip_export, llava_next_hub_base, export_dir, tmp_path):
    from mfpruner_core import resolve_budget

    result = run_fresh(llava_next_clip_export, llava_next_hub_base, tmp_path, stock_class="LlavaNextForConditionalGeneration")
    assert result["classes"] == [
        "MFPrunerLlavaNextConfig", "MFPrunerLlavaNextForConditionalGeneration",
        "MFPrunerLlavaNextForConditionalGeneration", "MFPrunerLlavaNextProcessor",
    ]
    assert all(module.startswith("transformers_modules") for module in result["modules"])
    assert result["identical"] and result["plain_identical"]
    assert result["extra_keys"] and all(k.startswith(("clip_text_model.", "clip_visual_projection.")) for k in result["extra_keys"])
    # the processor's CLIP inputs are the question (the prompt's last user turn) in 16-token windows
    from transformers import AutoTokenizer

    from processing_mfpruner import clip_segments

    question = AutoTokenizer.from_pretrained(export_dir / "clip-for-llava-next")([LONG_QUESTION])["input_ids"]
    assert result["inputs"]["clip_input_ids"].tolist() == [clip_segments(question, 16)[0][0]]
    assert result["inputs"]["clip_input_ids"].shape[1] >= 2
    assert set(result["cue_scores"]) == {"attention", "uniqueness", "relevance"}
    # the family's default: 22.2% of the image's patch tokens (base tile + unpadded grid), newlines kept on top
    assert_pruned_and_prompt_kept(result, [resolve_budget(n, ratio=0.222) for n in patch_tokens(result)])
    config = json.loads((llava_next_clip_export / "config.json").read_text())
    assert config["model_type"] == "mfpruner_llava_next" and config["visual_token_ratio"] == 0.222
    assert config["auto_map"]["AutoProcessor"] == "processing_mfpruner.MFPrunerLlavaNextProcessor"


def test_llava_next_export_of_the_save_pretrained_layout(export_dir, llava_next_stock_repo, tmp_path):
    out = export(str(llava_next_stock_repo), export_dir / "out-llava-next", budget=7, base_model="llava-hf/llava-v1.6-vicuna-7b-hf")
    result = run_fresh(out, llava_next_stock_repo, tmp_path, stock_class="LlavaNextForConditionalGeneration")
    assert result["classes"][3] == "LlavaNextProcessor" and not (out / "processing_mfpruner.py").exists()
    assert result["identical"] and result["plain_identical"] and result["extra_keys"] == []
    assert_pruned_and_prompt_kept(result, [7])
    assert filecmp.cmp(llava_next_stock_repo / "model.safetensors", out / "model.safetensors", shallow=False)
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert {"mfpruner", "llava_next"} <= set(card.data.to_dict()["tags"])
    assert "LLaVA-NeXT" in card.text and "keeps 7 visual tokens per image" in card.text


QWEN_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the image?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="session")
def qwen_export(export_dir, qwen_stock_repo) -> Path:
    return export(str(qwen_stock_repo), export_dir / "out-qwen", base_model="Qwen/Qwen2.5-VL-7B-Instruct", license="apache-2.0")


def test_qwen_export_loads_fresh_with_identical_weights_and_prunes(qwen_export, qwen_stock_repo, tmp_path):
    """The tiny Qwen2.5-VL base has no Qwen2_5_VLProcessor (it needs torchvision, which CPU torch
    here lacks): the inputs come from the exported repo's tokenizer and image processor through
    mfpruner_lib.tiny_models.qwen_inputs, which expands the placeholders as the processor does."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from conftest import random_image
    from mfpruner_core import resolve_budget
    from mfpruner_lib.tiny_models import qwen_inputs

    tokenizer = AutoTokenizer.from_pretrained(qwen_export, trust_remote_code=True)
    image_processor = AutoImageProcessor.from_pretrained(qwen_export, trust_remote_code=True)
    inputs = qwen_inputs(tokenizer, image_processor, [QWEN_PROMPT], images=[random_image(0, (112, 84))])
    result = run_fresh(qwen_export, qwen_stock_repo, tmp_path, stock_class="Qwen2_5_VLForConditionalGeneration", inputs=inputs)
    assert result["classes"][:3] == [
        "MFPrunerQwen2_5_VLConfig", "MFPrunerQwen2_5_VLForConditionalGeneration", "MFPrunerQwen2_5_VLForConditionalGeneration"
    ]
    assert result["modules"][0].startswith("transformers_modules")
    assert result["identical"] and result["plain_identical"] and result["extra_keys"] == []
    assert result["num_visual_tokens"] == [12]  # 112 x 84 px: 4 x 3 merged tokens
    assert_pruned_and_prompt_kept(result, [resolve_budget(12, ratio=0.222)])  # the family's default ratio
    assert filecmp.cmp(qwen_stock_repo / "model.safetensors", qwen_export / "model.safetensors", shallow=False)


def test_qwen_card_and_config(qwen_export):
    from huggingface_hub import ModelCard

    config = json.loads((qwen_export / "config.json").read_text())
    assert config["model_type"] == "mfpruner_qwen2_5_vl" and config["visual_token_ratio"] == 0.222
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_mfpruner_qwen2_5_vl.MFPrunerQwen2_5_VLForConditionalGeneration"
    assert "AutoProcessor" not in config["auto_map"]  # the base's own Qwen2_5_VLProcessor files are copied
    card = ModelCard.load(qwen_export / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "Qwen/Qwen2.5-VL-7B-Instruct" and data["license"] == "apache-2.0"
    assert {"mfpruner", "qwen2_5_vl"} <= set(data["tags"])
    assert "[CLS]" not in card.text and "attention each patch receives" in card.text
    assert "keeps 22.2% of each image's visual tokens" in card.text and "torchvision" in card.text
    assert "visual_token_ratio=0.333" in card.text


QWEN3_EXPORTS = {  # registry key: (stock class, MFPruner config and model classes, base model id)
    "qwen3-vl": ("Qwen3VLForConditionalGeneration", "MFPrunerQwen3VLConfig", "MFPrunerQwen3VLForConditionalGeneration",
                 "Qwen/Qwen3-VL-8B-Instruct"),
    "qwen3-vl-moe": ("Qwen3VLMoeForConditionalGeneration", "MFPrunerQwen3VLMoeConfig",
                     "MFPrunerQwen3VLMoeForConditionalGeneration", "Qwen/Qwen3-VL-30B-A3B-Instruct"),
    "qwen3.5": ("Qwen3_5ForConditionalGeneration", "MFPrunerQwen3_5Config", "MFPrunerQwen3_5ForConditionalGeneration",
                "Qwen/Qwen3.5-27B"),
    "qwen3.5-moe": ("Qwen3_5MoeForConditionalGeneration", "MFPrunerQwen3_5MoeConfig",
                    "MFPrunerQwen3_5MoeForConditionalGeneration", "Qwen/Qwen3.5-35B-A3B"),
}


@pytest.mark.parametrize("key", sorted(QWEN3_EXPORTS))
def test_qwen3_vl_export_loads_fresh_with_identical_weights_prunes_and_has_its_card(key, export_dir, tiny_repo, tmp_path):
    """Qwen3-VL (dense and MoE) and Qwen3.5 stock checkpoint -> MFPruner repo: byte-identical weights, loaded in a
    fresh process as remote code with the stock model's weights bit for bit, pruning at the
    default ratio; the card names the family, its cue A and its processor."""
    from huggingface_hub import ModelCard
    from transformers import AutoImageProcessor, AutoTokenizer

    from conftest import random_image
    from mfpruner_core import resolve_budget
    from mfpruner_lib.tiny_models import qwen_inputs

    stock_class, config_class, model_class, base_model = QWEN3_EXPORTS[key]
    base = tiny_repo(key, stock=True)
    out = export(str(base), export_dir / f"out-{key}", base_model=base_model, license="apache-2.0")
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    image_processor = AutoImageProcessor.from_pretrained(out, trust_remote_code=True)
    inputs = qwen_inputs(tokenizer, image_processor, [QWEN_PROMPT], images=[random_image(0, (128, 96))])
    result = run_fresh(out, base, tmp_path, stock_class=stock_class, inputs=inputs)
    assert result["classes"][:3] == [config_class, model_class, model_class]
    assert result["identical"] and result["plain_identical"] and result["extra_keys"] == []
    assert result["num_visual_tokens"] == [12]  # 128 x 96 px: 4 x 3 merged tokens of 32 px
    assert_pruned_and_prompt_kept(result, [resolve_budget(12, ratio=0.222)])
    assert filecmp.cmp(base / "model.safetensors", out / "model.safetensors", shallow=False)
    shipped = FAMILIES[key].model_class.split(".")[0] + ".py"  # with the Qwen3-VL and Qwen2.5-VL code it imports
    assert all((out / name).exists() for name in (shipped, "modeling_mfpruner_qwen3_vl.py", "modeling_mfpruner_qwen2_5_vl.py"))
    model_type = FAMILIES[key].model_type
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"mfpruner_{model_type}" and config["visual_token_ratio"] == 0.222
    # the auto_map save_pretrained writes (Qwen3.5: the stock heads too; tests/test_modeling_mfpruner_qwen3_5.py loads them)
    assert config["auto_map"] == json.loads((tiny_repo(key) / "config.json").read_text())["auto_map"]
    card = ModelCard.load(out / "README.md")
    assert {"mfpruner", model_type} <= set(card.data.to_dict()["tags"])
    assert "last vision block" in card.text and "Qwen3VLProcessor" in card.text


def test_qwen_refuses_clip_text_before_reading_anything(qwen_stock_repo, tmp_path):
    with pytest.raises(ValueError, match=r"--clip-text: Qwen2.5-VL \('qwen2_5_vl'\) has no CLIP text tower"):
        export(str(qwen_stock_repo), tmp_path / "out", clip_text=str(tmp_path / "no-such-clip"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- BASE and OUT apart


def tree_snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def own_base(stock_base, tmp_path) -> Path:
    """A copy of the stock base with files the export does not copy (other weight formats)."""
    import shutil

    base = tmp_path / "models" / "base"
    shutil.copytree(stock_base, base)
    (base / "model.onnx").write_bytes(b"onnx weights")
    (base / "tf_model.h5").write_bytes(b"tf weights")
    (tmp_path / "models" / "sibling").mkdir()
    (tmp_path / "models" / "sibling" / "keep.txt").write_text("a sibling of BASE")
    return base


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize(
    "case, expected",
    [
        ("same", "is BASE"),
        ("parent", "contains BASE"),
        ("inside", "lies inside BASE"),
        ("symlink-to-base", "is BASE"),
        ("inside-through-symlink", "lies inside BASE"),
        ("base-through-symlink-inside", "contains BASE"),
    ],
)
def test_out_and_base_must_be_apart(own_base, tmp_path, case, expected, overwrite, capsys):
    models = own_base.parent
    base, out = own_base, {"same": own_base, "parent": models, "inside": own_base / "mfpruner"}.get(case)
    if case == "symlink-to-base":
        out = tmp_path / "link"
        out.symlink_to(own_base)
    elif case == "inside-through-symlink":
        (tmp_path / "link").symlink_to(own_base)
        out = tmp_path / "link" / "mfpruner"
    elif case == "base-through-symlink-inside":  # BASE given through a link that lies inside OUT
        (models / "link").symlink_to(own_base)
        base, out = models / "link", models
    before_models, before_tmp = tree_snapshot(models), sorted(p.name for p in tmp_path.iterdir())
    argv = [str(base), str(out)] + (["--overwrite"] if overwrite else [])
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err
    assert tree_snapshot(models) == before_models  # nothing of BASE (or its siblings) changed, nothing added
    assert sorted(p.name for p in tmp_path.iterdir()) == before_tmp
    assert not (own_base / "mfpruner").exists()


def test_clip_text_folder_must_be_apart_from_out(hub_base, tiny_clip, tmp_path):
    import shutil

    clip = tmp_path / "clip"
    shutil.copytree(tiny_clip, clip)
    before = tree_snapshot(clip)
    with pytest.raises(ValueError, match="contains --clip-text"):
        export(str(hub_base), tmp_path, clip_text=str(clip), overwrite=True)
    assert tree_snapshot(clip) == before


# ----------------------------------------------------------------------------- nothing outside BASE is read


def sharded_copy(hub_base: Path, folder: Path) -> tuple[Path, dict]:
    """A copy of the 4-shard base and its index."""
    import shutil

    base = folder / "base"
    shutil.copytree(hub_base, base)
    return base, json.loads((base / "model.safetensors.index.json").read_text())


def point_first_shard_at(base: Path, index: dict, name: str) -> None:
    """The index's first shard's tensors now name the file `name` (relative to BASE, or absolute)."""
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (name if v == first else v) for k, v in index["weight_map"].items()}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("case", ["dot-dot", "absolute", "symlink-out", "symlinked-tokenizer"])
def test_nothing_outside_base_is_copied(hub_base, tmp_path, case, capsys):
    """A shard the index names outside BASE (`../x`, `/x`), a shard or another file that links to a
    file outside BASE: refused, naming the file, before anything is written. The file outside is a
    valid shard, so only its place is wrong."""
    base, index = sharded_copy(hub_base, tmp_path)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((base / sorted(set(index["weight_map"].values()))[0]).read_bytes())
    if case == "dot-dot":
        point_first_shard_at(base, index, "../outside.safetensors")
        expected = "the weight_map's shard '../outside.safetensors' resolves to"
    elif case == "absolute":
        point_first_shard_at(base, index, str(outside))
        expected = f"the weight_map's shard {str(outside)!r} resolves to"
    elif case == "symlink-out":
        (base / "model-00001-of-00004.safetensors").unlink()
        (base / "model-00001-of-00004.safetensors").symlink_to(outside)
        expected = "model-00001-of-00004.safetensors' resolves to"
    else:
        (tmp_path / "secret.json").write_text('{"token": "hf_not_for_the_hub"}')
        (base / "tokenizer_config.json").unlink()
        (base / "tokenizer_config.json").symlink_to(tmp_path / "secret.json")
        expected = "tokenizer_config.json resolves to"
    message = refused(main, [str(base), str(tmp_path / "out")], capsys)
    assert expected in message and f"outside {str(base)!r}" in message, message
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_hub_cache_snapshot_may_link_into_its_blobs(hub_base, tmp_path):
    """huggingface_hub's cache keeps each file once in `blobs/` and links it from the snapshot: a
    downloaded BASE is such a snapshot, and its links are the checkpoint's own files."""
    repo = tmp_path / "hub" / "models--me--tiny-llava"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, file in enumerate(sorted(hub_base.iterdir())):
        (blobs / f"blob{i}").write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    out = export(str(snapshot), tmp_path / "out")
    assert filecmp.cmp(out / "model-00001-of-00004.safetensors", hub_base / "model-00001-of-00004.safetensors", shallow=False)
    assert "\nbase_model: me/tiny-llava\n" in (out / "README.md").read_text()  # the id from the cache's folder name


@pytest.mark.parametrize("out", [".", "..", "sub/.."])
def test_out_must_not_be_or_contain_the_current_folder(stock_base, tmp_path, monkeypatch, capsys, out):
    """OUT is replaced by a rename: the current folder (or one above it) would vanish under the
    shell. Refused, with or without --overwrite, and nothing is left behind."""
    here = tmp_path / "models" / "here"
    (here / "sub").mkdir(parents=True)
    (here / "mine.txt").write_text("keep me")
    monkeypatch.chdir(here)
    before = tree_snapshot(tmp_path)
    for overwrite in ([], ["--overwrite"]):
        message = refused(main, [str(stock_base), out, *overwrite], capsys)
        assert f"the current folder ({str(here)!r}); give a folder beside it" in message, message
    assert tree_snapshot(tmp_path) == before and leftovers(here) == leftovers(here.parent) == []


def test_out_under_a_file_is_refused(stock_base, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    for out in (tmp_path / "a-file" / "out", tmp_path / "a-file" / "deeper" / "out"):
        message = refused(main, [str(stock_base), str(out)], capsys)
        assert message == f"OUT {str(out)!r}: its parent {str(tmp_path / 'a-file')!r} is a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.parametrize("text_config", ['"oops"', "[1, 2]", '{"hidden_size": "wide"}'])
def test_a_bad_field_of_the_base_config_names_the_file(stock_base, tmp_path, text_config, capsys):
    def damage(base):
        config = json.loads((base / "config.json").read_text())
        config["text_config"] = json.loads(text_config)
        (base / "config.json").write_text(json.dumps(config))

    base = broken_copy(stock_base, tmp_path, damage)
    message = refused(main, [str(base), str(tmp_path / "out")], capsys)
    assert message.startswith(f"{base / 'config.json'}: not a valid LLaVA-1.5 config"), message
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- broken checkpoints


def broken_copy(stock_base: Path, folder: Path, damage) -> Path:
    import shutil

    base = folder / "broken-base"
    shutil.copytree(stock_base, base)
    damage(base)
    return base


def cut_to(fraction_or_bytes):
    def damage(base):
        shard = base / "model.safetensors"
        data = shard.read_bytes()
        size = fraction_or_bytes if isinstance(fraction_or_bytes, int) else int(len(data) * fraction_or_bytes)
        shard.write_bytes(data[:size])

    return damage


def header_length(value):
    def damage(base):
        shard = base / "model.safetensors"
        data = shard.read_bytes()
        shard.write_bytes(value.to_bytes(8, "little") + data[8:])

    return damage


def edit_header(edit):
    """Rewrites the header JSON (same data section) through `edit(header)`."""

    def damage(base):
        shard = base / "model.safetensors"
        data = shard.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        edit(header)
        text = json.dumps(header).encode()
        shard.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])

    return damage


def first_tensor(header):
    return header[sorted(k for k in header if k != "__metadata__")[0]]


def last_tensor(header):
    return max((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][1])


BROKEN_SHARDS = {
    "empty": (cut_to(0), "shorter than the 8-byte header length"),
    "cut-in-header": (cut_to(100), "exceeds the file"),
    "truncated-data": (cut_to(0.9), "truncated"),
    "huge-header-length": (header_length(10**12), "header length 1000000000000 exceeds"),
    "header-not-json": (lambda base: (base / "model.safetensors").write_bytes((4).to_bytes(8, "little") + b"{{{{" + b"\0" * 16), "not valid JSON"),
    "trailing-bytes": (lambda base: open(base / "model.safetensors", "ab").write(b"\0" * 64), "trailing bytes"),
    "wrong-shape": (edit_header(lambda h: first_tensor(h).update(shape=[*first_tensor(h)["shape"], 2])), "needs"),
    "overlap": (edit_header(lambda h: last_tensor(h).update(data_offsets=[0, last_tensor(h)["data_offsets"][1] - last_tensor(h)["data_offsets"][0]])), "gap or an overlap"),
    "no-offsets": (edit_header(lambda h: first_tensor(h).pop("data_offsets")), "no valid data_offsets"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_SHARDS))
def test_broken_shard_is_named_before_anything_is_written(stock_base, tmp_path, case, capsys):
    damage, reason = BROKEN_SHARDS[case]
    base = broken_copy(stock_base, tmp_path, damage)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main([str(base), str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith(f"error: {base / 'model.safetensors'}: not a complete safetensors file") and reason in err
    assert "Traceback" not in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_sound_shard_passes_the_check(stock_base):
    from safetensors import safe_open

    sizes = export_module.safetensors_sizes(stock_base / "model.safetensors")
    with safe_open(stock_base / "model.safetensors", "pt") as f:
        expected = {k: f.get_slice(k).get_shape() for k in f.keys()}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert sizes.keys() == expected.keys()
    assert all(sizes[k] == tensors[k].numel() * tensors[k].element_size() for k in sizes)


@pytest.mark.parametrize(
    "file, content, reason",
    [
        ("config.json", "{not json", "not valid JSON"),
        ("config.json", "[1, 2]", "expected a JSON object"),
        ("model.safetensors.index.json", "{", "not valid JSON"),
        ("model.safetensors.index.json", '{"metadata": {}}', 'no "weight_map"'),
    ],
)
def test_broken_json_files_are_named(stock_base, tmp_path, file, content, reason, capsys):
    base = broken_copy(stock_base, tmp_path, lambda base: (base / file).write_text(content))
    with pytest.raises(SystemExit) as exit_info:
        main([str(base), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: {base / file}: ") and reason in err, err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_broken_bin_shard_is_named(stock_base, tmp_path):
    def damage(base):
        (base / "model.safetensors").unlink()
        (base / "pytorch_model.bin").write_bytes(b"PK\x03\x04 cut short")

    base = broken_copy(stock_base, tmp_path, damage)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: cannot be read as a PyTorch weights file"):
        export(str(base), tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- signals, stale staging, progress

# Runs the export CLI with the weight copy held at its first shard (the staging folder exists):
# prints READY, then waits until the test signals it.
HELD_EXPORT = textwrap.dedent(
    """
    import sys, time
    from tools import export as export_module

    copy = export_module.copy_file

    def held_copy(*args, **kwargs):
        copy(*args, **kwargs)
        print("READY", flush=True)
        time.sleep(120)

    export_module.copy_file = held_copy
    export_module.main(sys.argv[1:])
    """
)


def default_signal_dispositions() -> None:
    """In the child before exec: SIGINT and SIGTERM as a fresh shell gives them. A test run started
    with them ignored (`nohup`, a background job) would otherwise pass SIG_IGN on, and the child
    would never see the signal the test sends."""
    import signal

    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_DFL)


@contextmanager
def held_export(stock_base: Path, out: Path):
    """The held export CLI (see HELD_EXPORT), killed on the way out whatever the test did."""
    process = subprocess.Popen(
        [sys.executable, "-c", HELD_EXPORT, str(stock_base), str(out)],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=default_signal_dispositions,
    )
    try:
        assert process.stdout.readline().strip() == "READY", process.stderr.read()[-3000:]
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.parametrize("signal_name, exit_code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_sigterm_cleans_up_like_sigint(stock_base, tmp_path, signal_name, exit_code):
    import signal

    out = tmp_path / "out"
    with held_export(stock_base, out) as process:
        assert len(leftovers(tmp_path)) == 1  # the staging folder, with the first shard
        process.send_signal(getattr(signal, signal_name))
        _, err = process.communicate(timeout=60)
    assert process.returncode == exit_code, err[-3000:]
    assert "interrupted" in err and "Traceback" not in err
    assert leftovers(tmp_path) == [] and not out.exists()


def test_the_next_run_removes_staging_folders_of_killed_exports(stock_base, tmp_path):
    import signal

    out = tmp_path / "out"
    with held_export(stock_base, out) as process:
        process.send_signal(signal.SIGKILL)  # no clean-up possible
        process.communicate(timeout=60)
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(f".out.partial-{process.pid}-")
    # a staging folder of a live export to the same OUT (this process) and another OUT's are kept
    alive = tmp_path / f".out.partial-{os.getpid()}-abc"
    other = tmp_path / f".other.partial-{process.pid}-abc"
    alive.mkdir()
    other.mkdir()
    export(str(stock_base), out)
    assert leftovers(tmp_path) == sorted([alive.name, other.name])
    assert (out / "model.safetensors").is_file()


def test_progress_shows_bytes_per_shard(hub_base, tmp_path, capsys, monkeypatch):
    shards = sorted(p.name for p in hub_base.glob("model-*.safetensors"))
    main([str(hub_base), str(tmp_path / "out"), "--progress"])
    err = capsys.readouterr().err
    for i, name in enumerate(shards):
        size = (hub_base / name).stat().st_size / 2**20
        assert f"shard {i + 1}/{len(shards)} {name}: {size:,.1f} / {size:,.1f} MB" in err
    # by default only on a terminal: none when stderr is a file (capsys), some when it is a tty
    main([str(hub_base), str(tmp_path / "out2")])
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    main([str(hub_base), str(tmp_path / "out3")])
    assert f"shard 1/{len(shards)} " in capsys.readouterr().err
    main([str(hub_base), str(tmp_path / "out4"), "--no-progress"])
    assert capsys.readouterr().err == ""
