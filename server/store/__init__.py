"""The local model store and ``pull``."""
