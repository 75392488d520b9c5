"""tools.make_space: a Space folder that runs the demo on its own, started from that folder alone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import gradio
import pytest

from mfpruner_demo.loading import MODEL_ENV, MODEL_FILE, default_model_spec
from tools.make_space import ROOT, imported_names, main, make_space

from conftest import random_image, refused


def front_matter(readme: str) -> dict[str, str]:
    head = readme.split("---\n")[1]
    return dict(line.split(": ", 1) for line in head.splitlines() if ": " in line)


def mfpruner_repo(folder: Path, model_type: str = "mfpruner_llava") -> Path:
    """A folder that make_space takes for a model repo (it reads config.json's model_type only)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_demo_never_imports_the_scripts():
    """app.py and the demo package read shipped code and mfpruner_lib only, never tools/."""
    for path in [ROOT / "app.py", *(ROOT / "mfpruner_demo").glob("*.py")]:
        assert not [name for name in imported_names(path) if name.split(".")[0] == "tools"], path


def test_space_folder_holds_only_what_the_space_needs(tmp_path):
    out = make_space(tmp_path / "space", hardware="t4-small")
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"app.py", "README.md", "requirements.txt", "mfpruner_demo/ui.py", "mfpruner_lib/families.py",
            "mfpruner_core.py", "modeling_mfpruner_llava.py", "modeling_mfpruner_qwen2_5_vl.py"} <= files
    assert not [f for f in files if f.startswith(("tools/", "tests/", "benchmarks/", "docs/", "mfpruner_eval/"))]
    assert "mfpruner_lib/browser.py" not in files and MODEL_FILE not in files  # not imported; no --model
    meta = front_matter((out / "README.md").read_text())
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio.__version__ and meta["app_file"] == "app.py"
    assert meta["python_version"] == f'"{sys.version_info.major}.{sys.version_info.minor}"'
    assert meta["suggested_hardware"] == "t4-small"
    assert MODEL_ENV in (out / "README.md").read_text()
    assert (out / "requirements.txt").read_text().splitlines()[1:] == [
        line for line in (ROOT / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")
    ]
    with pytest.raises(ValueError, match="not empty"):
        make_space(out)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "other"), "--hardware", "a-big-one"])


def test_model_choice_of_a_space(tmp_path, monkeypatch):
    """--model: a hub id goes to demo_model.txt and the front matter; a local folder is copied in.
    The app's default: $MFPRUNER_MODEL, else demo_model.txt (a copied folder resolved in the Space)."""
    monkeypatch.delenv(MODEL_ENV, raising=False)
    hub = make_space(tmp_path / "hub", model="you/mfpruner-llava-1.5-7b")
    assert "models:\n  - you/mfpruner-llava-1.5-7b" in (hub / "README.md").read_text()
    assert default_model_spec(hub) == "you/mfpruner-llava-1.5-7b"
    local = mfpruner_repo(tmp_path / "repo")
    space = make_space(tmp_path / "local", model=str(local))
    assert (space / "model" / "config.json").is_file() and default_model_spec(space) == str(space / "model")
    monkeypatch.setenv(MODEL_ENV, "other/repo")
    assert default_model_spec(space) == "other/repo"
    assert default_model_spec(tmp_path) == "other/repo"
    monkeypatch.delenv(MODEL_ENV)
    assert default_model_spec(tmp_path) is None  # no file: the tiny model


