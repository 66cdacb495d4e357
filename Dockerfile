# A small non-root image: dependencies in a builder stage, only the venv and the source in the final one.
FROM python:3.12-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml ./
COPY app ./app
# Install the dependencies only; the source is copied as-is below, next to its migrations.
RUN /opt/venv/bin/pip install . && /opt/venv/bin/pip uninstall -y vidgate

FROM python:3.12-slim
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --home-dir /srv vidgate
WORKDIR /srv
COPY --from=build /opt/venv /opt/venv
COPY --chown=vidgate:vidgate app ./app
ENV PYTHONPATH=/srv VIDGATE_DATABASE_URL=sqlite:////srv/data/vidgate.db
RUN mkdir -p /srv/data && chown vidgate:vidgate /srv/data
USER vidgate
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=2s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
ENTRYPOINT ["python", "-m", "app.cli"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
