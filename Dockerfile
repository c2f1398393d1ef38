# resilient-dspy serve in a slim, non-root image. Never built here (no Docker daemon where this project is built):
# linted by hadolint in the test suite (tests/serve/test_dockerfile.py). Build: docker build -t resilient-dspy .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY resilient_dspy ./resilient_dspy
# hadolint ignore=DL3013
RUN pip install ".[serve]" && useradd --create-home --uid 10001 app
COPY examples/stack.toml /app/stack.toml
USER 10001

ENV RESILIENT_DSPY_SERVE_HOST=0.0.0.0 RESILIENT_DSPY_SERVE_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
CMD ["resilient-dspy", "serve", "--config", "/app/stack.toml"]
