"""rnnserve: train recurrent sequence models, export them to ONNX, serve them over gRPC.

The parts install under this one name: ``rnnserve.train`` (torch), ``rnnserve.export``
(torch + onnx) and ``rnnserve.serve`` (onnxruntime + grpcio + protobuf, never torch).
This package itself holds only what the parts share (see docs/design.md):
``contract`` and ``modelspec`` (the model format; their errors are ValueError /
SpecError), ``serving`` (per-model serving defaults), ``timeseries`` (CSV frames for
the forecaster and its client), ``files`` (atomic writes, hashes) and ``cli`` (how
every command reports a user's mistake).
"""

__version__ = "0.2.0"
