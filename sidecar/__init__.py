"""pg-sidecar: a PostgreSQL connection pooler that runs inside a Heroku dyno."""

__version__ = "0.1.0"
