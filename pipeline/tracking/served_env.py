"""What a served model needs installed, checked against what it declares.

A logged `report-vlm` or `vision-bridge` version carries `requirements.txt` (the pins of
`registry.SERVED_PACKAGES`). Serving installs exactly those, with their own dependencies, into
a fresh environment. `missing_requirements` names every distribution whose modules the served
code had imported (at load and predict) that those requirements would not install: each one
is an import error waiting in a fresh environment.
"""
from __future__ import annotations

import sys
from importlib import metadata
from typing import Iterable

PROJECT_MODULES = ("pipeline", "steps", "tests")


def _canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(name)


def imported_distributions(modules: Iterable[str]) -> set[str]:
    """The installed distributions (canonical names) providing `modules` (as in
    `sys.modules`); the standard library and this project are left out."""
    providers = metadata.packages_distributions()
    found = set()
    for module in modules:
        top = module.split(".")[0]
        if not top or top.startswith("_") or top in sys.stdlib_module_names \
                or top in PROJECT_MODULES:
            continue
        found.update(_canonical(dist) for dist in providers.get(top, ()))
    return found


def installed_closure(requirements: Iterable[str]) -> set[str]:
    """The distributions `pip install` of `requirements` brings: each one and, transitively,
    what it requires (on any platform; behind an extra only when asked for)."""
    from packaging.requirements import InvalidRequirement, Requirement

    todo, seen = [], set()
    for line in requirements:
        line = line.strip()
        if line and not line.startswith(("#", "-")):
            todo.append(Requirement(line))
    while todo:
        req = todo.pop()
        name = _canonical(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            declared = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in declared:
            try:
                dep = Requirement(text)
            except InvalidRequirement:
                continue
            # A dependency for another platform or Python counts: a library that imports it
            # where it happens to be installed (tqdm's colorama) copes without it. One behind
            # an extra counts only when the extra is asked for.
            wanted = [{"extra": extra} for extra in req.extras] or [{"extra": ""}]
            if dep.marker is None or "extra" not in str(dep.marker) \
                    or any(dep.marker.evaluate(env) for env in wanted):
                todo.append(dep)
    return seen


def missing_requirements(requirements: Iterable[str], modules: Iterable[str]) -> list[str]:
    """Distributions the served code imported that `requirements` would not install."""
    return sorted(imported_distributions(modules) - installed_closure(requirements))
