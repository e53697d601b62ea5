# Cython declarations for messages.py (the compiled build, see setup.py): what the stream
# walkers call from their loops, as C calls (they cimport it, see frontend.pxd, backend.pxd).

cpdef list splice(list out, bytes chunk, bytes repl)
