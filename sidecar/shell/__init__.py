"""The process shell: the launcher (`bin/start-sidecar`), SIDECAR_WORKERS processes, and
assembling a proxy with its control surface. May import every other package."""
