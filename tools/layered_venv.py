"""Creates a virtual environment layered over the RUNNING interpreter's environment.

    python -m tools.layered_venv VENV [--without-pip] [--require torch transformers]

The new environment sees every package of the environment this runs in (a venv, a conda env or
the system Python), after its own: packages installed into it win, the rest (torch,
transformers, ...) are reused, and the main environment is never changed.

Why not `python -m venv --system-site-packages`: run from inside a venv, that layers over the
venv's BASE interpreter, not over the venv, so the venv's own torch is invisible. Here the new
environment gets a .pth file that adds the running interpreter's site-packages folders with
`site.addsitedir` (which also processes their .pth files: editable installs, nested layers).
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path

from mfpruner_lib.cli import ArgumentParser, refusals_as_errors  # standard library only

PTH_NAME = "_main_environment.pth"


def main_site_folders() -> list[str]:
    """The site-packages folders of the running interpreter (+ its user site, where enabled)."""
    folders = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and Path(site.getusersitepackages()).is_dir():
        folders.append(site.getusersitepackages())
    return folders


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def missing_modules(venv: Path, modules: list[str]) -> dict[str, str]:
    """{module: the error} for each module that the environment's interpreter cannot import."""
    missing = {}
    for module in modules:
        done = subprocess.run([str(venv_python(venv)), "-c", f"import {module}"], capture_output=True, text=True)
        if done.returncode != 0:
            missing[module] = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
    return missing


def create(venv: Path, with_pip: bool = True) -> Path:
    """Creates `venv` (or reuses it) with the .pth that layers it over the running environment."""
    command = [sys.executable, "-m", "venv", str(venv)] + ([] if with_pip else ["--without-pip"])
    subprocess.run(command, check=True)
    purelib = subprocess.run(
        [str(venv_python(venv)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    lines = [f"import site; site.addsitedir({folder!r})" for folder in main_site_folders()]
    (Path(purelib) / PTH_NAME).write_text("\n".join(lines) + "\n", encoding="utf-8")
    if with_pip and (Path(purelib) / "setuptools").is_dir():
        # ensurepip (Python <= 3.11) adds an old setuptools that would hide the main environment's
        # (torch needs setuptools >= 77): only pip stays the new environment's own
        subprocess.run([str(venv_python(venv)), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True)
    return venv


@refusals_as_errors
def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m tools.layered_venv", description=__doc__.splitlines()[0])
    parser.add_argument("venv", type=Path, help="the folder of the new virtual environment")
    parser.add_argument("--without-pip", action="store_true", help="do not install pip into it")
    parser.add_argument(
        "--require", nargs="*", default=["torch", "transformers"], metavar="MODULE",
        help="modules that must import in the new environment (default: torch transformers)",
    )
    args = parser.parse_args(argv)
    create(args.venv, with_pip=not args.without_pip)
    missing = missing_modules(args.venv, args.require)
    if missing:
        details = "\n".join(f"  {module}: {error}" for module, error in missing.items())
        print(
            f"error: {args.venv} cannot import {', '.join(missing)}, which it should reuse from the environment of "
            f"{sys.executable} (site-packages: {', '.join(main_site_folders())}):\n{details}\n"
            "Install the project there first (README: Set-up), then run this again.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