def test_space_folder_serves_the_demo_alone(tmp_path):
    """`python app.py` started in the Space folder, PYTHONPATH unset and Python's environment
    variables ignored (-E -s): it serves the page and answers one analysis through the API."""
    from gradio_client import Client, handle_file

    out = make_space(tmp_path / "space")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", MODEL_ENV)}
    # None of the project's modules can be imported from outside the folder: what the app runs is the folder's.
    probe = subprocess.run(
        [sys.executable, "-E", "-s", "-c", "import importlib.util as u; "
         "print([n for n in ('app', 'mfpruner_demo', 'mfpruner_lib', 'mfpruner_core') if u.find_spec(n)])"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert probe.stdout.strip() == "[]", f"the project is importable from outside the folder ({probe.stdout.strip()}: " \
        "an installed copy, e.g. `pip install -e .`), so this test cannot show that the folder is complete"
    port = free_port()
    env.update(
        HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", GRADIO_ANALYTICS_ENABLED="False", MPLBACKEND="Agg",
        GRADIO_SERVER_PORT=str(port), HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1",
    )
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-E", "-s", "app.py"], cwd=out, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/"
    try:
        import httpx

        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1)
        image = tmp_path / "image.png"
        random_image(2, size=(120, 80)).save(image)
        client = Client(url, verbose=False)
        *_, stats_text, details, _ = client.predict(
            handle_file(str(image)), "What is in the image?", "tokens", 5, 0.1, 2, False, api_name="/prune"
        )
        assert details["kept"] == 5 and details["visual_tokens"] == 576 and "Kept 5 / 576" in stats_text
        assert details["model"] == "tiny MFPruner LLaVA-1.5 (random weights)"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    assert not (out / "tools").exists() and Path(out / "app.py").read_text() == (ROOT / "app.py").read_text()


# ----------------------------------------------------------------------------- refused inputs


def tree_snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("out-inside-model", "lies inside --model"),
        ("out-is-model", "is --model"),
        ("model-inside-out", "contains --model"),
    ],
)
def test_out_and_model_must_be_apart(tmp_path, case, expected, capsys):
    """`make_space MODEL/space --model MODEL` once copied the Space into itself until RecursionError."""
    model = mfpruner_repo(tmp_path / "models" / "model")
    out = {"out-inside-model": model / "space", "out-is-model": model, "model-inside-out": tmp_path / "models"}[case]
    before = tree_snapshot(tmp_path)
    assert expected in refused(main, [str(out), "--model", str(model)], capsys)
    assert tree_snapshot(tmp_path) == before and not (model / "space").exists()
    assert leftovers(model) == leftovers(model.parent) == []


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing-absolute", "folder '{tmp}/nope' does not exist"),
        ("missing-relative", "folder './nope' does not exist"),
        ("missing-deep", "folder 'a/b/nope' does not exist"),
        ("a-file", "is a file; give a model folder"),
        ("no-config", "has no config.json"),
        ("stock", "is a stock 'llava' checkpoint, not an MFPruner repo; export it first (from the MFPruner project: "
                  "python -m tools.export {tmp}/stock {tmp}/stock-mfpruner)"),
        ("other-model", "is a 'bert' checkpoint; the demo serves MFPruner repos of"),
        ("dangling-link", "is a link to a missing file"),
        ("link-out", "resolves to '{tmp}/secret.txt', outside"),
    ],
)
def test_model_paths_are_checked(tmp_path, monkeypatch, case, expected, capsys):
    """A --model that is not a hub id must be an MFPruner repo folder; nothing is written otherwise."""
    monkeypatch.chdir(tmp_path)
    model = {"missing-absolute": str(tmp_path / "nope"), "missing-relative": "./nope", "missing-deep": "a/b/nope"}.get(case)
    if case == "a-file":
        model = str(tmp_path / "weights.bin")
        Path(model).write_bytes(b"x")
    elif case == "no-config":
        model = str(tmp_path / "empty")
        Path(model).mkdir()
    elif case in ("stock", "other-model"):
        model = str(mfpruner_repo(tmp_path / "stock", "llava" if case == "stock" else "bert"))
    elif case == "dangling-link":
        model = str(mfpruner_repo(tmp_path / "repo"))
        (Path(model) / "tokenizer.json").symlink_to(tmp_path / "gone.json")
    elif case == "link-out":
        model = str(mfpruner_repo(tmp_path / "repo"))
        (tmp_path / "secret.txt").write_text("not for the Space")
        (Path(model) / "notes.txt").symlink_to(tmp_path / "secret.txt")
    before = sorted(p.name for p in tmp_path.iterdir())
    message = refused(main, [str(tmp_path / "space"), "--model", model], capsys)
    assert expected.format(tmp=tmp_path) in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no Space folder, no staging folder


def test_the_space_is_built_aside_and_renamed_into_place(tmp_path, monkeypatch):
    """A failure while writing leaves neither OUT nor a staging folder behind."""
    import tools.make_space as make_space_module

    def broken_readme(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(make_space_module, "readme", broken_readme)
    with pytest.raises(OSError, match="disk full"):
        make_space(tmp_path / "space", model=str(mfpruner_repo(tmp_path / "repo")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    monkeypatch.undo()
    (tmp_path / "empty").mkdir()  # an empty OUT is replaced
    out = make_space(tmp_path / "empty")
    assert (out / "app.py").is_file() and leftovers(tmp_path) == []


@pytest.mark.parametrize("title", ["MFPruner: demo #1", 'say "hi" \\ {x}: [y] & *z', "✂️ tokens - 50%"])
def test_the_title_is_quoted_in_the_front_matter(tmp_path, title):
    import yaml

    out = make_space(tmp_path / "space", model="you/mfpruner-llava-1.5-7b", title=title)
    meta = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert meta["title"] == title and meta["sdk"] == "gradio" and meta["models"] == ["you/mfpruner-llava-1.5-7b"]


@pytest.mark.parametrize("title", ["demo\nsdk: docker", "demo\r\n", "tab\there", "   "])
def test_a_title_that_is_not_one_printable_line_is_refused(tmp_path, title, capsys):
    message = refused(main, [str(tmp_path / "space"), "--title", title], capsys)
    assert message.startswith("`--title` must be one line of printable text")
    assert list(tmp_path.iterdir()) == []


def test_argument_errors_are_one_line(tmp_path, capsys):
    message = refused(main, [str(tmp_path / "space"), "--hardware", "a-big-one"], capsys)
    assert "invalid choice: 'a-big-one'" in message and "python -m tools.make_space --help" in message


def test_out_must_not_be_the_current_folder_or_under_a_file(tmp_path, monkeypatch, capsys):
    """The same OUT checks as the export's (the Space folder replaces OUT by a rename)."""
    monkeypatch.chdir(tmp_path)
    assert "is the current folder" in refused(main, ["."], capsys)
    (tmp_path / "a-file").write_text("x")
    assert "its parent" in refused(main, ["a-file/space"], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
