# The image every nds service of docker-compose.yml runs: API, migrations, CPU and GPU workers.
# torch 2.14.1 from PyPI is a CUDA build on x86_64 and onnxruntime-gpu runs on a CPU too, so
# one image serves the CPU and the GPU services (the GPU worker also needs the NVIDIA
# container toolkit on the host).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NDS_HOME=/var/lib/nds \
    NDS_ARTIFACTS_DIR=/var/lib/nds/artifacts \
    NDS_DATA_ROOTS=/data

# libgomp: faiss and torch's OpenMP; DejaVu: the glyph sample domain; curl: health checks
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 fonts-dejavu-core curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY client ./client
COPY catalog ./catalog
COPY api ./api
COPY workers ./workers
COPY plugins ./plugins
COPY migrations ./migrations
COPY samples ./samples
# the client distribution first: the server depends on it (nds-client==0.1.0); constraints.txt: the tested pins
RUN pip install -c constraints.txt ./client .

RUN useradd --system --uid 10001 --home-dir /var/lib/nds nds \
    && mkdir -p /var/lib/nds/artifacts /data \
    && chown -R nds /var/lib/nds
USER nds
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=5 CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1
CMD ["nds", "serve", "--host", "0.0.0.0", "--port", "8000"]
