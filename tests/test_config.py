"""Configuration: URL parsing, PGBOUNCER_* fallbacks, and the per-pool YAML file's errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import (
    ConfigError,
    PoolConfig,
    Settings,
    load_settings,
    parse_url,
    pool_name_for_var,
    pools_from_env,
)
from sidecar.yamlconfig import apply_text, config_path

# -- URLs and pool names -------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["postgres", "postgresql"])
def test_parse_url_decodes_credentials_and_keeps_query_params(scheme: str) -> None:
    up = parse_url(
        f"{scheme}://u%2Bser:p%40ss%3Aw%2Frd%25%2B@db.example.com:5433/my%20db"
        "?sslmode=verify-full&sslrootcert=/ca.pem&application_name=web&options=-c%20jit%3Doff"
    )
    assert (up.user, up.password) == ("u+ser", "p@ss:w/rd%+")
    assert (up.host, up.port, up.dbname) == ("db.example.com", 5433, "my db")
    assert (up.sslmode, up.sslrootcert) == ("verify-full", "/ca.pem")
    assert up.params == {"application_name": "web", "options": "-c jit=off"}
    assert "p@ss" not in up.redacted() and "p%40ss" not in up.redacted()


@pytest.mark.parametrize(
    ("var", "name"),
    [
        ("DATABASE_URL", "database"),
        ("HEROKU_POSTGRESQL_COBALT_URL", "heroku_postgresql_cobalt"),
        ("REPLICA", "replica"),
    ],
)
def test_pool_name_for_var(var: str, name: str) -> None:
    assert pool_name_for_var(var) == name


def test_pools_from_env_names_the_missing_var() -> None:
    settings = Settings(urls="DATABASE_URL FOLLOWER_URL")
    with pytest.raises(ConfigError, match=r"^FOLLOWER_URL is not set"):
        pools_from_env(settings, {"DATABASE_URL": "postgres://u:p@h/d"})


# -- PGBOUNCER_* fallbacks -----------------------------------------------------------------------


def test_pgbouncer_vars_fill_in_unset_sidecar_vars() -> None:
    settings, used = load_settings(
        {
            "PGBOUNCER_POOL_MODE": "session",
            "PGBOUNCER_DEFAULT_POOL_SIZE": "7",
            "PGBOUNCER_URLS": "DATABASE_URL FOLLOWER_URL",
            "PGBOUNCER_ENABLED": "1",
            "SIDECAR_MAX_CLIENT_CONN": "50",
            "PGBOUNCER_MAX_CLIENT_CONN": "9",
        }
    )
    assert settings.pool_mode == "session"
    assert settings.default_pool_size == 7
    assert settings.urls == "DATABASE_URL FOLLOWER_URL"
    assert settings.max_client_conn == 50  # SIDECAR_* wins
    assert sorted(used) == [
        "PGBOUNCER_DEFAULT_POOL_SIZE",
        "PGBOUNCER_ENABLED",
        "PGBOUNCER_POOL_MODE",
        "PGBOUNCER_URLS",
    ]


def test_no_fallbacks_reported_without_pgbouncer_vars() -> None:
    assert load_settings({"SIDECAR_POOL_MODE": "session"})[1] == []


def test_a_bad_pgbouncer_value_names_the_pgbouncer_var() -> None:
    with pytest.raises(ConfigError, match=r"^PGBOUNCER_DEFAULT_POOL_SIZE must be an integer"):
        load_settings({"PGBOUNCER_DEFAULT_POOL_SIZE": "twenty"})


def test_url_style_is_checked() -> None:
    assert load_settings({"SIDECAR_URL_STYLE": "unix"})[0].url_style == "unix"
    with pytest.raises(ConfigError, match="SIDECAR_URL_STYLE must be tcp or unix"):
        load_settings({"SIDECAR_URL_STYLE": "socket"})
    with pytest.raises(ConfigError, match="needs SIDECAR_SOCKET_DIR"):
        load_settings({"SIDECAR_URL_STYLE": "unix", "SIDECAR_SOCKET_DIR": ""})


# -- the YAML file -------------------------------------------------------------------------------

UP = parse_url("postgres://u:p@h/d")
VARS = {"database": "DATABASE_URL", "heroku_postgresql_cobalt": "HEROKU_POSTGRESQL_COBALT_URL"}


def _apply(text: str, base: Settings | None = None) -> dict[str, PoolConfig]:
    pools = [PoolConfig(name, UP) for name in VARS]
    out = apply_text(text, "sidecar.yml", pools, base or Settings(), VARS)
    return {p.name: p for p in out}


def test_overrides_by_pool_name_and_by_var_name() -> None:
    pools = _apply(
        """
pools:
  database:
    pool_mode: session
    reserve_pool_timeout: 2        # an int is fine for seconds
  HEROKU_POSTGRESQL_COBALT_URL:
    default_pool_size: 40
    max_per_instance: 12
    server_tls_sslmode: verify-full
