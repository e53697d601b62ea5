# One command each; every target installs what it needs first (scripts/bootstrap: PostgreSQL 15
# and friends from Debian when missing, with apt-get as root (sudo if needed) and the network;
# .venv with the project and its test/dev extras from PyPI).
#
#   make demo    leader + 2 streaming followers + round-robin DNS, bin/start-sidecar around a
#                small workload, stats lines spreading connections; stops everything (< 90 s);
#                ARGS=--hold keeps it running and prints an admin console command (Ctrl-C stops)
#                ARGS=--failover: a leader failover behind a DNS name, followed by the sidecar
#   make test    the test suite (the same pytest command as .ci/run)
#   make lint    ruff check, ruff format --check, mypy
#   make bench   bench/run.py
#
# Extra arguments: make demo ARGS="--verbose --seconds 30", make test ARGS="-k launcher -x".
# Without make (minimal Debian images lack it): scripts/demo [ARGS...] for the demo, and
# `scripts/bootstrap && .venv/bin/python -m pytest -q` for the tests.

ARGS ?=

.PHONY: help demo test lint bench bootstrap

help:
	@sed -n '5,11p' $(firstword $(MAKEFILE_LIST)) | sed 's/^# //'

bootstrap:
	scripts/bootstrap

demo:
	scripts/demo $(ARGS)

test:
	scripts/bootstrap && .venv/bin/python -m pytest -q $(ARGS)

lint: bootstrap
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

bench: bootstrap
	.venv/bin/python bench/run.py $(ARGS)
