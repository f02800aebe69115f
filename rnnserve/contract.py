"""The model-format contract that export writes and serve reads (pure Python: json only).

serve imports this module and never imports torch or onnx, so everything the server
needs to know about a model's I/O is derived here from plain dicts: the metadata keys,
the graph I/O names, the state rule, the file and platform names. docs/design.md
describes the contract; all values stored in the ONNX file are strings.

Two formats share the keys:
- "1", our char models (tokens -> logits, states h0/c0 -> hn/cn): vocabulary, model and
  train config are required, and the I/O follows from the config (char_model_spec);
- "2", any recurrent model (forecasters, a user's own module): the I/O is a ModelSpec
  stored as JSON under `rnnserve.io`; vocabulary, class names, feature names and configs
  are optional.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rnnserve.modelspec import ModelSpec, SpecError, StatePair, TensorDecl

FORMAT_VERSION = "1"          # char models
FORMAT_GENERAL = "2"          # models described by a ModelSpec

KEY_FORMAT = "rnnserve.format"
KEY_VOCAB = "rnnserve.vocab"
KEY_MODEL_CONFIG = "rnnserve.model_config"
KEY_TRAIN_CONFIG = "rnnserve.train_config"
KEY_CHECKPOINT_SHA256 = "rnnserve.checkpoint_sha256"
KEY_TORCH_VERSION = "rnnserve.torch_version"
KEY_ONNX_VERSION = "rnnserve.onnx_version"
KEY_OPSET = "rnnserve.opset"
KEY_STATE_INPUTS = "rnnserve.state_inputs"
KEY_STATE_OUTPUTS = "rnnserve.state_outputs"
KEY_IO = "rnnserve.io"                        # format 2: ModelSpec.to_json()
KEY_CLASS_NAMES = "rnnserve.class_names"      # optional JSON list: names of a classifier's classes
KEY_FEATURE_NAMES = "rnnserve.feature_names"  # optional JSON list: the order of a feature input's last axis

GENERAL_REQUIRED_KEYS = (KEY_FORMAT, KEY_IO, KEY_TORCH_VERSION, KEY_ONNX_VERSION, KEY_OPSET)
REQUIRED_KEYS = (
    KEY_FORMAT, KEY_VOCAB, KEY_MODEL_CONFIG, KEY_TRAIN_CONFIG, KEY_CHECKPOINT_SHA256,
    KEY_TORCH_VERSION, KEY_ONNX_VERSION, KEY_OPSET, KEY_STATE_INPUTS, KEY_STATE_OUTPUTS,
)

# Graph I/O names (the model contract in docs/design.md).
INPUT_TOKENS = "tokens"
OUTPUT_LOGITS = "logits"
# Symbolic dim names used for the dynamic axes.
DIM_BATCH = "batch"
DIM_SEQ = "seq"

ARCHS = ("rnncell", "rnn", "lstm", "gru")

# File names of a model repository, REPO/<model>/<version>/model.onnx + REPO/<model>/config.pbtxt,
# and the platform string Triton uses for ONNX models.
MODEL_FILENAME = "model.onnx"
CONFIG_FILENAME = "config.pbtxt"
PLATFORM = "onnxruntime_onnx"
_CONFIG_REQUIRED = ("arch", "vocab_size", "hidden_size", "num_layers", "bidirectional")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def state_io_names(arch: str, bidirectional: bool) -> tuple[list[str], list[str]]:
    """The state rule: (state inputs, state outputs) for a model config.

    h0/hn, plus c0/cn for LSTM; none for a bidirectional model (its backward pass needs
    the whole sequence, so it cannot be fed in chunks). Every state tensor has the shape
    state_shape() gives.
    """
    if bidirectional:
        return [], []
    if arch == "lstm":
        return ["h0", "c0"], ["hn", "cn"]
    return ["h0"], ["hn"]


def build_metadata(*, vocab: list[str], model_config: Mapping[str, Any], train_config: Mapping[str, Any],
                   checkpoint_sha256: str, torch_version: str, onnx_version: str,
                   opset: int) -> dict[str, str]:
    """The metadata_props dict (all strings) for an exported model; validated by parse_metadata."""
    state_in, state_out = state_io_names(model_config["arch"], bool(model_config["bidirectional"]))
    props = {
        KEY_FORMAT: FORMAT_VERSION,
        KEY_VOCAB: json.dumps(list(vocab), ensure_ascii=False),
        KEY_MODEL_CONFIG: json.dumps(dict(model_config), sort_keys=True),
        KEY_TRAIN_CONFIG: json.dumps(dict(train_config), sort_keys=True, default=str),
        KEY_CHECKPOINT_SHA256: checkpoint_sha256,
        KEY_TORCH_VERSION: str(torch_version),
        KEY_ONNX_VERSION: str(onnx_version),
        KEY_OPSET: str(int(opset)),
        KEY_STATE_INPUTS: json.dumps(state_in),
        KEY_STATE_OUTPUTS: json.dumps(state_out),
    }
    parse_metadata(props)  # never write metadata the server would reject
    return props


def multichar_tokens(vocab: list[str]) -> list[str]:
    """Vocabulary entries that are not exactly one character. The text API maps one character to one
    token, so a model with any (e.g. a word-level one) is refused for text; token ids still work."""
    return [t for t in vocab if len(t) != 1]


def text_api_refusal(name: str, tokens: list[str]) -> str:
    """Why a model whose vocabulary has multi-character tokens cannot take text."""
    shown = ", ".join(repr(t) for t in tokens[:3]) + (", ..." if len(tokens) > 3 else "")
    return (f"{name} has {len(tokens)} vocabulary tokens that are not one character ({shown}); "
            f"the text API reads one character per token: send token ids with ModelInfer")


def state_shape(num_layers: int, num_directions: int, batch: int, hidden_size: int) -> tuple[int, int, int]:
    """Every state tensor is [layers*dirs, batch, hidden], as PyTorch's nn.RNN/LSTM/GRU keep it."""
    return (num_layers * num_directions, batch, hidden_size)


