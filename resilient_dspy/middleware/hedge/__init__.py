"""Hedge (docs/patterns/hedge.md): options, events, the race of one call, the layer."""

from resilient_dspy.middleware.hedge.events import HedgeSnapshot, HedgeStarted, HedgeWon
from resilient_dspy.middleware.hedge.layer import Hedge
from resilient_dspy.middleware.hedge.options import HedgeOptions, Percentile, PercentileOptions

__all__ = ["Hedge", "HedgeOptions", "HedgeSnapshot", "HedgeStarted", "HedgeWon", "Percentile", "PercentileOptions"]
