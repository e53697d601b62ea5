"""SQLSTATE codes the proxy itself uses, and the protocol error raised by the sans-IO core."""

from __future__ import annotations

# Codes from PostgreSQL's errcodes.txt; the proxy only ever reports these.
PROTOCOL_VIOLATION = "08P01"
CONNECTION_FAILURE = "08006"
CONNECTION_EXCEPTION = "08000"
SQLCLIENT_UNABLE_TO_ESTABLISH = "08001"
INVALID_PASSWORD = "28P01"
INVALID_AUTHORIZATION = "28000"
INVALID_CATALOG_NAME = "3D000"
TOO_MANY_CONNECTIONS = "53300"
ADMIN_SHUTDOWN = "57P01"
CANNOT_CONNECT_NOW = "57P03"
QUERY_CANCELED = "57014"
FEATURE_NOT_SUPPORTED = "0A000"
IDLE_IN_TRANSACTION_TIMEOUT = "25P03"
IDLE_SESSION_TIMEOUT = "57P05"
SYNTAX_ERROR = "42601"
INTERNAL_ERROR = "XX000"


class ProtocolError(Exception):
    """The peer broke the wire protocol; the connection cannot continue."""

    def __init__(
        self, message: str, sqlstate: str = PROTOCOL_VIOLATION, *, silent: bool = False
    ) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        #: PostgreSQL only logs this one (a COMMERROR) and closes without an ErrorResponse:
        #: the peer may not speak the protocol at all (a bad startup packet's length).
        self.silent = silent
