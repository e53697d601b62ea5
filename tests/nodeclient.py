"""node-postgres (`pg`) for the tests: installed once into tests/.node/, scripts run by node.

The package comes from the npm registry (`npm install --no-audit --no-fund pg`) the first time
a test needs it; later sessions reuse the directory (git-ignored). A lock file serialises the
install between pytest processes started at the same time. Tests that need Node are skipped
where node or npm is missing (a developer machine without them); CI installs both.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

NODE_DIR = Path(__file__).resolve().parent / ".node"


def node_modules() -> Path:
    """The node_modules directory holding `pg`, installing it if needed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for node-postgres tests")
    NODE_DIR.mkdir(exist_ok=True)
    modules = NODE_DIR / "node_modules"
    with open(NODE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (modules / "pg" / "package.json").exists():
            if not (NODE_DIR / "package.json").exists():
                (NODE_DIR / "package.json").write_text('{"private": true}\n')
            subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "pg"],
                cwd=NODE_DIR,
                check=True,
                capture_output=True,
                timeout=300,
            )
    return modules


def run_node(script: str, timeout: float = 60.0, **env: str) -> Any:
    """Run a node script with `pg` requirable; return what it printed last, parsed as JSON.

    `env` is added to the script's environment (read there as process.env.NAME).
    """
    modules = node_modules()
    proc = subprocess.run(
        ["node", "-e", script],
        env={**os.environ, "NODE_PATH": str(modules), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"node exited with {proc.returncode}:\n{proc.stderr}{proc.stdout}")
    lines = proc.stdout.strip().splitlines()
    assert lines, f"node printed nothing:\n{proc.stderr}"
    return json.loads(lines[-1])
