"""rnnserve: train recurrent sequence models, export them to ONNX, serve them over gRPC.

The parts install under this one name: ``rnnserve.train`` (torch), ``rnnserve.export``
(torch + onnx) and ``rnnserve.serve`` (onnxruntime + grpcio + protobuf, never torch).
This package itself holds only what both sides share (see docs/design.md):
``contract`` (the model format), ``files`` (atomic writes, hashes), ``errors``.
"""

__version__ = "0.2.0"