@dataclass(frozen=True)
class GraphTensor:
    name: str
    dtype: str  # numpy dtype name: "int64" or "float32"
    shape: tuple[int | str | None, ...]  # str = a symbolic (dynamic) dim; None = dynamic without a name


@dataclass(frozen=True)
class ModelMeta:
    vocab: list[str]
    config: dict[str, Any]
    train_config: dict[str, Any]
    checkpoint_sha256: str
    versions: dict[str, str]  # {"torch", "onnx", "opset"}
    state_inputs: list[str] = field(default_factory=list)
    state_outputs: list[str] = field(default_factory=list)
    spec: ModelSpec | None = None               # always set by parse_metadata
    format: str = FORMAT_VERSION
    class_names: list[str] = field(default_factory=list)
    feature_names: list[str] = field(default_factory=list)

    @property
    def is_char_model(self) -> bool:
        """Format 1: config, vocabulary and the tokens/logits/h0/c0 names are all there."""
        return self.format == FORMAT_VERSION

    @property
    def arch(self) -> str:
        return self.config["arch"]

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def num_layers(self) -> int:
        return int(self.config["num_layers"])

    @property
    def num_directions(self) -> int:
        return 2 if self.config["bidirectional"] else 1

    @property
    def streamable(self) -> bool:
        return bool(self.state_inputs)

    @property
    def opset(self) -> int:
        return int(self.versions["opset"])

    def state_shape(self, batch: int) -> tuple[int, int, int]:
        """Shape of every state tensor (h0, c0, hn, cn)."""
        return state_shape(self.num_layers, self.num_directions, batch, self.hidden_size)

    def io_spec(self) -> tuple[list[GraphTensor], list[GraphTensor]]:
        """(inputs, outputs) in graph order; symbolic dims are the strings DIM_BATCH / DIM_SEQ."""
        state = (self.num_layers * self.num_directions, DIM_BATCH, self.hidden_size)
        inputs = [GraphTensor(INPUT_TOKENS, "int64", (DIM_BATCH, DIM_SEQ))]
        inputs += [GraphTensor(n, "float32", state) for n in self.state_inputs]
        outputs = [GraphTensor(OUTPUT_LOGITS, "float32", (DIM_BATCH, DIM_SEQ, self.vocab_size))]
        outputs += [GraphTensor(n, "float32", state) for n in self.state_outputs]
        return inputs, outputs


