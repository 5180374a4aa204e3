# One image for the API, the worker and migrations; docker-compose.yml picks the command.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 nurture
WORKDIR /app

COPY pyproject.toml README.md ./
COPY workflows ./workflows
COPY activities ./activities
COPY api ./api
COPY models ./models
COPY devstack ./devstack
COPY migrations ./migrations
COPY examples ./examples
COPY worker.py settings.py alembic.ini ./
# Bytecode beside the sources: the workflow sandbox imports the workflow modules afresh for
# every run, and /app is not writable by the worker at run time.
RUN pip install . && python -m compileall -q /app && mkdir -p /data/outbox && chown -R nurture /data

USER nurture
EXPOSE 8000
CMD ["uvicorn", "api.app:app", "--host", "0.0.0.0", "--port", "8000"]
