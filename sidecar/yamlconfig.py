"""Per-pool overrides from an optional YAML file (`SIDECAR_CONFIG`, default `sidecar.yml`).

The file only refines what the environment already set up; the shape is

    pools:
      database:                          # a pool name ...
        default_pool_size: 40
      HEROKU_POSTGRESQL_COBALT_URL:      # ... or the config var it comes from
        default_pool_size: 60
        max_per_instance: 12

Values are checked exactly like the `SIDECAR_*` env vars; an unknown key, pool or bad value
is one ConfigError naming it (`sidecar.yml: pools.database.pool_size is not a pool setting`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .config import (
    POOL_MODES,
    SSLMODES,
    TARGET_SESSION_ATTRS,
    ConfigError,
    PoolConfig,
    Settings,
    _convert,
    _validate,
)

DEFAULT_FILE = "sidecar.yml"

#: Settings that may differ from pool to pool; the rest are about the whole process.
POOL_KEYS = (
    "pool_mode",
    "default_pool_size",
    "min_pool_size",
    "reserve_pool_size",
    "reserve_pool_timeout",
    "query_wait_timeout",
    "server_lifetime",
    "server_idle_timeout",
    "idle_transaction_timeout",
    "server_connect_timeout",
    "server_tls_sslmode",
    "server_tls_ca_file",
    "max_prepared_statements",
    "max_per_instance",
    "target_session_attrs",
    "max_replica_lag",
    "lag_check_interval",
)

_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(Settings)}
_CHOICES = {
    "pool_mode": POOL_MODES,
    "server_tls_sslmode": SSLMODES,
    "target_session_attrs": TARGET_SESSION_ATTRS,
}


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error, not last-wins."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _value in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"{key!r} is given twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def config_path(environ: Mapping[str, str], cwd: Path) -> Path | None:
    """The file to read: SIDECAR_CONFIG (must exist) or ./sidecar.yml when present."""
    named = environ.get("SIDECAR_CONFIG", "").strip()
    if named:
        path = Path(named) if os.path.isabs(named) else cwd / named
        if not path.is_file():
            raise ConfigError(f"SIDECAR_CONFIG {named!r} is not a file")
        return path
    default = cwd / DEFAULT_FILE
    return default if default.is_file() else None


def apply_file(
    pools: list[PoolConfig],
    settings: Settings,
    vars_by_pool: Mapping[str, str],
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> tuple[list[PoolConfig], Path | None]:
    """Pools with the file's overrides applied, and the file read (None when there is none).

    `vars_by_pool` maps pool name -> config var name, so either may name a pool in the file.
    """
    env = os.environ if environ is None else environ
    path = config_path(env, Path.cwd() if cwd is None else cwd)
    if path is None:
        return pools, None
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path.name}: cannot be read ({exc.strerror})") from None
    return apply_text(text, path.name, pools, settings, vars_by_pool), path


def apply_text(
    text: str,
    source: str,
    pools: list[PoolConfig],
    settings: Settings,
    vars_by_pool: Mapping[str, str],
) -> list[PoolConfig]:
    """Like apply_file, for YAML text; `source` names it in errors."""
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" (line {mark.line + 1}, column {mark.column + 1})"
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}: {problem}{where}") from None
    if doc is None:
        return pools
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with a `pools` key")
    for key in doc:
        if key != "pools":
            raise ConfigError(f"{source}: {key} is not a known key (only `pools` is)")
    section = doc.get("pools")
    if section is None:
        return pools
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: pools must be a mapping of pool name to settings")

    by_name = {p.name: p for p in pools}
    aliases = {var: name for name, var in vars_by_pool.items()}
    named: dict[str, str] = {}  # pool name -> how the file named it
    overrides: dict[str, dict[str, object]] = {}
    for key, body in section.items():
        label = str(key)
        name = label if label in by_name else aliases.get(label)
        if name is None:
            known = ", ".join(
                f"{n} ({vars_by_pool[n]})" if n in vars_by_pool else n for n in by_name
            )
            raise ConfigError(
                f"{source}: pools.{label} is not a pool of this process (pools: {known or 'none'})"
            )
        if name in named:
            raise ConfigError(
                f"{source}: pools.{label} and pools.{named[name]} are the same pool {name!r}"
            )
        named[name] = label
        overrides[name] = _pool_overrides(source, label, body, settings)

    out: list[PoolConfig] = []
    for pool in pools:
        extra = overrides.get(pool.name)
        if not extra:
            out.append(pool)
            continue
        merged = {**pool.overrides, **extra}
        effective = dataclasses.replace(settings, **merged)  # type: ignore[arg-type]
        _check_pool(source, named[pool.name], effective)
        out.append(dataclasses.replace(pool, overrides=merged))
    return out


def _pool_overrides(source: str, label: str, body: object, settings: Settings) -> dict[str, object]:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ConfigError(f"{source}: pools.{label} must be a mapping of setting to value")
    values: dict[str, object] = {}
    for key, raw in body.items():
        where = f"{source}: pools.{label}.{key}"
        if key not in POOL_KEYS or key not in _FIELD_TYPES:
            if key in _FIELD_TYPES:
                raise ConfigError(f"{where} applies to the whole process; set it as an env var")
            raise ConfigError(f"{where} is not a pool setting (known: {', '.join(POOL_KEYS)})")
        if isinstance(raw, dict | list) or raw is None:
            raise ConfigError(f"{where} must be a single value")
        kind = _FIELD_TYPES[key]
        if kind in (int, "int") and isinstance(raw, bool):
            raise ConfigError(f"{where} must be an integer, got {raw!r}")
        text = str(raw).lower() if isinstance(raw, bool) else str(raw)
        value = _convert(where, text, kind)
        choices = _CHOICES.get(key)
        if choices is not None and value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {raw!r}")
        values[key] = value
    return values


def _check_pool(source: str, label: str, s: Settings) -> None:
    """The rules _validate applies to the env, phrased for this pool's section of the file."""
    where = f"{source}: pools.{label}"
    if s.default_pool_size < 1:
        raise ConfigError(f"{where}.default_pool_size must be at least 1")
    if s.min_pool_size > s.default_pool_size:
        raise ConfigError(
            f"{where}.min_pool_size ({s.min_pool_size}) must not exceed default_pool_size "
            f"({s.default_pool_size})"
        )
    if (
        s.server_tls_sslmode.startswith("verify")
        and s.server_tls_ca_file
        and not os.path.isfile(s.server_tls_ca_file)
    ):
        raise ConfigError(f"{where}.server_tls_ca_file {s.server_tls_ca_file!r} is not a file")
    try:
        _validate(s)
    except ConfigError as exc:  # a rule added to _validate later still stops the start
        raise ConfigError(f"{where}: {exc}") from None
