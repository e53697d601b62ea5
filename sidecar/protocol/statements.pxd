# Cython declarations for statements.py (the compiled build, see setup.py): extension types,
# so that the walkers read and write these fields as C struct members.

cdef class Statement:
    cdef public Py_ssize_t seq
    cdef public bytes name
    cdef public bytes rest
    cdef public bint confirmed
    cdef public bytes parse_msg
    cdef public int flags


cdef class Registry:
    cdef public dict _by_key
    cdef public Py_ssize_t _next


cdef class Special:
    cdef public int kind
    cdef public Py_ssize_t ordinal
    cdef public object fix
    cdef public Statement stmt
    cdef public dict owner
    cdef public bytes owner_name
    cdef public bytes tag
    cdef public bint confirmed


cdef class ServerStatements:
    cdef public Py_ssize_t cap
    cdef public object lru
    cdef public Py_ssize_t sent_syncs
    cdef public Py_ssize_t recv_z
    cdef public Py_ssize_t batch_parses
    cdef public Py_ssize_t batch_closes
    cdef public list open_specials
    cdef public dict fixups
    cdef public dict by_text
