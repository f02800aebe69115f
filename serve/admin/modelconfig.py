"""A model's config.pbtxt (Triton's schema): parsed once, with protobuf's text format,
into the ModelConfig message of serve/wire/gen/model_config_pb2.py.

What the server takes from it (README "Per-model settings"):
- settings that override the server-wide flags for this model: max_batch_size (> 0),
  dynamic_batching.max_queue_delay_microseconds (or, in a sequence model, that of
  sequence_batching's direct/oldest strategy),
  sequence_batching.max_sequence_idle_microseconds and the instance_group count;
- `parameters { key: "allow_nonfinite" value { string_value: "true" } }`;
- the model's I/O (input, output, sequence_batching.state), used by describe.py when
  the model file has no rnnserve metadata.

A field we do not act on is logged once, at load. A file that does not parse makes the
model fail to load with the parser's message.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from google.protobuf import text_format
from google.protobuf.message import Message

from rnnserve import serving
from rnnserve.contract import CONFIG_FILENAME
from rnnserve.serve.settings import ServeSettings
from rnnserve.serve.wire.gen import model_config_pb2 as mc

log = logging.getLogger(__name__)

# Field paths the server acts on (below these, every sub-field counts as read).
SUPPORTED = frozenset({
    "name", "platform", "backend", "max_batch_size", "input.name", "input.data_type", "input.dims",
    "input.optional", "output.name", "output.data_type", "output.dims",
    "dynamic_batching.max_queue_delay_microseconds",
    "sequence_batching.max_sequence_idle_microseconds", "sequence_batching.state.input_name",
    "sequence_batching.state.output_name", "sequence_batching.state.data_type", "sequence_batching.state.dims",
    "sequence_batching.state.initial_state.zero_data", "sequence_batching.state.initial_state.data_type",
    "sequence_batching.state.initial_state.dims", "sequence_batching.state.initial_state.name",
    # our batcher always batches across sequences: Triton's strategy choice changes nothing here
    "sequence_batching.direct", "sequence_batching.oldest",
    "instance_group.count", "instance_group.name", "instance_group.kind", "parameters",
})
_TRUE = ("true", "1", "yes", "on")


class ConfigError(ValueError):
    """config.pbtxt does not parse or holds a value the server cannot use."""


@dataclass(frozen=True)
class ModelConfigFile:
    path: str
    proto: mc.ModelConfig
    ignored: tuple[str, ...]        # fields present that the server does not act on

    @property
    def declares_io(self) -> bool:
        return bool(self.proto.input or self.proto.output or self.proto.sequence_batching.state)

    @property
    def allow_nonfinite(self) -> bool:
        p = self.proto.parameters.get(serving.PARAM_ALLOW_NONFINITE)
        return p is not None and p.string_value.strip().lower() in _TRUE


def config_path(model_dir: str) -> str:
    return os.path.join(model_dir, CONFIG_FILENAME)


def read_config(path: str) -> ModelConfigFile | None:
    """The parsed config.pbtxt at `path`; None if there is none. Raises ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{CONFIG_FILENAME} cannot be read: {e}") from None
    return parse_config(text, path)


def parse_config(text: str, path: str = CONFIG_FILENAME) -> ModelConfigFile:
    proto = mc.ModelConfig()
    # Triton's schema has fields our subset lacks (optimization, model_warmup, ...): they are cut
    # out first and named in `ignored`, so a Triton repository loads as it is. Whatever does not
    # parse, the strict parse of the original text explains.
    try:
        known, unknown = _without_unknown(text)
        text_format.Parse(known, proto)
    except (text_format.ParseError, _Malformed):
        try:
            text_format.Parse(text, mc.ModelConfig())
        except text_format.ParseError as e:
            raise ConfigError(f"{CONFIG_FILENAME} does not parse: {e}") from None
        raise ConfigError(f"{CONFIG_FILENAME} does not parse") from None
    if proto.max_batch_size < 0:
        raise ConfigError(f"{CONFIG_FILENAME}: max_batch_size must be >= 0, got {proto.max_batch_size}")
    if any(g.count < 0 for g in proto.instance_group):
        raise ConfigError(f"{CONFIG_FILENAME}: instance_group count must be >= 0")
    ignored = sorted(set(_set_paths(proto)) - SUPPORTED) + sorted(unknown)
    return ModelConfigFile(path, proto, tuple(dict.fromkeys(ignored)))


def _set_paths(msg: Message, prefix: str = "") -> list[str]:
    """Dotted paths of the fields set in msg, down to the first supported or scalar one."""
    out = []
    for field, value in msg.ListFields():
        path = prefix + field.name
        if path in SUPPORTED or field.message_type is None or field.message_type.GetOptions().map_entry:
            out.append(path)
            continue
        children = value if field.is_repeated else [value]
        nested = [p for child in children for p in _set_paths(child, path + ".")]
        out += nested or [path]
    return out


