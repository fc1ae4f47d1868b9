# One image for every LockN Gen process; the command picks the process:
#   lockn-gen generation-service | comfy-worker | gateway | migrate
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
COPY gateway ./gateway
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home /app lockn \
    && mkdir -p /app/outputs && chown lockn /app/outputs
COPY --from=build /install /usr/local
WORKDIR /app
COPY workflows ./workflows
USER lockn
ENV LOCKN_LOG_FORMAT=json \
    LOCKN_COMFYUI__WORKFLOWS_PATH=/app/workflows \
    LOCKN_COMFYUI__OUTPUT_PATH=/app/outputs
ENTRYPOINT ["lockn-gen"]
CMD ["--help"]
