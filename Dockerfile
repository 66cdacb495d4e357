# A small non-root image: the locked dependencies and the built wheel in a builder stage, only the venv
# in the final one. The migrations ship inside the wheel; nothing of the source tree is copied across.
FROM python:3.12-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/venv
# Exactly the versions in the lock, each checked against its hash (regenerate with `make lock`).
COPY requirements.lock ./
RUN /opt/venv/bin/pip install --require-hashes -r requirements.lock
COPY pyproject.toml ./
COPY app ./app
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /tmp/dist . \
    && /opt/venv/bin/pip install --no-deps /tmp/dist/vidgate-*.whl \
    && /opt/venv/bin/pip check

FROM python:3.12-slim
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --home-dir /srv vidgate
WORKDIR /srv
COPY --from=build /opt/venv /opt/venv
ENV VIDGATE_DATA_DIR=/srv/data
RUN mkdir -p /srv/data && chown vidgate:vidgate /srv/data
USER vidgate
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=2s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
ENTRYPOINT ["python", "-m", "app.cli"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
