# Cython declarations for frontend.py (the compiled build, see setup.py). The .py file stays
# the source; these give its walker C fields and its loop C integers and byte pointers.

cimport cython

from .messages cimport splice
from .statements cimport Registry, ServerStatements, Statement

# The message types it compares with, imported from messages.py into C ints of this module.
cdef int PARSE, BIND, DESCRIBE, CLOSE, QUERY, SYNC, TERMINATE, EXECUTE, TARGET_STATEMENT
cdef int ERROR_RESPONSE, PARSE_COMPLETE, CLOSE_COMPLETE
cdef int _NONE
cdef int _K_USUAL, _K_INSPECT, _K_REQUEST, _K_COPY_WATCH, _K_COPY, _K_EXTENDED, _K_BIND_DESCRIBE
cdef bytes _KINDS
cdef Py_ssize_t MAX_MESSAGE_LENGTH
cdef bint _COMPILED

cpdef bint _plain(bytes sql)
cpdef bint _plain_lowered(bytes sql)
@cython.locals(
    buf="const unsigned char*", w="const unsigned char*", n=Py_ssize_t, i=Py_ssize_t,
    k=Py_ssize_t, m=Py_ssize_t, c=int, semi=Py_ssize_t, select=bint,
)
cpdef bint _plain_scan(bytes sql)


cdef class Frontend:
    cdef public bint inspect
    cdef public Py_ssize_t _skip
    cdef public int _skip_type
    cdef public bint _after_exec
    cdef public Py_ssize_t _exec_syncs
    cdef public bytes _held
    cdef public bint _batch_open
    cdef public bint dirty_tail
    cdef public bint mid_message
    cdef public dict statements
    cdef public dict _parsed
    cdef public int flags
    cdef public list set_names
    cdef public dict _effects

    @cython.locals(
        n=Py_ssize_t,
        pos=Py_ssize_t,
        requests=Py_ssize_t,
        terminate=bint,
        last=int,
        copied=Py_ssize_t,
        inspect=bint,
        after_exec=bint,
        exec_syncs=Py_ssize_t,
        buf="const unsigned char*",
        kinds="const unsigned char*",
        headed=Py_ssize_t,
        typ=int,
        kind=int,
        length=int,
        end=Py_ssize_t,
        limit=Py_ssize_t,
        mid=bint,
        out=list,
    )
    cpdef tuple feed(
        self, bytes data, ServerStatements ctx=*, Registry registry=*, bint copy_in=*
    )

    cpdef _request(self, ServerStatements ctx)
