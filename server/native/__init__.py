"""How llama.cpp is built for this machine and whether the build runs here.

``plan``, ``amx``, ``wheels`` and ``build`` use the standard library only: the Makefile
runs them before anything else is installed. ``smoke`` and ``sysinfo`` load llama.cpp.
"""
