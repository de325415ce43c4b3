# One image holding the three facessl jobs. The job spec chooses the command, e.g.
#   docker run --rm facessl pretrain-simclr --data s3://bucket/prepared --output s3://bucket/simclr
# PyPI's torch wheels bring the CUDA runtime: GPU nodes need only the driver and the NVIDIA container toolkit.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY common ./common
COPY jobs ./jobs
RUN /opt/venv/bin/pip install --no-compile . \
 && /opt/venv/bin/python -c "import cv2, torch, torchvision, boto3; print('torch', torch.__version__)"

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="facessl" \
      org.opencontainers.image.description="Face recognition with SimCLR pretraining: prepare-data, pretrain-simclr, train-classifier" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# tini as PID 1 forwards SIGTERM to the job, which checkpoints and exits with code 4. The base image brings
# ca-certificates (python:3.11-slim has them) for HTTPS to S3.
RUN apt-get update \
 && apt-get install -y --no-install-recommends "tini=0.19.0-1*" \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin facessl \
 && mkdir -p /cache && chown facessl /cache
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FACESSL_CACHE=/cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    HOME=/home/facessl
WORKDIR /home/facessl
USER 10001
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["prepare-data", "--help"]
