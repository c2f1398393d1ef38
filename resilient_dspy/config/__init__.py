"""Declarative stacks: a pipeline from a TOML, YAML or JSON file, a dict, or another pipeline's ``describe()``.

``Pipeline.from_config(path | dict | list)`` is the entry point; this package reads the source
(:mod:`.source`), names the kinds (:mod:`.kinds`), builds the pipeline (:mod:`.build`) and writes a pipeline back
as a config (:mod:`.export`). See docs/concepts/configuration.md.
"""

from resilient_dspy.config.build import build_pipeline, build_program
from resilient_dspy.config.kinds import BUILTIN_KINDS, import_path, resolve, resolve_kind
from resilient_dspy.config.source import ENV_PREFIX, StackConfig, load_config

__all__ = [
    "BUILTIN_KINDS",
    "ENV_PREFIX",
    "StackConfig",
    "build_pipeline",
    "build_program",
    "import_path",
    "load_config",
    "resolve",
    "resolve_kind",
]
