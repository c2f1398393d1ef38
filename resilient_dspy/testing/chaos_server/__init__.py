"""The chaos server: a local OpenAI-compatible chat-completions endpoint that answers DSPy prompts or fails on purpose.

Point a real ``dspy.LM("openai/<id>", api_base=server.api_base, ...)`` at it to test a pipeline over real HTTP.
Answers follow DSPy's Chat format (``[[ ## field ## ]]`` sections) or JSON (when ``response_format`` or the prompt
asks for it) and report ``usage``. Faults use the same vocabulary as :class:`FaultInjectingLM`: 429 with
``Retry-After``, 5xx, 504, dropped connections, hangs (until the client gives up, at most ``max_hang``), replies
that are not JSON, answers without markers, 400 ``context_length_exceeded`` and 401; quotas on requests and tokens
per window answer 429 with the time until they free up. Faults come from an exact script first, then a seeded
profile; ``/control/*`` endpoints (and the same methods in-process) change them while it runs.

The settings and quotas are in ``settings``, what one request gets in ``completions``, the server's lifecycle and
controls in ``server``.
"""

from resilient_dspy.testing.chaos_server.server import ChaosServer
from resilient_dspy.testing.chaos_server.settings import Quota, is_loopback

__all__ = ["ChaosServer", "Quota", "is_loopback"]
