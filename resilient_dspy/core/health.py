"""Health snapshots: what each stateful layer says about its own state, and the pipeline's overall readiness.

A layer reports by defining ``health() -> LayerHealth``. A status is ``ok``, ``degraded`` (still serving, but
under pressure: some circuits open, a queue forming, a budget nearly spent) or ``down`` (calls will be refused:
the circuit is open, the budget is spent). :meth:`Pipeline.health` gathers them; ``ready`` is the readiness
signal a service exposes — False when any layer is down.

Part of the core (docs/architecture.md: the layout, a call's path, the rules).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["LayerHealth", "PipelineHealth", "Status", "worst"]

Status = Literal["ok", "degraded", "down"]
_RANK: dict[str, int] = {"ok": 0, "degraded": 1, "down": 2}


def worst(statuses: Iterable[Status]) -> Status:
    """The most severe of ``statuses`` (``ok`` when there are none)."""
    result: Status = "ok"
    for status in statuses:
        if _RANK[status] > _RANK[result]:
            result = status
    return result


def key_name(key: Hashable) -> str:
    """A partition key as a JSON-friendly string (``"*"`` for the unpartitioned state)."""
    return "*" if key is None else str(key)


@dataclass(frozen=True, slots=True)
class LayerHealth:
    """One layer's status and the figures behind it (``details`` is JSON-friendly)."""

    layer: str
    status: Status
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "status": self.status, **self.details}


@dataclass(frozen=True, slots=True)
class PipelineHealth:
    """The pipeline's readiness: the worst layer status, and every layer's report."""

    pipeline: str
    status: Status
    layers: tuple[LayerHealth, ...]

    @property
    def ready(self) -> bool:
        return self.status != "down"

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "status": self.status,
            "ready": self.ready,
            "layers": [layer.to_dict() for layer in self.layers],
        }
