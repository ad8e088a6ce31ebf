"""Print the pinned requirements of pyproject.toml (dependencies + the given extras), one a line.

The Dockerfile installs exactly these, so the image and `make install` share one source of
pins (torch==2.13.0, mlflow==3.17.2, ...):  python scripts/requirements.py server > req.txt
"""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """The project's dependencies followed by those of `extras`."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    found = list(project["dependencies"])
    for extra in extras:
        found += project["optional-dependencies"][extra]
    return found


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    pyproject = next(p / "pyproject.toml" for p in (here, here.parent)
                     if (p / "pyproject.toml").exists())
    print("\n".join(requirements(pyproject, sys.argv[1:])))
