"""The served models: registry, loader thread, memory budget, model files, catalog hook."""
