# The CUDA inference server: onnxruntime-gpu (CUDA 12 + cuDNN 9 runtime), no torch.
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md ./
# The whole source installs as one package. Without the training extras, train/ and export/
# are inert (nothing in serve/ imports them).
COPY rnnserve ./rnnserve
COPY serve ./serve
COPY train ./train
COPY export ./export
RUN pip install --no-cache-dir '.[gpu]'
ENV RNNSERVE_REPOSITORY=/models RNNSERVE_HOST=0.0.0.0 RNNSERVE_PORT=8001 RNNSERVE_METRICS_PORT=8002 \
    RNNSERVE_DEVICE=cuda
EXPOSE 8001 8002
ENTRYPOINT ["rnnserve-server"]
