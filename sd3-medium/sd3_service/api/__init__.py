"""The API surfaces: each one an adapter (its routes, wire models and error format) over the one engine."""
