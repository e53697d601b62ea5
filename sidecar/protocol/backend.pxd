# Cython declarations for backend.py (the compiled build, see setup.py). The .py file stays
# the source; these give its walker C fields and its loop C integers and byte pointers.

cimport cython

from .messages cimport splice
from .statements cimport ServerStatements

# The message types it compares with, imported from messages.py into C ints of this module.
cdef int READY_FOR_QUERY, PARAMETER_STATUS, ERROR_RESPONSE, NOTIFICATION_RESPONSE
cdef int PARSE_COMPLETE, CLOSE_COMPLETE, COPY_IN_RESPONSE, TX_IDLE
cdef bytes _SLOW_PLAIN, _SLOW_EVERY, _IS_WHOLE
cdef Py_ssize_t MAX_MESSAGE_LENGTH
cdef bint _COMPILED


cdef class Backend:
    cdef public Py_ssize_t _skip
    cdef public bytes _held
    cdef public Py_ssize_t _batch_parses
    cdef public Py_ssize_t _batch_closes
    cdef public int tx_status
    cdef public bint copy_in
    cdef public bint at_boundary
    cdef public Py_ssize_t zs
    cdef public Py_ssize_t xacts
    cdef public bint rare
    cdef public Py_ssize_t errors
    cdef public bint fatal
    cdef public list params
    cdef public bint fatal_cut
    cdef public bytes cut
    cdef public long long own_pid
    cdef public long long client_pid

    @cython.locals(
        zs=Py_ssize_t,
        xacts=Py_ssize_t,
        n=Py_ssize_t,
        pos=Py_ssize_t,
        copied=Py_ssize_t,
        buf="const unsigned char*",
        slow="const unsigned char*",
        headed=Py_ssize_t,
        typ=int,
        length=int,
        end=Py_ssize_t,
        status=int,
        limit=Py_ssize_t,
        out=list,
    )
    cpdef bytes feed(self, bytes data, ServerStatements ctx=*)

    cpdef list _current(self, ServerStatements ctx)
    cpdef bint _replacing(self, ServerStatements ctx)
