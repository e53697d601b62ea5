# Cython declarations for counters.py (the compiled build, see setup.py): the hot path adds
# to these as C struct members.

cdef class PoolStats:
    cdef public long long bytes_in
    cdef public long long bytes_out
    cdef public long long errors
    cdef public long long logins
    cdef public double max_wait
    cdef public long long queries
    cdef public double query_time
    cdef public double wait_time
    cdef public long long waits
    cdef public double xact_time
    cdef public long long xacts
