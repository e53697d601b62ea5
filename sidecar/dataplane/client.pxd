# Cython declarations for client.py (the compiled build, see setup.py): ClientConn is an
# extension type, each field a C struct member (and no per-client __dict__), and the
# hand-over's methods are C calls. Every attribute of ClientConn must be declared here.
#
# client.pxd and server.pxd cimport each other: that works because neither module imports
# the other at run time (what both need is in sockets.py), so either may be loaded first.

from ..protocol.backend cimport Backend
from ..protocol.frontend cimport Frontend
from .counters cimport PoolStats
from .server cimport ServerConn


cdef class ClientConn:
    # Per transaction: the linked server, the walker, the bytes held while waiting.
    cdef public ServerConn server
    cdef public Frontend frontend
    cdef public list buffer
    cdef public dict params, startup_params
    cdef public object pool, state, write, transport, pins
    # Clocks and flags.
    cdef public double last_active, wait_started, connected_at
    cdef public bint params_full, _paused, tls, counted, _tcp, _handshaking, _sasl_started
    cdef public bint _user_ok
    # Login and identity.
    cdef public object proxy, user, database, addr, admin
    cdef public object _startup, _negotiated, _reader, _scram, _md5_salt
    cdef public long long pid, secret

    cpdef _forward(self, bytes data, double now=*)
    cpdef _buffer(self, bytes data)
    cpdef flush_to(self, ServerConn server, double now=*)
    cpdef unlink(self, double now=*)
