# Cython declarations for pool.py (the compiled build, see setup.py): the types its annotated
# locals name. Pool itself stays a Python class.

from .counters cimport PoolStats
