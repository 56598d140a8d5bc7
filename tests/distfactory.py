"""Build real, importable distributions (dist-info + module) in a directory for discovery tests.

``importlib.metadata`` finds a distribution through its ``*.dist-info`` directory on ``sys.path``,
exactly as for a pip-installed package, so these tests exercise real entry-point discovery without
a slow pip install.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path


def make_plugin_dist(
    root: Path,
    *,
    dist: str,
    module: str,
    code: str,
    entry_name: str | None = None,
    version: str = "1.0.0",
) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(code))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(
        f"[host.plugins]\n{entry_name or module} = {module}\n"
    )


class SysPath:
    """Context manager putting a directory first on sys.path and forgetting its modules after."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __enter__(self) -> SysPath:
        sys.path.insert(0, self.path)
        self._before = set(sys.modules)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.path.remove(self.path)
        for name in set(sys.modules) - self._before:
            mod = sys.modules.get(name)
            if mod is not None and str(getattr(mod, "__file__", "") or "").startswith(self.path):
                del sys.modules[name]
