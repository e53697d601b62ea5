"""pg-sidecar: a PostgreSQL connection pooler that runs inside a Heroku dyno.

The packages, in the order imports may point (each imports only those above it):

- `log`, `config`, `yamlconfig`: logging and settings, read by every part.
- `protocol/`: the sans-IO wire protocol (bytes in, events and bytes out; no asyncio).
- `upstream/`: who to connect to (DNS discovery of instances, their health, the balancer).
- `dataplane/`: the bytes between apps and servers (client and server connections, pools,
  the proxy with its listeners and janitor, the counters the hot path adds to).
- `control/`: the admin console and the stats reporter; they read the data plane.
- `shell/`: the process around it all (launcher, workers, assembling a proxy, the loop);
  `__main__` is `python -m sidecar`.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

__version__ = "0.1.0"

#: Set (to anything but "" or "0") to run the pure-Python modules even where compiled ones
#: were built beside them (setup.py builds the hot path with Cython when it can).
PURE_ENV = "SIDECAR_PURE_PYTHON"


class _SourceOnly(importlib.abc.MetaPathFinder):
    """Finds sidecar's modules as .py files only. Python prefers an extension module to a
    .py file of the same name in one directory, so forcing the pure build needs a finder of
    its own, ahead of the standard ones."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if path is None or not fullname.startswith(__name__ + "."):
            return None
        leaf = fullname.rpartition(".")[2]
        for entry in path:
            source = os.path.join(entry, leaf + ".py")
            if os.path.isfile(source):
                return importlib.util.spec_from_file_location(fullname, source)
        return None  # a package (or nothing): the standard finders take it


def pure_forced() -> bool:
    return os.environ.get(PURE_ENV, "") not in ("", "0")


def _stale_extensions() -> list[str]:
    """Compiled modules older than their .py or .pxd: an edit (or a checkout) since the last
    build. Running them would run old code, so the whole package runs pure until rebuilt."""
    here = os.path.dirname(__file__)
    stale = []
    for sub in ("protocol", "dataplane"):
        folder = os.path.join(here, sub)
        for name in os.listdir(folder):
            suffix = next(
                (s for s in importlib.machinery.EXTENSION_SUFFIXES if name.endswith(s)), ""
            )
            if not suffix:
                continue
            base = os.path.join(folder, name[: -len(suffix)])
            built = os.path.getmtime(os.path.join(folder, name))
            for source in (base + ".py", base + ".pxd"):
                if os.path.exists(source) and os.path.getmtime(source) > built:
                    stale.append(os.path.relpath(source, os.path.dirname(here)))
    return sorted(stale)


#: Sources edited since their compiled modules were built (those then are not used).
STALE = _stale_extensions()

if (pure_forced() or STALE) and not any(isinstance(f, _SourceOnly) for f in sys.meta_path):
    sys.meta_path.insert(0, _SourceOnly())


def build() -> str:
    """Which build runs: "compiled" (the hot path's C extensions) or "python"."""
    from .protocol import frontend

    compiled = (frontend.__file__ or "").endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    return "compiled" if compiled else "python"
