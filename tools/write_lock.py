"""Write requirements.lock: every distribution the project needs, pinned at the version in this venv.

The lock is the pip constraints file that `dev.sh` (tests) and the Dockerfile (image) both install with,
so CI and the image run the same versions. Run it through `bash dev.sh lock` after changing a pin in
pyproject.toml. Local version labels are dropped (`2.13.0+cpu` -> `2.13.0`): the image installs the
CUDA build of the same torch release.
"""

from __future__ import annotations

import sys
import tomllib
from collections import deque
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
HEADER = """\
# Constraints for pip: every package the service (runtime) and its tests need, pinned.
# Generated from the project's venv by `bash dev.sh lock` (tools/write_lock.py); do not edit by hand.
# Used by dev.sh and the Dockerfile as `pip install -c requirements.lock ...`.
# torch: the CPU build in CI, the CUDA build of the same release in the image (its CUDA libraries,
# nvidia-* and triton, are pinned by torch itself and so are not listed here).

"""


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> tuple[list[Requirement], list[Requirement]]:
    """The runtime dependencies and the `test` extra of pyproject.toml."""
    project = tomllib.loads(pyproject.read_text())["project"]
    runtime = [Requirement(r) for r in project["dependencies"]]
    test = [Requirement(r) for r in project["optional-dependencies"]["test"]]
    return runtime, test


def installed_closure(roots: list[Requirement]) -> dict[str, str]:
    """Every distribution `roots` need, transitively, as installed here: {canonical name: version}."""
    pins: dict[str, str] = {}
    queue = deque((req, "") for req in roots)
    seen: set[tuple[str, str]] = set()
    while queue:
        req, extra = queue.popleft()
        if req.marker and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        wanted = {(name, e) for e in ("", *req.extras)} - seen
        if not wanted:
            continue
        seen |= wanted
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{req} is needed but not installed: run `bash dev.sh test` first") from None
        pins[name] = Version(dist.version).public
        for _, with_extra in wanted:
            queue.extend((Requirement(r), with_extra) for r in dist.requires or [])
    return pins


def render_lock() -> str:
    """The lock file's text: the runtime closure, then what only the tests add."""
    runtime, test = project_requirements()
    runtime_pins = installed_closure(runtime)
    test_pins = {n: v for n, v in installed_closure(runtime + test).items() if n not in runtime_pins}
    lines = [HEADER, "# runtime: installed in the image\n"]
    lines += [f"{name}=={version}\n" for name, version in sorted(runtime_pins.items())]
    lines += ["\n# test only: dev.sh and CI\n"]
    lines += [f"{name}=={version}\n" for name, version in sorted(test_pins.items())]
    return "".join(lines)


if __name__ == "__main__":
    LOCK.write_text(render_lock())
    print(f"wrote {LOCK.relative_to(ROOT)}", file=sys.stderr)
