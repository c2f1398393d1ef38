"""The core: the one contract layers are written against (:mod:`.call`), the pipeline that composes them, and the
clock, options, health and trace every layer shares. See docs/architecture.md."""
