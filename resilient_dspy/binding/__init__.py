"""The DSPy binding: what a pipeline wraps (targets), DSPy's settings and usage, a program's shape and an LM's
identity, and token estimates. Nothing here imports the core or a layer; see docs/architecture.md."""
