"""The engine without HTTP: :func:`load` a model, then ``model.chat(...)`` /
``complete`` / ``embed`` (sync, or ``achat`` ... for asyncio), with the HTTP API's request
fields and reply models. See docs/python.md."""
