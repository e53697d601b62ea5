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

__version__ = "0.1.0"
