"""Hypothesis budgets for the fault-injection suite: quick by default, deep with ``--hypothesis-profile=chaos``.

``pytest tests/chaos --hypothesis-profile=chaos`` loads the ``chaos`` profile registered here (nightly); otherwise
each test runs its own small ``max_examples`` (see :func:`examples`), so other tests' settings are never touched.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "chaos",
    max_examples=300,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
