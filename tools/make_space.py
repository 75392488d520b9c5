"""Writes a ready-to-push Hugging Face Space folder of the demo.

    python -m tools.make_space OUT [--model REPO_OR_PATH] [--hardware t4-small] [--title TITLE]

The folder holds only what the Space runs: app.py, the demo package (mfpruner_demo), the modules
of mfpruner_lib that the demo imports, the shipped model code (pyproject's py-modules: the tiny
default model is built from it), requirements.txt, and a README.md with the Space front matter
(sdk: gradio at the installed version, app_file, python_version). Push it with
`hf upload SPACE_ID OUT --repo-type space` or git. The model: `--model` writes it into
demo_model.txt (a local folder is copied into the Space); the Space variable MFPRUNER_MODEL
overrides it; without either the Space serves the tiny random-weights model. The folder is built
beside OUT and renamed into place when complete (tools.export's staging); a refused input (OUT
around or inside --model, a --model path that is missing or not an MFPruner repo, a title that is
not one printable line) is one line `error: ...`.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mfpruner_demo.loading import MODEL_ENV, MODEL_FILE, check_model_spec  # noqa: E402
from mfpruner_lib.cli import ArgumentParser, refusals_as_errors  # noqa: E402
from tools.export import check_apart, check_inside, check_out_folder, staged_folder  # noqa: E402

# Spaces' hardware names (the README's `suggested_hardware`).
HARDWARE = (
    "cpu-basic", "cpu-upgrade", "zero-a10g", "t4-small", "t4-medium", "l4x1", "l4x4", "a10g-small", "a10g-large",
    "a10g-largex2", "a10g-largex4", "a100-large",
)
LOCAL_MODEL_FOLDER = "model"  # a local --model folder is copied here


def local_module_files(name: str) -> list[Path]:
    """The files of a top-level module or package of this checkout that `import name` (or
    `from name import ...`) reads: ROOT/name.py, or the package's __init__.py and, for a dotted
    name, the submodule's file. Empty for everything else (installed packages)."""
    parts = name.split(".")
    if (ROOT / f"{parts[0]}.py").is_file():
        return [ROOT / f"{parts[0]}.py"]
    package = ROOT / parts[0]
    if not (package / "__init__.py").is_file():
        return []
    files = [package / "__init__.py"]
    if len(parts) > 1:
        module = package.joinpath(*parts[1:])
        files += [f for f in (module.with_suffix(".py"), module / "__init__.py") if f.is_file()]
    return files