def char_model_spec(config: Mapping[str, Any], state_in: list[str], state_out: list[str]) -> ModelSpec:
    """Our char models as a ModelSpec: tokens [batch, seq] -> logits [batch, seq, vocab], states batch axis 1."""
    state = (int(config["num_layers"]) * (2 if config["bidirectional"] else 1), DIM_BATCH,
             int(config["hidden_size"]))
    return ModelSpec(
        inputs=(TensorDecl(INPUT_TOKENS, "int64", (DIM_BATCH, DIM_SEQ), batch_axis=0, time_axis=1),),
        outputs=(TensorDecl(OUTPUT_LOGITS, "float32", (DIM_BATCH, DIM_SEQ, int(config["vocab_size"])),
                            batch_axis=0, time_axis=1),),
        states=tuple(StatePair(i, o, "float32", state, batch_axis=1) for i, o in zip(state_in, state_out)))


def build_general_metadata(*, spec: ModelSpec, torch_version: str, onnx_version: str, opset: int,
                           vocab: list[str] | None = None, class_names: list[str] | None = None,
                           feature_names: list[str] | None = None, model_config: Mapping[str, Any] | None = None,
                           train_config: Mapping[str, Any] | None = None,
                           checkpoint_sha256: str | None = None) -> dict[str, str]:
    """The metadata_props dict (format 2) for any recurrent model; validated by parse_metadata."""
    props = {
        KEY_FORMAT: FORMAT_GENERAL,
        KEY_IO: spec.to_json(),
        KEY_TORCH_VERSION: str(torch_version),
        KEY_ONNX_VERSION: str(onnx_version),
        KEY_OPSET: str(int(opset)),
    }
    optional = {KEY_VOCAB: vocab, KEY_CLASS_NAMES: class_names, KEY_FEATURE_NAMES: feature_names}
    for key, names in optional.items():
        if names is not None:
            props[key] = json.dumps(list(names), ensure_ascii=False)
    if model_config is not None:
        props[KEY_MODEL_CONFIG] = json.dumps(dict(model_config), sort_keys=True)
    if train_config is not None:
        props[KEY_TRAIN_CONFIG] = json.dumps(dict(train_config), sort_keys=True, default=str)
    if checkpoint_sha256 is not None:
        props[KEY_CHECKPOINT_SHA256] = checkpoint_sha256
    parse_metadata(props)  # never write metadata the server would reject
    return props


def _string_list(props: Mapping[str, str], key: str) -> list[str]:
    if key not in props:
        return []
    value = _json(props, key, list)
    if not all(isinstance(t, str) for t in value):
        raise ValueError(f"metadata {key!r} must be a list of strings")
    return value


def _parse_general(props: Mapping[str, str]) -> ModelMeta:
    missing = [k for k in GENERAL_REQUIRED_KEYS if k not in props]
    if missing:
        raise ValueError(f"not an rnnserve model: metadata_props lacks {missing}")
    try:
        spec = ModelSpec.from_json(props[KEY_IO])
    except SpecError as e:
        raise ValueError(f"metadata {KEY_IO!r}: {e}") from None
    opset = props[KEY_OPSET]
    if not isinstance(opset, str) or not opset.isdigit():
        raise ValueError(f"metadata {KEY_OPSET!r} must be an integer, got {opset!r}")
    sha = props.get(KEY_CHECKPOINT_SHA256, "")
    if sha and not _SHA256_RE.match(sha):
        raise ValueError(f"metadata {KEY_CHECKPOINT_SHA256!r} must be 64 lowercase hex digits")
    versions = {"torch": str(props[KEY_TORCH_VERSION]), "onnx": str(props[KEY_ONNX_VERSION]), "opset": opset}
    return ModelMeta(
        vocab=_string_list(props, KEY_VOCAB),
        config=_json(props, KEY_MODEL_CONFIG, dict) if KEY_MODEL_CONFIG in props else {},
        train_config=_json(props, KEY_TRAIN_CONFIG, dict) if KEY_TRAIN_CONFIG in props else {},
        checkpoint_sha256=sha, versions=versions, state_inputs=spec.state_inputs,
        state_outputs=spec.state_outputs, spec=spec, format=FORMAT_GENERAL,
        class_names=_string_list(props, KEY_CLASS_NAMES), feature_names=_string_list(props, KEY_FEATURE_NAMES))


