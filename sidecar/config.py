"""Configuration: `SIDECAR_*` env vars (`PGBOUNCER_*` as fallbacks) and upstream URLs, checked once.

Everything the proxy reads from its environment goes through here, so a bad value is one clear
error at start naming the variable, never a surprise later.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

from .upstream.budget import BudgetSetting, parse_budget


class ConfigError(Exception):
    """A configuration value is missing or invalid; the message names it."""


SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
POOL_MODES = ("transaction", "session")
AUTH_TYPES = ("scram-sha-256", "md5")
URL_STYLES = ("tcp", "unix")
#: SIDECAR_CLIENT_TLS: answer an app's SSLRequest with TLS (allow), never (off), or insist.
CLIENT_TLS_MODES = ("allow", "off", "require")
#: libpq's target_session_attrs values, and `auto` (see upstream/roles.py).
TARGET_SESSION_ATTRS = (
    "auto",
    "any",
    "read-write",
    "primary",
    "read-only",
    "standby",
    "prefer-standby",
)
#: Most proxy processes SIDECAR_WORKERS may ask for (a performance dyno has at most 8 cores).
MAX_WORKERS = 64

# URL query parameters that configure the connection itself, not the server session.
_LIBPQ_CONNECTION_KEYS = {
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslcrl",
    "sslpassword",
    "sslcompression",
    "sslsni",
    "connect_timeout",
    "target_session_attrs",
    "gssencmode",
    "krbsrvname",
    "channel_binding",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "requirepeer",
    "passfile",
    "host",
    "hostaddr",
    "port",
    "service",
    "load_balance_hosts",
}


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where one pool's server connections go, parsed from a postgres:// URL."""

    host: str
    port: int
    user: str
    password: str = field(repr=False)
    dbname: str
    sslmode: str | None = None  # from the URL; None means "use SIDECAR_SERVER_TLS_SSLMODE"
    sslrootcert: str | None = None
    #: From the URL; None means "use SIDECAR_TARGET_SESSION_ATTRS" (the URL wins).
    target_session_attrs: str | None = None
    params: dict[str, str] = field(default_factory=dict)  # startup params for the server

    def redacted(self) -> str:
        """The URL without its password, for log lines."""
        return f"postgres://{self.user}@{self.host}:{self.port}/{self.dbname}"


