"""The data plane: client and server connections, pools, and the proxy that owns them.

Moves bytes between apps and PostgreSQL servers. Imports `protocol`, `upstream`, `config` and
`log`, never `control` or `shell`: the console and stats reporter are handed in (Proxy).
"""
