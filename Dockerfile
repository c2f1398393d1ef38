# resilient-dspy serve in a slim, non-root image. UNTESTED: Docker is not available where this project is built;
# checked by reading only (docs/guides/serving.md). Build: docker build -t resilient-dspy .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY resilient_dspy ./resilient_dspy
RUN pip install ".[serve]" && useradd --create-home --uid 10001 app
COPY examples/stack.toml /app/stack.toml
USER app

ENV RESILIENT_DSPY_SERVE_HOST=0.0.0.0 RESILIENT_DSPY_SERVE_PORT=8000 RESILIENT_DSPY_SERVE_CONFIG=/app/stack.toml
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"
STOPSIGNAL SIGTERM
CMD ["sh", "-c", "exec resilient-dspy serve --config \"$RESILIENT_DSPY_SERVE_CONFIG\""]