def parse_url(url: str, what: str = "URL") -> Upstream:
    """Parse postgres:// or postgresql:// URLs; `what` names the source in errors."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port or 5432
    except ValueError:
        # urlsplit's message quotes the "port", which is part of the password when the
        # password holds an unencoded "/", "?" or "#": never echo it.
        raise ConfigError(
            f"{what} is not a valid postgres:// URL (bad port; percent-encode special"
            " characters in the user and password)"
        ) from None
    if parts.scheme not in ("postgres", "postgresql"):
        raise ConfigError(f"{what} is not a postgres:// URL")
    host = parts.hostname or ""
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    host = host or query.get("host", "")
    if not host:
        raise ConfigError(f"{what} has no host")
    user = unquote(parts.username or "")
    if not user:
        raise ConfigError(f"{what} has no user")
    password = unquote(parts.password or "")
    dbname = unquote(parts.path.lstrip("/")) or user
    sslmode = query.get("sslmode")
    if sslmode is not None and sslmode not in SSLMODES:
        raise ConfigError(f"{what} has an invalid sslmode {sslmode!r}")
    target = query.get("target_session_attrs")
    if target is not None and target not in TARGET_SESSION_ATTRS:
        raise ConfigError(
            f"{what} has an invalid target_session_attrs {target!r}"
            f" (one of {', '.join(TARGET_SESSION_ATTRS)})"
        )
    params = {k: v for k, v in query.items() if k not in _LIBPQ_CONNECTION_KEYS}
    return Upstream(
        host=host,
        port=port,
        user=user,
        password=password,
        dbname=dbname,
        sslmode=sslmode,
        sslrootcert=query.get("sslrootcert"),
        target_session_attrs=target,
        params=params,
    )


def pool_name_for_var(var: str) -> str:
    """DATABASE_URL -> database, HEROKU_POSTGRESQL_COBALT_URL -> heroku_postgresql_cobalt."""
    name = var.lower()
    return name[: -len("_url")] if name.endswith("_url") else name


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """One pool: the database name clients use, its upstream, and its own settings overrides."""

    name: str
    upstream: Upstream
    #: Settings field name -> value, applied over the global Settings for this pool only.
    overrides: dict[str, object] = field(default_factory=dict)

    def settings(self, base: Settings) -> Settings:
        if not self.overrides:
            return base
        return dataclasses.replace(base, **self.overrides)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob, with PgBouncer's defaults unless the README argues otherwise."""

    port: int = 6000
    socket_dir: str = "/tmp"
    pool_mode: str = "transaction"
    default_pool_size: int = 20
    min_pool_size: int = 0
    reserve_pool_size: int = 0
    reserve_pool_timeout: float = 5.0
    max_client_conn: int = 1000
    query_wait_timeout: float = 120.0
    server_connect_timeout: float = 15.0
    server_lifetime: float = 3600.0
    server_idle_timeout: float = 600.0
    # Before reusing a server idle this long, prove it alive (so a dead one costs no client a
    # failed query: the client is served by another). Negative disables.
    server_check_delay: float = 30.0
    server_check_query: str = ""
    idle_transaction_timeout: float = 0.0
    # A query running longer is cancelled and its client disconnected (0: no limit). Also what
    # frees a client from a server that stalled mid-query.
    query_timeout: float = 0.0
    client_idle_timeout: float = 0.0
    #: A client that has not logged in this long after connecting is closed (0: never).
    client_login_timeout: float = 60.0
    #: TLS towards the apps (see dataplane/clienttls.py): allow, off or require.
    client_tls: str = "allow"
    #: The app-facing certificate and key (PEM files); empty: one made at start.
    client_tls_cert: str = ""
    client_tls_key: str = ""
    server_tls_sslmode: str = "require"
    server_tls_ca_file: str = ""
    auth_type: str = "scram-sha-256"
    stats_period: float = 60.0
    log_connections: bool = True
    log_disconnections: bool = True
    max_prepared_statements: int = 200
    shutdown_timeout: float = 25.0
    urls: str = "DATABASE_URL"
    enabled: bool = True
    #: Most server connections one pool opens to one instance (0 = unlimited).
    max_per_instance: int = 0
    #: "ip:port ip:port" DNS servers to ask instead of the system resolver (tests, debugging).
    dns_nameservers: str = ""
    #: Shortest time between two DNS queries for one host, whatever the TTL says.
    dns_min_interval: float = 1.0
    #: An address missing from DNS answers this long is dropped once it also fails a check.
    dns_forget_after: float = 120.0
    #: Which instances a pool's servers go to, in libpq's words; `auto`: a leader pool
    #: (read-write) or a follower pool (prefer-standby) by what the first instance reports.
    target_session_attrs: str = "auto"
    #: A standby lagging more seconds than this serves no new transactions (0 = off).
    max_replica_lag: float = 0.0
    #: How often each instance's role (leader pools on a DNS name) and lag are checked.
    lag_check_interval: float = 5.0
    url_style: str = "tcp"  # how the launcher exports URLs to the app: tcp or unix
    #: Proxy processes: a number, or "auto" for the CPUs this process may use (workers.py).
    workers: str = "1"
    #: Connections per instance for every sidecar of the app together (upstream/budget.py):
    #: auto (90 % of max_connections - superuser_reserved_connections), N%, a number, 0 = off.
    instance_budget: str = "auto"
    #: How often each pool counts its user's backends on each instance it uses.
    budget_interval: float = 5.0


# Settings that PgBouncer's Heroku buildpack users already set under PGBOUNCER_*.
PGBOUNCER_FALLBACKS = frozenset(
    {
        "urls",
        "pool_mode",
        "default_pool_size",
        "min_pool_size",
        "reserve_pool_size",
        "reserve_pool_timeout",
        "max_client_conn",
        "query_wait_timeout",
        "server_lifetime",
        "server_idle_timeout",
        "server_tls_sslmode",
        "stats_period",
        "max_prepared_statements",
        "enabled",
        "log_connections",
        "log_disconnections",
        "client_login_timeout",
    }
)

