# Cython declarations for server.py (the compiled build, see setup.py): the types its
# annotated locals name, so that the compiled hot path reads their fields as C members.
# ServerConn itself stays a Python class (uvloop's buffer protocol check needs one).

from ..protocol.backend cimport Backend
from ..protocol.statements cimport ServerStatements
from .counters cimport PoolStats
