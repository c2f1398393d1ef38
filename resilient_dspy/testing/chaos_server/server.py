"""The chaos server itself: its lifecycle (start, close, the URL to give a client) and the controls that change its
faults and quotas while it runs, in-process or over ``/control/*``."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import dspy
from aiohttp import web

from resilient_dspy.errors import ConfigurationError
from resilient_dspy.faults import FaultStep, ScriptEntry, parse_steps
from resilient_dspy.testing.chaos_server.completions import _Completions, _error
from resilient_dspy.testing.chaos_server.settings import Quota, _QuotaWindow, as_profile, as_quota, check_settings
from resilient_dspy.testing.fault_lm.answers import Answers
from resilient_dspy.testing.fault_lm.schedule import FaultProfile, FaultSchedule, JournalEntry

__all__ = ["ChaosServer"]


class ChaosServer(_Completions):
    """An OpenAI-compatible chaos endpoint on ``aiohttp.web``: ``async with ChaosServer() as server: server.url``."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        profile: FaultProfile | Mapping[str, Any] | None = None,
        script: Iterable[ScriptEntry] = (),
        seed: int | None = 0,
        quota: Quota | Mapping[str, Any] | None = None,
        answers: Answers | None = None,
        max_hang: float = 30.0,
        allow_remote: bool = False,
    ) -> None:
        steps, checked_profile, checked_quota = check_settings(
            host=host,
            port=port,
            max_hang=max_hang,
            script=script,
            profile=profile,
            quota=quota,
            allow_remote=allow_remote,
        )
        self.host = host
        self.port = port
        self.seed = seed
        self.answers = answers
        self.max_hang = float(max_hang)
        self.schedule = FaultSchedule(checked_profile, steps, seed)
        self.journal: list[JournalEntry] = []
        self._window = _QuotaWindow(checked_quota) if checked_quota is not None else None
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None
        self._bound_port: int | None = None
        self.in_flight = 0

    # --- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> ChaosServer:
        """Bind and serve; with ``port=0`` the OS picks a free port (see :attr:`url`)."""
        if self._runner is not None:
            raise RuntimeError("the chaos server is already running")
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_post("/chat/completions", self._complete)
        app.router.add_get("/health", self._health)
        app.router.add_get("/control/faults", self._control_state)
        app.router.add_post("/control/faults", self._control_faults)
        app.router.add_post("/control/reset", self._control_reset)
        app.router.add_get("/control/journal", self._control_journal)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        self._closing = asyncio.Event()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._bound_port = int(runner.addresses[0][1])
        return self

    async def close(self) -> None:
        """Stop serving: pending delays and hangs end by dropping their connection, then every handler is done."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if self._closing is not None:
            self._closing.set()
        await runner.cleanup()

    async def __aenter__(self) -> ChaosServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server."""
        if self._bound_port is None:
            raise RuntimeError("the chaos server is not running; use 'async with ChaosServer() as server'")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._bound_port}"

    @property
    def api_base(self) -> str:
        """The OpenAI base URL to give a client: ``url + "/v1"``."""
        return f"{self.url}/v1"

    def lm(self, model: str = "chaos", **kwargs: Any) -> dspy.LM:
        """A real ``dspy.LM`` for this server (OpenAI chat completions, DSPy's cache and retries off)."""
        settings: dict[str, Any] = {"api_key": "chaos", "cache": False, "num_retries": 0, **kwargs}
        return dspy.LM(f"openai/{model}", api_base=self.api_base, **settings)

    # --- control ---------------------------------------------------------------------------------------

    @property
    def requests(self) -> int:
        """How many chat-completion requests reached the server (answered or not)."""
        return len(self.journal)

    @property
    def pending(self) -> tuple[FaultStep, ...]:
        return tuple(self.schedule.script)

    def script(self, *steps: ScriptEntry) -> None:
        """Replace the scripted steps: the next requests get exactly these, then the profile decides."""
        self.schedule.replace(parse_steps(steps, "ChaosServer.script"))

    def push(self, *steps: ScriptEntry) -> None:
        """Append scripted steps after the ones pending."""
        self.schedule.push(parse_steps(steps, "ChaosServer.push"))

    def set_profile(self, profile: FaultProfile | Mapping[str, Any] | None) -> None:
        """Replace the random profile (None = no faults, no latency)."""
        self.schedule.profile = as_profile(profile)

    def set_quota(self, quota: Quota | Mapping[str, Any] | None) -> None:
        """Replace the quotas (None = unlimited); the window starts empty."""
        checked = as_quota(quota)
        self._window = _QuotaWindow(checked) if checked is not None else None

    def reset(self) -> None:
        """Back to a fault-free server with no quota and an empty journal (the random source is re-seeded)."""
        self.schedule = FaultSchedule(FaultProfile(), (), self.seed)
        self._window = None
        self.journal.clear()

    # --- HTTP: health and /control/* (POST /chat/completions is in completions.py) ---------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "pending": len(self.schedule.script), "requests": self.requests})

    async def _control_faults(self, request: web.Request) -> web.Response:
        """Validate every setting in the body first, then apply them all (or none, with a 400 listing problems)."""
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object", "invalid_request_error")
        problems: list[tuple[str, str]] = []
        unknown = sorted(set(body) - {"script", "push", "profile", "quota"})
        if unknown:
            problems.append(("body", f"unknown key(s) {unknown}; known: script, push, profile, quota"))
        steps: dict[str, list[FaultStep]] = {}
        for key in ("script", "push"):
            if key not in body:
                continue
            if not isinstance(body[key], list):
                problems.append((key, f"must be a list of steps (got {body[key]!r})"))
                continue
            try:
                steps[key] = parse_steps(body[key], key)
            except ConfigurationError as error:
                problems.extend(error.problems)
        profile: FaultProfile | None = None
        quota: Quota | None = None
        for key in ("profile", "quota"):
            value = body.get(key)
            if key in body and value is not None and not isinstance(value, dict):
                problems.append((key, f"must be a JSON object or null (got {value!r})"))
                continue
            try:
                if key == "profile" and key in body:
                    profile = as_profile(value)
                elif key == "quota" and key in body:
                    quota = as_quota(value)
            except ConfigurationError as error:
                problems.extend(error.problems)
        if problems:
            error_body = {"message": "invalid fault settings", "type": "invalid_request_error", "problems": problems}
            return web.json_response({"error": error_body}, status=400)
        if "script" in steps:
            self.schedule.replace(steps["script"])
        if "push" in steps:
            self.schedule.push(steps["push"])
        if profile is not None:
            self.schedule.profile = profile
        if "quota" in body:
            self.set_quota(quota)
        return web.json_response(self._state())

    async def _control_state(self, request: web.Request) -> web.Response:
        return web.json_response(self._state())

    async def _control_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response(self._state())

    async def _control_journal(self, request: web.Request) -> web.Response:
        return web.json_response({"entries": [dataclasses.asdict(entry) for entry in self.journal]})

    def _state(self) -> dict[str, Any]:
        """The fault settings in the shape ``POST /control/faults`` takes, so they can be saved and posted back."""
        window = self._window
        return {
            "script": [dataclasses.asdict(step) for step in self.schedule.script],
            "profile": self.schedule.profile.model_dump(mode="json"),
            "quota": window.quota.model_dump(mode="json") if window is not None else None,
        }
