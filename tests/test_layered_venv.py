"""tools.layered_venv (used by tools/setup_eval_env.sh): a venv that sees the environment it was
created from, whether that is the system Python or itself a venv, and a loud failure otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(python: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(python), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def layered(python: Path, venv: Path, *args: str) -> subprocess.CompletedProcess:
    return run_python(python, "-m", "tools.layered_venv", str(venv), "--without-pip", *args)


def site_packages(venv: Path) -> Path:
    return Path(run_python(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())


def test_a_venv_over_a_venv_sees_both(tmp_path):
    """main: a venv over this interpreter (torch visible) with a package of its own; eval: a venv
    created FROM main. `venv --system-site-packages` run from main would skip main's own package."""
    main = tmp_path / "main"
    done = layered(Path(sys.executable), main)
    assert done.returncode == 0, done.stderr
    (site_packages(main) / "only_in_main_venv.py").write_text("WHERE = 'main venv'\n")

    evaluation = tmp_path / "eval"
    done = layered(main / "bin" / "python", evaluation)
    assert done.returncode == 0, done.stderr
    (site_packages(evaluation) / "only_in_eval_venv.py").write_text("WHERE = 'eval venv'\n")
    probe = run_python(
        evaluation / "bin" / "python", "-c",
        "import sys, torch, transformers, only_in_main_venv, only_in_eval_venv; "
        "print(torch.__file__); print(only_in_main_venv.WHERE, only_in_eval_venv.WHERE); print(sys.prefix)",
    )
    assert probe.returncode == 0, probe.stderr
    import torch

    torch_file, marks, prefix = probe.stdout.strip().splitlines()
    assert Path(torch_file) == Path(torch.__file__)  # the main environment's torch, reused
    assert marks == "main venv eval venv"
    assert Path(prefix) == evaluation  # installs go to the eval venv, not the main one


def test_packages_of_the_new_venv_come_first(tmp_path):
    venv = tmp_path / "venv"
    assert layered(Path(sys.executable), venv).returncode == 0
    (site_packages(venv) / "transformers.py").write_text("SHADOW = True\n")  # stands for a pinned version
    probe = run_python(venv / "bin" / "python", "-c", "import transformers; print(transformers.SHADOW)")
    assert probe.stdout.strip() == "True", probe.stderr


def test_fails_loudly_when_torch_cannot_be_imported(tmp_path):
    """Created from an interpreter whose environment lacks torch (a bare venv): exit 1, a message
    naming the module and what to do, instead of a broken environment that looks ready."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    done = layered(bare / "bin" / "python", tmp_path / "eval")
    assert done.returncode == 1
    assert "cannot import torch, transformers" in done.stderr and "Install the project there first" in done.stderr
    assert "No module named 'torch'" in done.stderr