def imported_names(path: Path) -> list[str]:
    """Every module name an import statement of `path` may read (at any depth of the file: the
    lazy imports inside functions count too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]  # `from package import module`
    return names


def app_files() -> list[Path]:
    """app.py and every file of this checkout it imports, transitively, plus the shipped model
    code (the tiny default model's save_pretrained copies it into the model folder)."""
    shipped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"]
    todo = [ROOT / "app.py", *(ROOT / f"{name}.py" for name in shipped)]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(path):
            todo += local_module_files(name)
    return sorted(seen)


def requirements() -> str:
    """The project's runtime requirements (requirements.txt), its pinned ranges as they are."""
    lines = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    return "# The MFPruner demo's runtime requirements (the project's requirements.txt).\n" + "\n".join(lines) + "\n"


def readme(title: str, model: str | None, hardware: str | None) -> str:
    import gradio

    front = [
        "---",
        f"title: {yaml_title(title)}",
        "emoji: ✂️",
        "colorFrom: indigo",
        "colorTo: yellow",
        "sdk: gradio",
        f"sdk_version: {gradio.__version__}",
        f'python_version: "{sys.version_info.major}.{sys.version_info.minor}"',
        "app_file: app.py",
        "pinned: false",
        "license: apache-2.0",
        *([f"suggested_hardware: {hardware}"] if hardware else []),
        *([f"models:\n  - {model}"] if model and model != LOCAL_MODEL_FOLDER else []),
        "---",
    ]
    served = (
        f"`{model}` (named in `{MODEL_FILE}`)" if model
        else "the built-in tiny MFPruner LLaVA-1.5 with random weights (pruning, counts and timings are real; "
        "cue maps and answers are noise)"
    )
    body = f"""
# MFPruner: which visual tokens survive

Training-free visual-token pruning for vision-language models: three cues (the vision tower's [CLS]
attention, token uniqueness, relevance to the question) vote on the visual tokens, and the language
model prefills only the kept ones. Upload a picture, ask a question, slide the budget.

## The model

This Space serves {served}. To serve another MFPruner model (a hub repo exported with
`python -m tools.export` of the MFPruner project, any of LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL), set the
Space variable `{MODEL_ENV}` to its repo id (Settings -> Variables and secrets), or write the id into
`{MODEL_FILE}`. The variable wins over the file; without either the tiny random-weights model runs.
The app loads the model with `trust_remote_code=True`, in float16 on a GPU.

On ZeroGPU the model calls run under `@spaces.GPU`; elsewhere `python app.py` serves on the host and
port that Spaces set (`GRADIO_SERVER_NAME`, `GRADIO_SERVER_PORT`).
"""
    return "\n".join(front) + "\n" + body


def yaml_title(title: str) -> str:
    """The title as a YAML double-quoted scalar (a JSON string is one): `:` and `#` stay text.
    A title is one line of printable text; anything else would add lines to the front matter."""
    if not isinstance(title, str) or not title.strip() or not title.isprintable():
        raise ValueError(f"`--title` must be one line of printable text, got {title!r}")
    return json.dumps(title, ensure_ascii=False)


def check_model_folder(folder: Path) -> None:
    """Every file of a local --model folder is copied into the Space (and pushed with it): each
    must lie inside the folder (a link to a file elsewhere is refused) and exist (no dangling link)."""
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() and not path.exists():
            raise ValueError(f"--model folder {str(folder)!r}: {str(path)!r} is a link to a missing file ({os.readlink(path)!r})")
        check_inside(path, folder, f"--model folder's {str(path)!r}")


def make_space(out: str | Path, model: str | None = None, hardware: str | None = None,
               title: str = "MFPruner demo") -> Path:
    """Writes the Space folder `out` (which must not exist, or be empty), built in a staging folder
    beside it and renamed into place when complete. Returns its path."""
    out = Path(out).expanduser()
    check_out_folder(out)
    if model is not None and Path(model).expanduser().is_dir():  # first: the clearest message
        check_apart(out, {"--model": Path(model).expanduser()})
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"OUT {str(out)!r} exists and is not empty; give a new folder")
    if hardware is not None and hardware not in HARDWARE:
        raise ValueError(f"`--hardware` must be one of {list(HARDWARE)}, got {hardware!r}")
    yaml_title(title)
    model_folder = check_model_spec(model, "--model") if model is not None else None
    if model_folder is not None:
        check_model_folder(model_folder)
    with staged_folder(out) as staging:
        for path in app_files():
            target = staging / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        if model_folder is not None:  # a local folder: copied into the Space
            shutil.copytree(model_folder, staging / LOCAL_MODEL_FOLDER)
            model = LOCAL_MODEL_FOLDER
        if model is not None:
            (staging / MODEL_FILE).write_text(model + "\n")
        (staging / "requirements.txt").write_text(requirements())
        (staging / "README.md").write_text(readme(title, model, hardware))
    return out


@refusals_as_errors
def main(argv=None) -> Path:
    parser = ArgumentParser(prog="python -m tools.make_space", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the Space folder to write (new or empty)")
    parser.add_argument("--model", help=f"hub id or local MFPruner repo the Space serves (written to {MODEL_FILE}; "
                        f"a local folder is copied in); default: the tiny random-weights model")
    parser.add_argument("--hardware", choices=HARDWARE, help="the README's suggested_hardware")
    parser.add_argument("--title", default="MFPruner demo")
    args = parser.parse_args(argv)
    out = make_space(args.out, args.model, args.hardware, args.title)
    print(f"wrote {out}: {sorted(str(p.relative_to(out)) for p in out.rglob('*') if p.is_file())}")
    return out


if __name__ == "__main__":
    main()
