# Training and export jobs: torch (CPU build, pinned) + onnx + onnxruntime for the parity gate.
# Pass the PyTorch CPU wheel index with --build-arg TORCH_INDEX=... to avoid the CUDA build.
FROM python:3.11-slim
ARG TORCH_INDEX=""
WORKDIR /app
COPY . .
RUN if [ -n "$TORCH_INDEX" ]; then pip install --no-cache-dir --extra-index-url "$TORCH_INDEX" torch==2.13.0; fi \
    && pip install --no-cache-dir '.[cpu,train]'
