"""Upstream knowledge: which instances a pool's host name has (DNS discovery, health) and
which one gets the next server connection (balancer, caps). Imports `config` and `log` only."""