# -- cutting out the fields our schema lacks -----------------------------------------------------
class _Malformed(ValueError):
    pass


_TOKEN = re.compile(r"""\s+|#[^\n]*|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|[{}\[\]<>:,;]|[^\s{}\[\]<>:,;#"']+""")
_CLOSE = {"{": "}", "<": ">"}


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise _Malformed(pos)
        pos = m.end()
        tok = m.group(0)
        if not tok.isspace() and not tok.startswith("#"):
            out.append(tok)
    return out


def _without_unknown(text: str) -> tuple[str, set[str]]:
    """(the text without the fields mc.ModelConfig lacks, their dotted names)."""
    toks = _tokens(text)
    kept: list[str] = []
    unknown: set[str] = set()
    end = _fields(toks, 0, mc.ModelConfig.DESCRIPTOR, kept, unknown, "")
    if end != len(toks):
        raise _Malformed(end)
    return " ".join(kept), unknown


def _fields(toks, i, desc, kept, unknown, prefix) -> int:
    """Copy one message body from toks[i:] up to its close: known fields into `kept`.
    desc None: the body of an unknown field (skipped whole)."""
    while i < len(toks) and toks[i] not in ("}", ">"):
        name = toks[i]
        field = desc.fields_by_name.get(name) if desc is not None else None
        if field is None and desc is not None:
            unknown.add(prefix + name)
        out = kept if field is not None else []
        out.append(name)
        sub = field.message_type if field is not None else None
        i = _value(toks, i + 1, sub, out, unknown, prefix + name + ".")
        while i < len(toks) and toks[i] in (",", ";"):
            out.append(toks[i])
            i += 1
    return i


def _value(toks, i, desc, out, unknown, prefix) -> int:
    if i < len(toks) and toks[i] == ":":
        out.append(":")
        i += 1
    if i >= len(toks):
        raise _Malformed(i)
    if toks[i] != "[":
        return _one(toks, i, desc, out, unknown, prefix)
    out.append("[")
    i += 1
    while i < len(toks) and toks[i] != "]":
        i = _one(toks, i, desc, out, unknown, prefix)
        if i < len(toks) and toks[i] == ",":
            out.append(",")
            i += 1
    if i >= len(toks):
        raise _Malformed(i)
    out.append("]")
    return i + 1


def _one(toks, i, desc, out, unknown, prefix) -> int:
    tok = toks[i]
    out.append(tok)
    if tok in _CLOSE:
        i = _fields(toks, i + 1, desc, out, unknown, prefix)
        if i >= len(toks) or toks[i] != _CLOSE[tok]:
            raise _Malformed(i)
        out.append(toks[i])
        return i + 1
    i += 1
    while i < len(toks) and tok[0] in "\"'" and toks[i][0] in "\"'":   # adjacent strings concatenate
        out.append(toks[i])
        i += 1
    return i


def model_settings(cfg: ModelConfigFile | None, settings: ServeSettings) -> ServeSettings:
    """The server-wide settings with this model's config.pbtxt overrides applied."""
    if cfg is None:
        return settings
    p = cfg.proto
    changes: dict[str, Any] = {}
    if p.max_batch_size > 0:    # 0 = "dims include the batch axis" in Triton; the server-wide limit stays
        changes["max_batch_size"] = p.max_batch_size
    if p.HasField("dynamic_batching"):
        changes["max_queue_delay_us"] = int(p.dynamic_batching.max_queue_delay_microseconds)
    strategy = p.sequence_batching.WhichOneof("strategy_choice")   # Triton's place for it in sequence models
    if strategy and getattr(p.sequence_batching, strategy).max_queue_delay_microseconds:
        changes["max_queue_delay_us"] = int(getattr(p.sequence_batching, strategy).max_queue_delay_microseconds)
    if p.HasField("sequence_batching") and p.sequence_batching.max_sequence_idle_microseconds > 0:
        changes["sequence_idle_timeout_s"] = p.sequence_batching.max_sequence_idle_microseconds / 1e6
    counts = [g.count or 1 for g in p.instance_group]
    if counts:
        changes["instances"] = sum(counts)
    return dataclasses.replace(settings, **changes)


def log_ignored(name: str, cfg: ModelConfigFile | None) -> None:
    if cfg is not None and cfg.ignored:
        log.warning("model %s: %s fields not supported by rnnserve, ignored: %s", name, CONFIG_FILENAME,
                    ", ".join(cfg.ignored))
