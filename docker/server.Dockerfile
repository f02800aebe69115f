# The CPU inference server: onnxruntime + grpcio + protobuf, no torch.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
# The whole source installs as one package. Without the training extras, train/ and export/
# are inert (nothing in serve/ imports them).
COPY rnnserve ./rnnserve
COPY serve ./serve
COPY train ./train
COPY export ./export
RUN pip install --no-cache-dir '.[cpu]' && useradd --system rnnserve
USER rnnserve
ENV RNNSERVE_REPOSITORY=/models RNNSERVE_HOST=0.0.0.0 RNNSERVE_PORT=8001 RNNSERVE_METRICS_PORT=8002
EXPOSE 8001 8002
ENTRYPOINT ["rnnserve-server"]
