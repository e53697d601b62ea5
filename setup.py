"""Optional compiled hot path: the modules in COMPILED are built with Cython when it can be.

The .py files stay the only source: Cython compiles them in its pure-Python mode, typed by
the .pxd files beside them. Nothing here is required: without Cython, without a C compiler,
or when compiling fails, the package installs as pure Python (same behaviour, more CPU per
transaction) and says why. SIDECAR_BUILD_PURE=1 skips compiling on purpose.

`pip install -e .` builds the extensions in place (beside the .py files); `sidecar.build()`
tells which one runs, and SIDECAR_PURE_PYTHON=1 makes a compiled checkout run pure.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# The per-transaction path: the stream walkers and their bookkeeping, and the hand-over
# client -> pool -> server.
COMPILED = [
    "sidecar/protocol/frontend.py",
    "sidecar/protocol/backend.py",
    "sidecar/protocol/statements.py",
    "sidecar/protocol/messages.py",
    "sidecar/dataplane/client.py",
    "sidecar/dataplane/server.py",
    "sidecar/dataplane/pool.py",
    "sidecar/dataplane/counters.py",
]


ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(text: str) -> None:
    # stderr: pip shows it with -v, the buildpack and bootstrap always.
    print(f"pg-sidecar build: {text}", file=sys.stderr, flush=True)


class OptionalBuildExt(build_ext):
    """build_ext that falls back to the pure package: all modules compiled, or none."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # CompileError, LinkError, no compiler (OSError) ...
            self._undo(exc)
        else:
            if self.extensions:
                _say(f"compiled {len(self.extensions)} modules with Cython (build=compiled)")

    def build_extension(self, ext: Extension) -> None:
        # Per extension too: setuptools may call it outside run() (editable installs).
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._undo(exc)
            raise _Abandoned from exc

    def _undo(self, exc: BaseException) -> None:
        if isinstance(exc, _Abandoned):
            return
        for ext in self.extensions:
            # Built (build/lib) and copied beside the sources (in-place, editable installs).
            in_place = os.path.join(ROOT, self.get_ext_filename(ext.name))
            for path in (self.get_ext_fullpath(ext.name), in_place):
                if os.path.exists(path):
                    os.remove(path)
        why = f"{exc.__class__.__name__}: {exc}"
        _say(f"compiling failed ({why}); installing the pure-Python build")

    def get_outputs(self) -> list[str]:
        return [p for p in super().get_outputs() if os.path.exists(p)]


class _Abandoned(Exception):
    """One extension failed and the others were removed: stop building the rest."""


def _extensions() -> list[Extension]:
    if os.environ.get("SIDECAR_BUILD_PURE"):
        _say("SIDECAR_BUILD_PURE is set: installing the pure-Python build")
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        _say("Cython is not installed: installing the pure-Python build")
        return []
    try:
        return cythonize(
            [Extension(path[:-3].replace("/", "."), [path]) for path in COMPILED],
            compiler_directives={"language_level": "3"},
            quiet=True,
        )
    except Exception as exc:
        _say(f"Cython failed ({exc}); installing the pure-Python build")
        return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
