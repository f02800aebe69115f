"""What a model file is: its ModelSpec (rnnserve/modelspec.py), from the first source that has it.

1. our metadata (format 1 or 2) in the ONNX file;
2. the model's config.pbtxt in Triton's schema (input, output, max_batch_size,
   sequence_batching.state); tensors it leaves out come from the graph;
3. the graph itself, as onnxruntime reports it (serve never imports onnx).

Rules for 2 and 3 (README "Serving any recurrent ONNX model"):
- batch axis: with max_batch_size > 0 in config.pbtxt, axis 0 of everything (Triton's
  batch-first rule). Otherwise the graph's batch symbol is dim 0 of the first non-state
  input; each tensor's batch axis is the axis with that symbol. Where the graph has no
  name there, a -1 in config.pbtxt's dims marks it: a state's only -1, dim 0 of an input
  or output. A first input whose dim 0 is the constant 1 means a fixed batch of 1.
- state pairs: config.pbtxt's sequence_batching.state, else names that pair by a common
  pattern (h0->hn, c0->cn, h->hn, state->stateN / state_out, x_in->x_out, ...) where the
  shapes agree. A state's other dims must be fixed.
Anything ambiguous raises SpecError with what to declare in config.pbtxt.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rnnserve.contract import CONFIG_FILENAME, GraphTensor, ModelMeta
from rnnserve.modelspec import DTYPES, ModelSpec, SpecError, StatePair, TensorDecl
from rnnserve.serve.engine.modelio import ModelIO
from rnnserve.serve.engine.runtime import ORT_DTYPES
from rnnserve.serve.wire.gen import model_config_pb2 as mc

BATCH = "batch"     # the name a spec gives the batch axis it found

_CONFIG_DTYPES = {mc.DataType.Value(f"TYPE_{dt}"): name for name, dt in DTYPES.items()}

# (input suffix, output suffix) and (input prefix, output prefix) of state pairs; the input
# name itself with one of _APPENDED added, or _PREPENDED before it, pairs too.
_SUFFIXES = (("0", "n"), ("_0", "_n"), ("_in", "_out"), ("in", "out"), ("_input", "_output"),
             ("_prev", "_next"), ("_old", "_new"), ("_t", "_t1"))
_PREFIXES = (("in_", "out_"), ("input_", "output_"), ("prev_", "next_"), ("past_", "present_"), ("old_", "new_"))
_APPENDED = ("n", "_n", "_out", "out", "_new", "_next", "_output")
_PREPENDED = ("new_", "next_", "out_")

DECLARE = (f"declare it in {CONFIG_FILENAME}: sequence_batching {{ state [ {{ input_name: ... output_name: ... "
           "data_type: ... dims: [ ... ] } ] } with -1 at the state's batch axis, and input/output dims with "
           "-1 at dim 0 for batch-first tensors (or max_batch_size > 0)")


@dataclass(frozen=True)
class Described:
    spec: ModelSpec
    source: str              # "metadata", "config.pbtxt" or "graph"

    def summary(self) -> str:
        """One log line: what the server will feed and read."""
        s = self.spec

        def t(d: TensorDecl) -> str:
            axis = "unbatched" if d.batch_axis is None else f"batch axis {d.batch_axis}"
            return f"{d.name} {d.datatype} {list(d.shape)} ({axis})"
        states = "; ".join(f"{p.input}->{p.output} {DTYPES[p.dtype]} {list(p.shape)} (batch axis {p.batch_axis})"
                           for p in s.states) or "none"
        batching = ("fixed batch 1, never batched" if s.fixed_batch else "batched" if ModelIO.from_spec(s).mergeable
                    else "not batched across requests (an output has no batch axis)")
        return (f"I/O from {self.source}: inputs {', '.join(t(d) for d in s.inputs)}; outputs "
                f"{', '.join(t(d) for d in s.outputs)}; states {states}; {batching}")


def graph_tensors(nodes: Iterable) -> list[GraphTensor]:
    """onnxruntime NodeArgs -> GraphTensor (dims: int, a symbol, or None when unnamed)."""
    out = []
    for n in nodes:
        if n.type not in ORT_DTYPES:
            raise SpecError(f"tensor {n.name!r} has type {n.type}, which rnnserve does not serve")
        shape = tuple(d if isinstance(d, (int, str)) and d != "" else None for d in (n.shape or ()))
        out.append(GraphTensor(n.name, ORT_DTYPES[n.type], shape))
    return out


def describe(inputs: Sequence[GraphTensor], outputs: Sequence[GraphTensor], meta: ModelMeta | None,
             config: mc.ModelConfig | None) -> Described:
    """The spec of a graph with these inputs/outputs; raises SpecError (say what to declare)."""
    if meta is not None and meta.spec is not None:
        found = Described(meta.spec, "metadata")
    elif config is not None and (config.input or config.output or config.sequence_batching.state):
        found = Described(_infer(inputs, outputs, config), CONFIG_FILENAME)
    else:
        found = Described(_infer(inputs, outputs, None), "graph")
    check_against_graph(found.spec, inputs, outputs)
    return found


def check_against_graph(spec: ModelSpec, inputs: Sequence[GraphTensor], outputs: Sequence[GraphTensor]) -> None:
    """The graph must have exactly the I/O the spec describes: names, dtypes, ranks, fixed dims."""
    declared_in = {t.name: (t.dtype, t.shape) for t in spec.inputs}
    declared_in.update({p.input: (p.dtype, p.shape) for p in spec.states})
    declared_out = {t.name: (t.dtype, t.shape) for t in spec.outputs}
    declared_out.update({p.output: (p.dtype, p.shape) for p in spec.states})
    for what, declared, graph in (("inputs", declared_in, inputs), ("outputs", declared_out, outputs)):
        names = [g.name for g in graph]
        if sorted(names) != sorted(declared):
            raise SpecError(f"graph {what} {names} do not match the model description {sorted(declared)}")
        for g in graph:
            dtype, shape = declared[g.name]
            if dtype != g.dtype:
                raise SpecError(f"{g.name!r} is {g.dtype} in the graph but {dtype} in the description")
            if len(shape) != len(g.shape):
                raise SpecError(f"{g.name!r} has rank {len(g.shape)} in the graph but {list(shape)} "
                                "in the description")
            for d, gd in zip(shape, g.shape):
                if isinstance(d, int) and isinstance(gd, int) and d != gd:
                    raise SpecError(f"{g.name!r} has shape {list(g.shape)} in the graph but {list(shape)} "
                                    "in the description")


# -- inference from config.pbtxt and the graph ------------------------------------------------------
def state_partners(name: str) -> list[str]:
    """Output names (lower case) that would pair with state input `name` by a common pattern."""
    n = name.lower()
    out = [n[:-len(a)] + b for a, b in _SUFFIXES if n.endswith(a) and len(n) > len(a)]
    out += [b + n[len(a):] for a, b in _PREFIXES if n.startswith(a) and len(n) > len(a)]
    out += [n + s for s in _APPENDED] + [p + n for p in _PREPENDED]
    return list(dict.fromkeys(out))


def _agree(a: Sequence, b: Sequence) -> bool:
    return len(a) == len(b) and all(not (isinstance(x, int) and isinstance(y, int)) or x == y
                                    for x, y in zip(a, b))


def _pairs_by_name(inputs: Sequence[GraphTensor], outputs: Sequence[GraphTensor]) -> list[tuple[str, str]]:
    by_lower = {o.name.lower(): o for o in outputs}
    pairs: list[tuple[str, str]] = []
    claimed: dict[str, str] = {}
    for i in inputs:
        found = [by_lower[c] for c in state_partners(i.name) if c in by_lower]
        found = [o for o in found if o.dtype == i.dtype and _agree(i.shape, o.shape)]
        if len(found) > 1:
            raise SpecError(f"state input {i.name!r} could pair with outputs {[o.name for o in found]}; "
                            f"{DECLARE}")
        if found:
            o = found[0]
            if o.name in claimed:
                raise SpecError(f"output {o.name!r} could be the next state of both {claimed[o.name]!r} "
                                f"and {i.name!r}; {DECLARE}")
            claimed[o.name] = i.name
            pairs.append((i.name, o.name))
    return pairs


def _overlay(name: str, graph: tuple, dims: Sequence[int], batch_first: bool) -> tuple[list, list]:
    """(merged dims, declared dims with the batch axis) of a tensor config.pbtxt declares."""
    declared = ([-1] if batch_first else []) + list(dims)
    if len(declared) != len(graph):
        extra = " (max_batch_size > 0 adds the batch axis in front)" if batch_first else ""
        raise SpecError(f"{CONFIG_FILENAME} dims {list(dims)} of {name!r} have rank {len(declared)}{extra}, "
                        f"but the graph's {name!r} has rank {len(graph)}")
    merged = []
    for c, g in zip(declared, graph):
        if c == -1:
            merged.append(g)
        elif isinstance(g, int) and g != c:
            raise SpecError(f"{CONFIG_FILENAME} dims of {name!r} say {c} where the graph has {g}")
        else:
            merged.append(int(c))
    return merged, declared


def _infer(inputs: Sequence[GraphTensor], outputs: Sequence[GraphTensor], config: mc.ModelConfig | None
           ) -> ModelSpec:
    gin = {t.name: t for t in inputs}
    gout = {t.name: t for t in outputs}
    shapes = {t.name: list(t.shape) for t in list(inputs) + list(outputs)}
    declared: dict[str, list[int]] = {}
    batch_first = config is not None and config.max_batch_size > 0

    def declare(name: str, graph: dict, data_type: int, dims: Sequence[int], what: str) -> None:
        if name not in graph:
            raise SpecError(f"{CONFIG_FILENAME} names {what} {name!r}, which the graph does not have "
                            f"(its {what}s: {', '.join(graph)})")
        dtype = _CONFIG_DTYPES.get(data_type)
        if data_type and dtype != graph[name].dtype:
            raise SpecError(f"{CONFIG_FILENAME} says {name!r} is {mc.DataType.Name(data_type)}, "
                            f"the graph says {graph[name].dtype}")
        shapes[name], declared[name] = _overlay(name, graph[name].shape, dims, batch_first)

    state_cfg = list(config.sequence_batching.state) if config is not None else []
    if config is not None:
        for t in config.input:
            declare(t.name, gin, t.data_type, t.dims, "input")
        for t in config.output:
            declare(t.name, gout, t.data_type, t.dims, "output")
        for s in state_cfg:
            declare(s.input_name, gin, s.data_type, s.dims, "input")
            declare(s.output_name, gout, s.data_type, s.dims, "output")
    if state_cfg:
        pairs = [(s.input_name, s.output_name) for s in state_cfg]
    else:
        pairs = _pairs_by_name([GraphTensor(n, t.dtype, tuple(shapes[n])) for n, t in gin.items()],
                               [GraphTensor(n, t.dtype, tuple(shapes[n])) for n, t in gout.items()])
    state_in = {i for i, _ in pairs}
    state_out = {o for _, o in pairs}
    plain_in = [n for n in gin if n not in state_in]
    plain_out = [n for n in gout if n not in state_out]
    if not plain_in:
        raise SpecError("the model has no input besides its states")

    fixed, symbol = False, None
    if not batch_first:
        first = next((n for n in plain_in if shapes[n]), None)
        if first is None:
            raise SpecError(f"no input has a batch axis; {DECLARE}")
        d0 = shapes[first][0]
        if isinstance(d0, str):
            symbol = d0
        elif d0 == 1:
            fixed = True
        elif declared.get(first, [None])[0] != -1:
            raise SpecError(f"cannot tell the batch axis of input {first!r} (dims {shapes[first]}); {DECLARE}")

    def candidates(name: str, state: bool) -> list[int]:
        """The axes that may be the batch axis of `name` (a plain tensor: at most one)."""
        dims = shapes[name]
        if batch_first:
            return [0]
        if fixed:   # any axis of size 1 holds a batch of 1
            ones = [i for i, d in enumerate(dims) if d == 1]
            return ones[:1] if state else [0] if dims and dims[0] == 1 else []
        hits = [i for i, d in enumerate(dims) if symbol is not None and d == symbol]
        if len(hits) > 1:
            raise SpecError(f"{name!r} {dims} has the batch dim {symbol!r} twice; {DECLARE}")
        if hits:
            return hits
        marks = [i for i, d in enumerate(declared.get(name, [])) if d == -1 and not isinstance(dims[i], int)]
        return marks if state else [0] if marks and marks[0] == 0 else []

    def axis(name: str) -> int | None:
        found = candidates(name, state=False)
        return found[0] if found else None

    def state_axis(name: str) -> int:
        found = candidates(name, state=True)
        if len(found) != 1:
            raise SpecError(f"cannot tell the batch axis of state {name!r} (dims {shapes[name]}); {DECLARE}")
        return found[0]

    def named(name: str, batch_axis: int | None) -> tuple:
        # a fixed batch keeps its constant 1; an unnamed dynamic dim gets a name of its own
        return tuple(d if isinstance(d, int) else BATCH if i == batch_axis else d if d is not None
                     else f"{name}:{i}" for i, d in enumerate(shapes[name]))

    states = []
    for i, o in pairs:
        a = state_axis(i)
        if not _agree(shapes[i], shapes[o]) or gin[i].dtype != gout[o].dtype:
            raise SpecError(f"state {i!r} {shapes[i]} and {o!r} {shapes[o]} differ in dtype or shape")
        shape = named(i, a)
        loose = [k for k, d in enumerate(shape) if k != a and not isinstance(d, int)]
        if loose:
            raise SpecError(f"state {i!r} has dynamic dims {[shapes[i][k] for k in loose]} besides its batch "
                            f"axis; {DECLARE}")
        states.append(StatePair(i, o, gin[i].dtype, shape, a))
    ins = [TensorDecl(n, gin[n].dtype, named(n, a), a) for n in plain_in for a in [axis(n)]]
    outs = [TensorDecl(n, gout[n].dtype, named(n, a), a) for n in plain_out for a in [axis(n)]]
    spec = ModelSpec(tuple(ins), tuple(outs), tuple(states), fixed_batch=fixed)
    spec.check()
    return spec
