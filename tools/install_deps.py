"""Install the dependencies declared in pyproject.toml into the current interpreter.

The project itself is not installed: it runs from the repository root (pytest `pythonpath`),
so packages with generic names such as `reference` never land in site-packages.
torch is installed first, pinned to the CPU build that lies on disk, so that no later
requirement makes pip download a CUDA build.
"""

import subprocess
import sys
import tomllib

CPU_TORCH = "torch==2.13.0"


def main() -> None:
    with open("pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.check_call([*pip, CPU_TORCH])
    subprocess.check_call([*pip, CPU_TORCH, *[d for d in deps if not d.startswith("torch")]])


if __name__ == "__main__":
    main()
