"""Requests to engine jobs and back: chat, completions, embeddings, prompts, templates,
constraints, images."""
