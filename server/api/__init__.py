"""The HTTP layer: the Starlette app, routes, OpenAI wire models, refusals, HTTP limits,
metrics and the web page."""
