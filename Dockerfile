# The stream-reco worker (and the `stream` CLI: producer, recs, ...).
#   docker build -t stream-reco .
#   docker run --rm stream-reco --help
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Dependencies first (cached layer), then the code.
COPY pyproject.toml README.md ./
COPY stream ./stream
COPY configs ./configs
RUN pip install '.[rocksdb]' \
    && useradd --create-home --uid 10001 stream \
    && mkdir -p /data && chown stream /data
# Compile the numba kernels at build time (~35 s) into a cache directory of their own, owned
# by the worker's user: numba uses a cache directory only if it can write to it (otherwise it
# falls back to an empty one in the user's home and every container compiles again). The
# image's sources never change, so the fixed directory cannot go stale (stream/_kernel_cache.py).
ENV NUMBA_CACHE_DIR=/var/cache/stream-numba
RUN python -c "from stream.core.recommender import warm_up; print('kernels ready in %.1f s' % warm_up())" \
    && chown -R stream /var/cache/stream-numba

USER stream
# Faust table data (only used with STREAM_TABLE_STORE=rocksdb://) and the metrics port.
ENV STREAM_DATA_DIR=/data \
    STREAM_METRICS_HOST=0.0.0.0 \
    STREAM_METRICS_PORT=8000
VOLUME ["/data"]
EXPOSE 8000

ENTRYPOINT ["stream"]
CMD ["worker"]
