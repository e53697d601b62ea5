# Cython declarations for client.py (the compiled build, see setup.py): the types its
# annotated locals name, so that the compiled hot path reads their fields as C members and
# calls the walker's feed as a C method. ClientConn itself stays a Python class.

from ..protocol.backend cimport Backend
from ..protocol.frontend cimport Frontend
from .counters cimport PoolStats
