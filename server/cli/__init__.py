"""The ``ggufserve`` command line: serve, run/chat, store commands, doctor."""