"""
    )
    assert pools["database"].overrides == {"pool_mode": "session", "reserve_pool_timeout": 2.0}
    cobalt = pools["heroku_postgresql_cobalt"]
    assert cobalt.overrides == {
        "default_pool_size": 40,
        "max_per_instance": 12,
        "server_tls_sslmode": "verify-full",
    }
    s = cobalt.settings(Settings())
    assert (s.default_pool_size, s.max_per_instance) == (40, 12)
    assert pools["database"].settings(Settings()).default_pool_size == 20


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "pools:\n", "pools: {}\n"])
def test_empty_files_change_nothing(text: str) -> None:
    assert all(not p.overrides for p in _apply(text).values())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # unknown keys, named with their path
        ("pool:\n  database: {}\n", "sidecar.yml: pool is not a known key"),
        (
            "pools:\n  database:\n    pool_sise: 3\n",
            "pools.database.pool_sise is not a pool setting",
        ),
        (
            "pools:\n  database:\n    max_client_conn: 3\n",
            "pools.database.max_client_conn applies to the whole process",
        ),
        # unknown pools
        ("pools:\n  follower:\n    default_pool_size: 3\n", "pools.follower is not a pool"),
        ("pools:\n  FOLLOWER_URL: {}\n", "pools.FOLLOWER_URL is not a pool"),
        # bad values, checked as the env vars are
        (
            "pools:\n  database:\n    default_pool_size: lots\n",
            "default_pool_size must be an integer",
        ),
        (
            "pools:\n  database:\n    default_pool_size: 2.5\n",
            "default_pool_size must be an integer",
        ),
        (
            "pools:\n  database:\n    default_pool_size: true\n",
            "default_pool_size must be an integer",
        ),
        (
            "pools:\n  database:\n    max_per_instance: -1\n",
            "max_per_instance must not be negative",
        ),
        ("pools:\n  database:\n    server_lifetime: soon\n", "server_lifetime must be a number"),
        (
            "pools:\n  database:\n    pool_mode: statement\n",
            "pools.database.pool_mode must be one of",
        ),
        (
            "pools:\n  database:\n    server_tls_sslmode: on\n",
            "pools.database.server_tls_sslmode must be one of",
        ),
        ("pools:\n  database:\n    default_pool_size: [1]\n", "must be a single value"),
        ("pools:\n  database:\n    default_pool_size:\n", "must be a single value"),
        ("pools:\n  database:\n    default_pool_size: 0\n", "default_pool_size must be at least 1"),
        (
            "pools:\n  database:\n    min_pool_size: 30\n",
            "pools.database.min_pool_size (30) must not exceed default_pool_size (20)",
        ),
        (
            "pools:\n  database:\n    server_tls_sslmode: verify-ca\n"
            "    server_tls_ca_file: /nonexistent/ca.pem\n",
            "server_tls_ca_file '/nonexistent/ca.pem' is not a file",
        ),
        # shapes
        ("- database\n", "the top level must be a mapping"),
        ("pools: [database]\n", "pools must be a mapping"),
        ("pools:\n  database: 40\n", "pools.database must be a mapping"),
        (
            "pools:\n  database: {}\n  DATABASE_URL: {}\n",
            "pools.DATABASE_URL and pools.database are the same pool",
        ),
        (
            "pools:\n  database:\n    default_pool_size: 3\n    default_pool_size: 4\n",
            "'default_pool_size' is given twice (line 4",
        ),
        ("pools:\n  database: {default_pool_size: 3\n", "sidecar.yml: "),
        ("pools:\n\tdatabase: {}\n", "(line 2, column 1)"),
    ],
)
def test_yaml_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _apply(text)
    assert message in str(err.value)
    assert str(err.value).startswith("sidecar.yml: ")
    assert "\n" not in str(err.value)


def test_the_pools_min_size_is_checked_against_its_own_default_size() -> None:
    pools = _apply("pools:\n  database:\n    min_pool_size: 30\n    default_pool_size: 40\n")
    assert pools["database"].overrides == {"min_pool_size": 30, "default_pool_size": 40}


def test_config_path(tmp_path: Path) -> None:
    assert config_path({}, tmp_path) is None
    (tmp_path / "sidecar.yml").write_text("pools: {}\n")
    assert config_path({}, tmp_path) == tmp_path / "sidecar.yml"
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "pool.yml").write_text("pools: {}\n")
    assert config_path({"SIDECAR_CONFIG": "conf/pool.yml"}, tmp_path) == tmp_path / "conf/pool.yml"
    with pytest.raises(ConfigError, match=r"^SIDECAR_CONFIG 'conf/nope\.yml' is not a file$"):
        config_path({"SIDECAR_CONFIG": "conf/nope.yml"}, tmp_path)


@pytest.mark.parametrize(
    ("pgbouncer", "ours"),
    [
        ("disable", "off"),
        ("allow", "allow"),
        ("prefer", "allow"),
        ("require", "require"),
        ("verify-ca", "require"),
        ("verify-full", "require"),
    ],
)
def test_pgbouncer_client_tls_sslmode_maps_onto_client_tls(pgbouncer: str, ours: str) -> None:
    settings, used = load_settings({"PGBOUNCER_CLIENT_TLS_SSLMODE": pgbouncer})
    assert settings.client_tls == ours
    assert used == ["PGBOUNCER_CLIENT_TLS_SSLMODE"]
    # SIDECAR_* wins, and is not reported as a fallback
    settings, used = load_settings(
        {"PGBOUNCER_CLIENT_TLS_SSLMODE": pgbouncer, "SIDECAR_CLIENT_TLS": "off"}
    )
    assert (settings.client_tls, used) == ("off", [])


def test_client_tls_defaults_and_login_timeout_fallback() -> None:
    settings, _ = load_settings({})
    assert (settings.client_tls, settings.client_login_timeout) == ("allow", 60.0)
    settings, used = load_settings({"PGBOUNCER_CLIENT_LOGIN_TIMEOUT": "15"})
    assert (settings.client_login_timeout, used) == (15.0, ["PGBOUNCER_CLIENT_LOGIN_TIMEOUT"])
    with pytest.raises(ConfigError, match="SIDECAR_CLIENT_TLS_CERT is set but"):
        load_settings({"SIDECAR_CLIENT_TLS_CERT": "/etc/hostname"})
