# Cython declarations for pool.py (the compiled build, see setup.py): Pool is an extension
# type, its fields C struct members, and the hand-over's methods (acquire, _link, _move,
# transaction_done, _release) C calls on typed clients and servers. Every attribute of Pool
# must be declared here.

from ..protocol.statements cimport Registry
from .client cimport ClientConn
from .counters cimport PoolStats
from .server cimport ServerConn


cdef class Pool:
    # The per-transaction fields.
    cdef public list idle, logins
    cdef public set active, tasks, _budget_wanted
    cdef public object waiters, settings, budgets
    cdef public Py_ssize_t connecting
    cdef public bint paused, transaction_mode
    cdef public dict defaults, _excess, _canon
    cdef public PoolStats stats
    cdef public Registry registry
    # The rest: configuration, upstream, statistics.
    cdef public object proxy, config, name, sslmode, ssl_context, server_hostname, scram_secret
    cdef public object last_error, instances, discovery, roles, _rng, totals, last_period
    cdef public dict parked, _reported_failures, _warned

    cpdef _move(self, ServerConn server, new)
    cpdef acquire(self, ClientConn client)
    cpdef transaction_done(self, ServerConn server, double now)
    cpdef _release(self, ServerConn server, double now=*)
    cpdef _link(self, ClientConn client, ServerConn server, double now=*)
