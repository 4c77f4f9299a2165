# syntax=docker/dockerfile:1
# The datacredit operator: the CLI with only the `operator` extra (kopf, kubernetes, prometheus-client) on a
# slim Python, no torch. Build from the repository root:
#   docker build -f images/operator.Dockerfile -t registry.example.com/datacredit-operator:0.1.0 .
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements/constraints.txt requirements/constraints.txt
COPY datacredit datacredit
COPY jobs jobs
COPY operator operator
RUN pip install --no-cache-dir -c requirements/constraints.txt ".[operator]"

RUN groupadd --gid 10001 datacredit \
    && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin datacredit
WORKDIR /tmp
# Numeric, so that the kubelet can enforce runAsNonRoot.
USER 10001:10001
EXPOSE 8080 8081
ENTRYPOINT ["datacredit"]
CMD ["operator"]
