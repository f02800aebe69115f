"""Plain data types passed between the gRPC front end and the data plane.

No gRPC and no protobuf here: serve/wire/convert.py turns protobuf into these and
back; serve/dataplane/plane.py consumes and produces them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ParamValue = bool | int | float | str


@dataclass
class TensorSpec:
    name: str
    datatype: str            # Open Inference Protocol datatype string, e.g. "INT64", "FP32"
    shape: list[int]         # -1 = variable
    optional: bool = False   # ModelConfig only: the input may be omitted (state inputs: zeros / server-kept)


@dataclass
class InferRequest:
    model_name: str
    model_version: str = ""                       # "" = the newest loaded version
    id: str = ""
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    input_datatypes: dict[str, str] = field(default_factory=dict)   # as the client declared them
    requested_outputs: list[str] | None = None  # None = every output
    parameters: dict[str, ParamValue] = field(default_factory=dict)  # sequence_id, sequence_start, ...
    deadline: float | None = None              # time.monotonic() by which it must start running
    is_cancelled: Callable[[], bool] | None = None


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[tuple[str, np.ndarray]]
    parameters: dict[str, ParamValue] = field(default_factory=dict)


@dataclass
class ServerMetadata:
    name: str
    version: str
    extensions: list[str]


@dataclass
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    # free-form facts for humans and tools: providers, vocab size, arch, ...
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass
class StateSpec:
    input_name: str          # e.g. "h0"
    output_name: str         # e.g. "hn"
    datatype: str
    dims: list[int]


@dataclass
class ModelConfigInfo:
    """The subset of Triton's inference.ModelConfig that clients read."""
    name: str
    platform: str
    max_batch_size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dynamic_batching: dict[str, Any] | None = None   # preferred_batch_size, max_queue_delay_microseconds
    sequence_batching: dict[str, Any] | None = None  # max_sequence_idle_microseconds, states: List[StateSpec]
    instance_count: int = 1                          # instance_group count in force
    parameters: dict[str, str] = field(default_factory=dict)   # config.pbtxt `parameters` in force


@dataclass
class CharProb:
    char: str
    prob: float


@dataclass
class PositionPrediction:
    index: int
    input_char: str
    char: str                # argmax
    prob: float              # its probability
    top: list[CharProb]      # top-k, most likely first


@dataclass
class PredictResult:
    model_name: str
    model_version: str
    decoded: str             # the argmax characters joined (the notes' idx2char decode)
    positions: list[PositionPrediction]


@dataclass
class GenerateEvent:
    index: int               # 0-based index of the generated token
    token_id: int
    text: str                # the generated character
    finish_reason: str = ""  # "" while streaming; "length" or "stop" on the last event


@dataclass
class ScoreResult:
    model_name: str
    model_version: str
    num_predicted: int           # characters scored (len(text) - 1: each char predicted from its prefix)
    log_likelihood: float        # total, nats
    nats_per_char: float
    bits_per_char: float


@dataclass
class DurationStat:
    count: int = 0
    ns: int = 0


@dataclass
class ModelStats:
    name: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0     # requests (batch rows) served
    execution_count: int = 0     # onnxruntime runs
    success: DurationStat = field(default_factory=DurationStat)
    fail: DurationStat = field(default_factory=DurationStat)
    queue: DurationStat = field(default_factory=DurationStat)
    compute_input: DurationStat = field(default_factory=DurationStat)
    compute_infer: DurationStat = field(default_factory=DurationStat)
    compute_output: DurationStat = field(default_factory=DurationStat)
    batch_stats: dict[int, DurationStat] = field(default_factory=dict)   # batch size -> compute


@dataclass
class RepositoryEntry:
    name: str
    version: str
    state: str               # "READY", "LOADING", "UNAVAILABLE", "UNLOADED"
    reason: str = ""