def _json(props: Mapping[str, str], key: str, kind: type) -> Any:
    raw = props[key]
    if not isinstance(raw, str):
        raise ValueError(f"metadata {key!r} must be a string, got {type(raw).__name__}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"metadata {key!r} is not valid JSON: {e}") from None
    if not isinstance(value, kind):
        raise ValueError(f"metadata {key!r} must be a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def parse_metadata(props: Mapping[str, str]) -> ModelMeta:
    """Validate and decode metadata_props; raises ValueError with a clear message on missing/bad keys."""
    if props.get(KEY_FORMAT) == FORMAT_GENERAL:
        return _parse_general(props)
    missing = [k for k in REQUIRED_KEYS if k not in props]
    if missing:
        raise ValueError(f"not an rnnserve model: metadata_props lacks {missing}")
    if props[KEY_FORMAT] != FORMAT_VERSION:
        raise ValueError(f"unsupported {KEY_FORMAT} {props[KEY_FORMAT]!r} "
                         f"(expected {FORMAT_VERSION!r} or {FORMAT_GENERAL!r})")

    vocab = _json(props, KEY_VOCAB, list)
    if not vocab or not all(isinstance(t, str) for t in vocab):
        raise ValueError(f"metadata {KEY_VOCAB!r} must be a non-empty list of strings")
    config = _json(props, KEY_MODEL_CONFIG, dict)
    absent = [k for k in _CONFIG_REQUIRED if k not in config]
    if absent:
        raise ValueError(f"metadata {KEY_MODEL_CONFIG!r} lacks {absent}")
    if config["arch"] not in ARCHS:
        raise ValueError(f"metadata {KEY_MODEL_CONFIG!r}: unknown arch {config['arch']!r}")
    for k in ("vocab_size", "hidden_size", "num_layers"):
        if not isinstance(config[k], int) or isinstance(config[k], bool) or config[k] < 1:
            raise ValueError(f"metadata {KEY_MODEL_CONFIG!r}: {k} must be a positive integer")
    if not isinstance(config["bidirectional"], bool):
        raise ValueError(f"metadata {KEY_MODEL_CONFIG!r}: bidirectional must be a boolean")
    if len(vocab) != config["vocab_size"]:
        raise ValueError(f"metadata vocab has {len(vocab)} entries but vocab_size is {config['vocab_size']}")
    train_config = _json(props, KEY_TRAIN_CONFIG, dict)

    sha = props[KEY_CHECKPOINT_SHA256]
    if not isinstance(sha, str) or not _SHA256_RE.match(sha):
        raise ValueError(f"metadata {KEY_CHECKPOINT_SHA256!r} must be 64 lowercase hex digits")
    opset = props[KEY_OPSET]
    if not isinstance(opset, str) or not opset.isdigit():
        raise ValueError(f"metadata {KEY_OPSET!r} must be an integer, got {opset!r}")

    state_in = _json(props, KEY_STATE_INPUTS, list)
    state_out = _json(props, KEY_STATE_OUTPUTS, list)
    want_in, want_out = state_io_names(config["arch"], config["bidirectional"])
    if state_in != want_in or state_out != want_out:
        raise ValueError(f"metadata state names {state_in}/{state_out} do not match the model config "
                         f"(expected {want_in}/{want_out})")
    versions = {"torch": str(props[KEY_TORCH_VERSION]), "onnx": str(props[KEY_ONNX_VERSION]), "opset": opset}
    return ModelMeta(vocab=vocab, config=config, train_config=train_config, checkpoint_sha256=sha,
                     versions=versions, state_inputs=state_in, state_outputs=state_out,
                     spec=char_model_spec(config, state_in, state_out))
