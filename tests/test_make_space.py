"""tools.make_space: a Space folder that runs the demo on its own, started from that folder alone."""

from __future__ import annotations

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

from conftest import random_image


def front_matter(readme: str) -> dict[str, str]:
    head = readme.split("---\n")[1]
    return dict(line.split(": ", 1) for line in head.splitlines() if ": " in line)


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
    local = tmp_path / "repo"
    local.mkdir()
    (local / "config.json").write_text("{}")
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
