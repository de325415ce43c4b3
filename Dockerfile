# One image holding the facessl jobs. The job spec chooses the command, e.g.
#   docker run --rm facessl pretrain-simclr --data s3://bucket/prepared --output s3://bucket/simclr
# PyPI's torch wheels bring the CUDA runtime: GPU nodes need only the driver and the NVIDIA container toolkit.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE} AS cuda
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# tini as PID 1 forwards SIGTERM to the job, which checkpoints and exits with code 4. The base image brings
# ca-certificates (python:3.11-slim has them) for HTTPS to S3.
RUN apt-get update \
 && apt-get install -y --no-install-recommends "tini=0.19.0-1*" \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin facessl \
 && mkdir -p /cache && chown facessl /cache
# The 6 GB of dependencies in two layers of their own, read from pyproject.toml alone: a change to the code
# rebuilds only the small layers at the end. The stages are only points to build up to (`--target cuda`,
# then `--target dependencies`, as infra/ci/build-image.sh does): each stage starts FROM the one before, so
# no COPY ever holds a second copy of the venv. The CUDA libraries (3.4 GB) go in the first layer and torch
# with the rest (2.7 GB) in the second: committing a layer holds it on disk three times at once (the
# container's copy, the blob, the new layer), so two halves need far less disk than one 6 GB layer. pip's
# dry-run report resolves the exact CUDA packages that torch pins.
COPY pyproject.toml /src/
RUN python3 -m venv /opt/venv \
 && python3 -c "import tomllib; print(*tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /src/requirements.txt \
 && /opt/venv/bin/pip install --dry-run --quiet --report /src/resolved.json -r /src/requirements.txt \
 && python3 -c 'import json; print(*("%s==%s" % (m["name"], m["version"]) for m in (p["metadata"] for p in json.load(open("/src/resolved.json"))["install"]) if m["name"].startswith(("nvidia-", "cuda-"))), sep="\n")' > /src/cuda.txt \
 && /opt/venv/bin/pip install --no-compile --no-deps -r /src/cuda.txt
FROM cuda AS dependencies
RUN /opt/venv/bin/pip install --no-compile -r /src/requirements.txt \
 && /opt/venv/bin/python -c "import cv2, torch, torchvision, boto3; print('torch', torch.__version__)"
FROM dependencies
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="facessl" \
      org.opencontainers.image.description="Face recognition with SimCLR pretraining: prepare-data, pretrain-simclr, train-classifier" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY README.md /src/
COPY common /src/common
COPY jobs /src/jobs
RUN /opt/venv/bin/pip install --no-compile --no-deps /src \
 && rm -rf /src
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FACESSL_CACHE=/cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    HOME=/home/facessl
WORKDIR /home/facessl
USER 10001
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["prepare-data", "--help"]
