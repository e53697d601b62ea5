# Cython declarations for server.py (the compiled build, see setup.py): ServerConn is an
# extension type, each field a C struct member, so the hand-over (client -> server -> pool)
# reads and writes them without a dict or descriptor lookup. Every attribute of ServerConn
# must be declared here. TLSServerConn stays a Python subclass (uvloop's buffer protocol
# check wants an asyncio.BufferedProtocol).

cimport cython

from ..protocol.backend cimport Backend
from ..protocol.statements cimport ServerStatements
from .client cimport ClientConn
from .counters cimport PoolStats


cdef class ServerConn:
    # uvloop calls the Python entry; enter_data_mode and TLSServerConn call it in C.
    @cython.locals(backend=Backend, st=PoolStats, client=ClientConn, zs=Py_ssize_t, now=double)
    cpdef data_received(self, bytes data)
    cpdef bint _rare(self, Backend backend, ClientConn client)

    # The linked client and what the hot path reads or counts per transaction.
    cdef public ClientConn client
    cdef public Backend backend
    cdef public ServerStatements statements
    cdef public PoolStats stats
    cdef public Py_ssize_t pending
    # Clocks and flags (C doubles and ints).
    cdef public double query_start, xact_start, last_used, linked_at, expires_at, created_at
    cdef public bint dirty_tail, transaction_mode, paused, mid_message, out_of_step, fatal_seen
    cdef public bint tls, _lost_called
    # Python objects: the pool, the state member, the transport, identity, message mode.
    cdef public object pool, state, write, transport, host, port, instance, close_reason
    cdef public object _inbuf, _waiter, _lost
    cdef public dict params
    cdef public long long pid, secret
