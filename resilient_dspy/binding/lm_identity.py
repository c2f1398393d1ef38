"""Which deployment answers an LM's requests: the identity cache keys and per-model partitions share."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

__all__ = ["DEPLOYMENT_KEYS", "lm_identity"]


_ENDPOINT_KEYS = ("api_base", "base_url")
DEPLOYMENT_KEYS = frozenset({*_ENDPOINT_KEYS, "deployment_id"})
"""The LM kwargs that say which deployment answers; :func:`lm_identity` reads them."""


def lm_identity(lm: Any) -> str | None:
    """Which deployment answers an LM's requests: its model, ``@`` its endpoint when it has one, ``#`` its
    deployment id when given. Cache keys and per-model partitions (:func:`~resilient_dspy.by_model`) both use it,
    so a backup deployment of the same model is another circuit and another cache entry.
    """
    if lm is None:
        return None
    identity = str(getattr(lm, "model", None) or type(lm).__name__)
    kwargs = getattr(lm, "kwargs", None)
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    endpoints = []
    for name in _ENDPOINT_KEYS:
        for endpoint in (getattr(lm, name, None), kwargs.get(name)):
            if isinstance(endpoint, str) and endpoint and endpoint not in endpoints:
                endpoints.append(endpoint)
    if endpoints:
        identity += "@" + ",".join(endpoints)
    deployment = kwargs.get("deployment_id")
    if isinstance(deployment, str) and deployment:
        identity += f"#{deployment}"
    return identity
