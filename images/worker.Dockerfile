# syntax=docker/dockerfile:1
# The datacredit worker (prepare and coalition Jobs): the CLI with the `jobs` extra on the CUDA PyTorch image.
# The base image's torch and torchvision are kept: the constraints drop their pins and the triton and CUDA wheel
# pins, so pip installs only what the base image does not bring. Build from the repository root:
#   docker build -f images/worker.Dockerfile -t registry.example.com/datacredit-worker:0.1.0 .
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/huggingface \
    TORCH_HOME=/tmp/torch \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements/constraints.txt requirements/constraints.txt
COPY datacredit datacredit
COPY jobs jobs
COPY operator operator
RUN grep -vE '^(torch==|torchvision==|triton==|nvidia-|cuda-)' requirements/constraints.txt > requirements/worker-constraints.txt \
    && pip install --no-cache-dir -c requirements/worker-constraints.txt ".[jobs]"

RUN groupadd --gid 10001 datacredit \
    && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin datacredit
WORKDIR /tmp
# Numeric, so that the kubelet can enforce runAsNonRoot; caches go to /tmp (an emptyDir in the Jobs).
USER 10001:10001
ENTRYPOINT ["datacredit"]
CMD ["--help"]
