# The CPU inference server: onnxruntime + grpcio + protobuf, no torch.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY serve ./serve
COPY export/__init__.py export/metadata.py ./export/
COPY train/__init__.py ./train/
RUN pip install --no-cache-dir '.[cpu]' && useradd --system rnnserve
USER rnnserve
ENV RNNSERVE_REPOSITORY=/models RNNSERVE_HOST=0.0.0.0 RNNSERVE_PORT=8001 RNNSERVE_METRICS_PORT=8002
EXPOSE 8001 8002
ENTRYPOINT ["python", "-m", "serve"]