#: PGBOUNCER_* names that differ from ours: setting -> (PgBouncer's var, its values to ours).
#: PgBouncer's client_tls_sslmode speaks libpq's words; what it asks of a client maps onto
#: ours (prefer/allow: TLS when asked; require and the verify-* modes: TLS or nothing, since a
#: pooler that does not check client certificates verifies nothing more).
PGBOUNCER_RENAMED: dict[str, tuple[str, dict[str, str] | None]] = {
    "client_tls": (
        "PGBOUNCER_CLIENT_TLS_SSLMODE",
        {
            "disable": "off",
            "allow": "allow",
            "prefer": "allow",
            "require": "require",
            "verify-ca": "require",
            "verify-full": "require",
        },
    ),
    "client_tls_cert": ("PGBOUNCER_CLIENT_TLS_CERT_FILE", None),
    "client_tls_key": ("PGBOUNCER_CLIENT_TLS_KEY_FILE", None),
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _convert(name: str, raw: str, kind: object) -> object:
    value = raw.strip()
    if kind in (int, "int"):
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if number < 0:
            raise ConfigError(f"{name} must not be negative, got {raw!r}")
        return number
    if kind in (float, "float"):
        try:
            seconds = float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
        if seconds < 0 or seconds != seconds:
            raise ConfigError(f"{name} must not be negative, got {raw!r}")
        return seconds
    if kind in (bool, "bool"):
        low = value.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{name} must be 0 or 1, got {raw!r}")
    return value


def load_settings(
    environ: Mapping[str, str] | None = None,
) -> tuple[Settings, list[str]]:
    """Settings from the environment, and the PGBOUNCER_* names that were used as fallbacks."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    fallbacks: list[str] = []
    for f in dataclasses.fields(Settings):
        key = f"SIDECAR_{f.name.upper()}"
        raw = env.get(key)
        source = key
        if raw is None and f.name in PGBOUNCER_FALLBACKS:
            pg_key = f"PGBOUNCER_{f.name.upper()}"
            raw = env.get(pg_key)
            if raw is not None:
                fallbacks.append(pg_key)
                source = pg_key
        if raw is None and f.name in PGBOUNCER_RENAMED:
            pg_key, words = PGBOUNCER_RENAMED[f.name]
            raw = env.get(pg_key)
            if raw is not None:
                fallbacks.append(pg_key)
                source = pg_key
                if words is not None:
                    if raw.strip().lower() not in words:
                        raise ConfigError(
                            f"{pg_key} must be one of {', '.join(words)}, got {raw!r}"
                        )
                    raw = words[raw.strip().lower()]
        if raw is None:
            continue
        values[f.name] = _convert(source, raw, f.type)
    settings = Settings(**values)  # type: ignore[arg-type]
    _validate(settings)
    return settings, fallbacks


def _validate(s: Settings) -> None:
    if s.pool_mode not in POOL_MODES:
        raise ConfigError(f"SIDECAR_POOL_MODE must be transaction or session, got {s.pool_mode!r}")
    if s.server_tls_sslmode not in SSLMODES:
        raise ConfigError(
            f"SIDECAR_SERVER_TLS_SSLMODE must be one of {', '.join(SSLMODES)}, "
            f"got {s.server_tls_sslmode!r}"
        )
    if s.target_session_attrs not in TARGET_SESSION_ATTRS:
        raise ConfigError(
            f"SIDECAR_TARGET_SESSION_ATTRS must be one of {', '.join(TARGET_SESSION_ATTRS)},"
            f" got {s.target_session_attrs!r}"
        )
    if s.url_style not in URL_STYLES:
        raise ConfigError(f"SIDECAR_URL_STYLE must be tcp or unix, got {s.url_style!r}")
    if s.url_style == "unix" and not s.socket_dir:
        raise ConfigError("SIDECAR_URL_STYLE=unix needs SIDECAR_SOCKET_DIR (it is empty)")
    if s.auth_type not in AUTH_TYPES:
        raise ConfigError(f"SIDECAR_AUTH_TYPE must be scram-sha-256 or md5, got {s.auth_type!r}")
    if not 0 < s.port < 65536:
        raise ConfigError(f"SIDECAR_PORT must be a TCP port, got {s.port}")
    if s.default_pool_size < 1:
        raise ConfigError("SIDECAR_DEFAULT_POOL_SIZE must be at least 1")
    if s.min_pool_size > s.default_pool_size:
        raise ConfigError("SIDECAR_MIN_POOL_SIZE must not exceed SIDECAR_DEFAULT_POOL_SIZE")
    if s.max_client_conn < 1:
        raise ConfigError("SIDECAR_MAX_CLIENT_CONN must be at least 1")
    if s.server_tls_ca_file and not os.path.isfile(s.server_tls_ca_file):
        raise ConfigError(f"SIDECAR_SERVER_TLS_CA_FILE {s.server_tls_ca_file!r} is not a file")
    if s.client_tls not in CLIENT_TLS_MODES:
        raise ConfigError(
            f"SIDECAR_CLIENT_TLS must be one of {', '.join(CLIENT_TLS_MODES)}, got {s.client_tls!r}"
        )
    check_client_tls_files(s.client_tls_cert, s.client_tls_key)
    if s.dns_min_interval <= 0:
        raise ConfigError("SIDECAR_DNS_MIN_INTERVAL must be more than 0 seconds")
    parse_nameservers(s.dns_nameservers)
    parse_workers(s.workers)
    budget_setting(s)
    if s.budget_interval <= 0:
        raise ConfigError("SIDECAR_BUDGET_INTERVAL must be more than 0 seconds")


def budget_setting(s: Settings) -> BudgetSetting:
    """SIDECAR_INSTANCE_BUDGET, parsed."""
    try:
        return parse_budget(s.instance_budget)
    except ValueError as exc:
        raise ConfigError(f"SIDECAR_INSTANCE_BUDGET {exc}, got {s.instance_budget!r}") from None


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal: a dyno would hang at start.
    raise ConfigError(
        "SIDECAR_CLIENT_TLS_KEY is encrypted with a passphrase; give an unencrypted key"
        " (the file itself should be readable by this user only)"
    )


def check_client_tls_files(cert: str, key: str) -> None:
    """SIDECAR_CLIENT_TLS_CERT/KEY: both or neither, and a pair that loads (key matches)."""
    if not cert and not key:
        return
    if not (cert and key):
        given, missing = (
            ("SIDECAR_CLIENT_TLS_CERT", "SIDECAR_CLIENT_TLS_KEY")
            if cert
            else ("SIDECAR_CLIENT_TLS_KEY", "SIDECAR_CLIENT_TLS_CERT")
        )
        raise ConfigError(f"{given} is set but {missing} is not: give both files, or neither")
    for name, path in (("SIDECAR_CLIENT_TLS_CERT", cert), ("SIDECAR_CLIENT_TLS_KEY", key)):
        if not os.path.isfile(path):
            raise ConfigError(f"{name} {path!r} is not a file")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"{name} {path!r} is not readable by this process")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except ssl.SSLError as exc:
        # "KEY_VALUES_MISMATCH", "NO_START_LINE" (not PEM), a key with a passphrase...
        raise ConfigError(
            f"SIDECAR_CLIENT_TLS_CERT/SIDECAR_CLIENT_TLS_KEY do not load as a PEM certificate"
            f" and its private key (unencrypted): {exc.reason or exc}"
        ) from None


def parse_workers(text: str) -> int | None:
    """SIDECAR_WORKERS as a number of processes, or None for `auto`."""
    value = text.strip().lower()
    if value == "auto":
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= MAX_WORKERS:
        raise ConfigError(
            f"SIDECAR_WORKERS must be auto or a number from 1 to {MAX_WORKERS}, got {text!r}"
        )
    return number


def parse_nameservers(text: str) -> list[tuple[str, int]]:
    """SIDECAR_DNS_NAMESERVERS ("127.0.0.1:5353 [::1]:53 10.0.0.2") as (ip, port) pairs.

    The port defaults to 53; an IPv6 address with a port goes in brackets.
    """
    servers: list[tuple[str, int]] = []
    for word in text.split():
        host, port_text = word, "53"
        if word.startswith("["):
            host, sep, rest = word[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                host = ""
            port_text = rest[1:] if rest else "53"
        elif word.count(":") == 1:
            host, _, port_text = word.partition(":")
        try:
            ipaddress.ip_address(host)
            port = int(port_text)
        except ValueError:
            port = 0
        if not 0 < port < 65536:
            raise ConfigError(
                f"SIDECAR_DNS_NAMESERVERS must be space-separated IP:PORT pairs, got {word!r}"
            )
        servers.append((host, port))
    return servers


def pools_from_args(args: list[str]) -> list[PoolConfig]:
    """`NAME=URL` arguments (or a bare URL, named after its database)."""
    pools: list[PoolConfig] = []
    for arg in args:
        name, sep, url = arg.partition("=")
        if not sep or "://" in name:
            upstream = parse_url(arg, "argument")
            name = upstream.dbname
        else:
            upstream = parse_url(url, f"argument {name}")
        pools.append(PoolConfig(name=name, upstream=upstream))
    _check_unique(pools)
    return pools


def pools_from_env(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> list[PoolConfig]:
    """One pool per config var named in SIDECAR_URLS."""
    env = os.environ if environ is None else environ
    pools: list[PoolConfig] = []
    for var in settings.urls.split():
        url = env.get(var, "")
        if not url.strip():
            raise ConfigError(f"{var} is not set (named in SIDECAR_URLS)")
        pools.append(PoolConfig(name=pool_name_for_var(var), upstream=parse_url(url, var)))
    if not pools:
        raise ConfigError("SIDECAR_URLS names no config vars")
    _check_unique(pools)
    return pools


def _check_unique(pools: list[PoolConfig]) -> None:
    seen: set[str] = set()
    for p in pools:
        if p.name in seen:
            raise ConfigError(f"two pools are named {p.name!r}")
        if p.name in ("sidecar", "pgbouncer"):
            raise ConfigError(f"pool name {p.name!r} is reserved for the admin console")
        seen.add(p.name)
