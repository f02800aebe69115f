"""Export a user's own recurrent nn.Module to one self-describing model.onnx, behind the parity gate.

    from rnnserve.export.module import export_module

    export_module(
        tagger, "repo/tagger/1",
        inputs={"tokens": torch.randint(0, 50, (2, 9)), "h0": torch.zeros(1, 2, 32)},  # forward's order
        outputs=["tags", "hn"],                       # what forward returns, in order
        states=[("h0", "hn")],                        # state pairs: input -> output
        class_names=["O", "B", "I"],
    )

The module's forward takes the named inputs positionally (in the order of `inputs`, state inputs
included) and returns the named outputs (a tensor or a tuple, in the order of `outputs`, new
states included). Axes, unless declared in batch_axes / time_axes:
- inputs: batch axis 0; time axis 1 when the rank is >= 2; a state of rank 3 has batch axis 1
  ([layers, batch, hidden], PyTorch's layout), any other state batch axis 0, and no time axis;
- outputs: found by running the module: the dims that follow the batch and the time sizes.
Declare None for an input that is not batched (e.g. a scalar rate) or has no time axis.
The export is the one our own models use: the TorchScript exporter (dynamo=False) with the
batch and time axes dynamic, a check that the graph declares exactly those shapes, then the
parity gate against the module itself (export/module_parity.py): a batch x seq sweep with
random states, and, for stateful modules, onnxruntime streamed step by step == the whole run.
The metadata is format 2 (rnnserve.contract.build_general_metadata), which the server reads.
Nothing is written as model.onnx unless the gate passes.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn

from rnnserve.contract import DIM_BATCH, DIM_SEQ, MODEL_FILENAME, build_general_metadata
from rnnserve.export.module_parity import GATE_SEQ_LENS, run_module_parity, take
from rnnserve.export.onnx_export import DEFAULT_OPSET, ExportError, ExportResult, _dims, write_gated
from rnnserve.export.tolerance import ATOL, RTOL
from rnnserve.modelspec import DTYPES, ModelSpec, SpecError, StatePair, TensorDecl

log = logging.getLogger(__name__)

_MIN_EXAMPLE = 2  # batch and time sizes of the traced example: >= 2, so the tracer cannot specialise a 1


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _default_axes(name: str, t: torch.Tensor, is_state: bool) -> tuple[int | None, int | None]:
    if is_state:
        return (1 if t.dim() == 3 else 0), None
    return (0 if t.dim() >= 1 else None), (1 if t.dim() >= 2 else None)


def _resize(examples: dict[str, np.ndarray], axes: dict[str, tuple[int | None, int | None]],
            batch: int | None, seq: int | None) -> dict[str, np.ndarray]:
    """The examples with their batch / time axes taken to new sizes (rows repeated cyclically)."""
    out = {}
    for name, a in examples.items():
        b_ax, t_ax = axes[name]
        if batch is not None and b_ax is not None:
            a = take(a, b_ax, np.arange(batch) % a.shape[b_ax])
        if seq is not None and t_ax is not None:
            a = take(a, t_ax, np.arange(seq) % a.shape[t_ax])
        out[name] = a
    return out


def _run(module: nn.Module, feeds: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    shapes = ", ".join(f"{n}{list(v.shape)}" for n, v in feeds.items())
    try:
        with torch.no_grad():
            outs = _as_tuple(module(*(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values())))
    except Exception as e:
        raise ExportError(f"the module fails on inputs {shapes} ({type(e).__name__}: {str(e)[:200]}); "
                          f"are its batch and time axes declared?") from e
    return tuple(o.detach().numpy() for o in outs)


def _probe_output_axes(module: nn.Module, examples: dict[str, np.ndarray], in_axes, outputs: Sequence[str],
                       batch_axes: Mapping[str, int | None], time_axes: Mapping[str, int | None]):
    """Each output's (batch axis, time axis): declared, else the dim that follows the batch / time size."""
    base = _run(module, examples)
    if len(base) != len(outputs):
        raise ExportError(f"forward returned {len(base)} tensors, but outputs names {len(outputs)}: {list(outputs)}")
    has_time = any(t is not None for _, t in in_axes.values())
    more_b = _run(module, _resize(examples, in_axes, _batch_of(examples, in_axes) + 1, None))
    more_t = _run(module, _resize(examples, in_axes, None, _seq_of(examples, in_axes) + 2)) if has_time else base
    axes = {}
    for name, a, b, t in zip(outputs, base, more_b, more_t):
        grew_b = [i for i in range(a.ndim) if a.shape[i] != b.shape[i]]
        grew_t = [i for i in range(a.ndim) if a.shape[i] != t.shape[i]]
        if name not in batch_axes and len(grew_b) > 1 or name not in time_axes and len(grew_t) > 1:
            raise ExportError(f"output {name!r}: several dims follow the batch or time size; declare its axes")
        axes[name] = (batch_axes[name] if name in batch_axes else (grew_b[0] if grew_b else None),
                      time_axes[name] if name in time_axes else (grew_t[0] if grew_t else None))
    return axes, base


def _batch_of(examples, axes) -> int:
    return next(examples[n].shape[b] for n, (b, _) in axes.items() if b is not None)


def _seq_of(examples, axes) -> int:
    return next(examples[n].shape[t] for n, (_, t) in axes.items() if t is not None)


def _shape(a: np.ndarray, b_ax: int | None, t_ax: int | None) -> tuple[int | str, ...]:
    return tuple(DIM_BATCH if i == b_ax else DIM_SEQ if i == t_ax else int(d) for i, d in enumerate(a.shape))


def _dtype(name: str, a: np.ndarray) -> str:
    if a.dtype.name not in DTYPES:
        raise ExportError(f"{name!r}: dtype {a.dtype.name} is not one a model spec can declare")
    return a.dtype.name


def build_spec(examples: dict[str, np.ndarray], in_axes, out_examples: dict[str, np.ndarray], out_axes,
               states: Sequence[tuple[str, str]]) -> ModelSpec:
    state_in = {i: o for i, o in states}
    state_out = set(state_in.values())
    pairs = []
    for s_in, s_out in states:
        a, b = examples[s_in], out_examples[s_out]
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ExportError(f"state {s_in!r} {a.dtype}{list(a.shape)} and {s_out!r} {b.dtype}{list(b.shape)} "
                              f"differ in shape or dtype")
        if in_axes[s_in][0] is None:
            raise ExportError(f"state {s_in!r} needs a batch axis")
        pairs.append(StatePair(s_in, s_out, _dtype(s_in, a), _shape(a, in_axes[s_in][0], None), in_axes[s_in][0]))
    try:
        spec = ModelSpec(
            inputs=tuple(TensorDecl(n, _dtype(n, a), _shape(a, *in_axes[n]), *in_axes[n])
                         for n, a in examples.items() if n not in state_in),
            outputs=tuple(TensorDecl(n, _dtype(n, a), _shape(a, *out_axes[n]), *out_axes[n])
                          for n, a in out_examples.items() if n not in state_out),
            states=tuple(pairs))
        spec.check()
    except SpecError as e:
        raise ExportError(f"the module's I/O does not make a model spec: {e}") from None
    return spec


def graph_io(spec: ModelSpec, input_order: Sequence[str], output_order: Sequence[str]):
    """{name: (dtype, shape)} of every graph input and output, in the module's order."""
    decls: dict[str, tuple[str, tuple[int | str, ...]]] = {}
    for t in spec.inputs + spec.outputs:
        decls[t.name] = (t.dtype, t.shape)
    for s in spec.states:
        decls[s.input] = decls[s.output] = (s.dtype, s.shape)
    return [(n, *decls[n]) for n in input_order], [(n, *decls[n]) for n in output_order]


def settle_output_dims(proto: onnx.ModelProto, outs) -> None:
    """Where the exporter could not infer a fixed output dim (it names it, e.g. 'Concatout_dim_1'), declare
    the size the module produced; the parity gate then proves the runtime shape at every batch and seq."""
    want = {name: shape for name, _, shape in outs}
    for v in proto.graph.output:
        for d, w in zip(v.type.tensor_type.shape.dim, want.get(v.name, ())):
            if isinstance(w, int) and d.HasField("dim_param") and d.dim_param not in (DIM_BATCH, DIM_SEQ):
                log.debug("%s: declared dim %r -> %d", v.name, d.dim_param, w)
                d.dim_value = w


def check_spec_io(proto: onnx.ModelProto, ins, outs) -> str:
    """Fail loudly unless the graph declares exactly the spec's names, dtypes and shapes."""
    problems = []
    for kind, got_list, want in (("input", proto.graph.input, ins), ("output", proto.graph.output, outs)):
        got_names = [v.name for v in got_list]
        if got_names != [w[0] for w in want]:
            problems.append(f"{kind}s are {got_names}, expected {[w[0] for w in want]}")
            continue
        for v, (name, dtype, shape) in zip(got_list, want):
            got_dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
            if got_dtype != dtype:
                problems.append(f"{name}: dtype {got_dtype}, expected {dtype}")
            if _dims(v) != list(shape):
                problems.append(f"{name}: declared shape {_dims(v)}, expected {list(shape)} (strings are symbolic)")
    if problems:
        raise ExportError("exported graph breaks its declared I/O: " + "; ".join(problems))
    return describe(ins, outs)


def describe(ins, outs) -> str:
    fmt = lambda specs: ", ".join(f"{n}[{','.join(map(str, s))}]" for n, _, s in specs)  # noqa: E731
    return f"{fmt(ins)} -> {fmt(outs)}"


def export_module(module: nn.Module, out_dir: str, *, inputs: Mapping[str, torch.Tensor], outputs: Sequence[str],
                  states: Sequence[tuple[str, str]] = (), batch_axes: Mapping[str, int | None] | None = None,
                  time_axes: Mapping[str, int | None] | None = None, vocab: list[str] | None = None,
                  class_names: list[str] | None = None, feature_names: list[str] | None = None,
                  model_config: Mapping[str, Any] | None = None, train_config: Mapping[str, Any] | None = None,
                  checkpoint_sha256: str | None = None, opset: int = DEFAULT_OPSET, gate: bool = True,
                  atol: float = ATOL, rtol: float = RTOL, seq_lens: Sequence[int] = GATE_SEQ_LENS,
                  argmax_output: str | None = None,
                  threads: int | None = None) -> ExportResult:
    """Export `module` to out_dir/model.onnx (+ parity.json); see the module docstring. Raises ExportError."""
    t0 = time.perf_counter()
    batch_axes, time_axes = dict(batch_axes or {}), dict(time_axes or {})
    state_in = [i for i, _ in states]
    missing = [n for n in state_in if n not in inputs] + [o for _, o in states if o not in outputs]
    if missing:
        raise ExportError(f"state names {missing} are not among the inputs / outputs")
    module = module.eval()
    examples = {n: t.detach().cpu().numpy() for n, t in inputs.items()}
    in_axes = {}
    for n, t in inputs.items():
        b, tm = _default_axes(n, t, n in state_in)
        in_axes[n] = (batch_axes.get(n, b), time_axes.get(n, tm))
    if not any(b is not None for b, _ in in_axes.values()):
        raise ExportError("no input has a batch axis")
    # Trace with batch and time sizes >= 2 (a traced size 1 can be fixed in the graph).
    has_time = any(t is not None for _, t in in_axes.values())
    examples = _resize(examples, in_axes, max(_batch_of(examples, in_axes), _MIN_EXAMPLE),
                       max(_seq_of(examples, in_axes), _MIN_EXAMPLE) if has_time else None)
    out_axes, out_values = _probe_output_axes(module, examples, in_axes, outputs, batch_axes, time_axes)
    spec = build_spec(examples, in_axes, dict(zip(outputs, out_values)), out_axes, states)
    ins, outs = graph_io(spec, list(inputs), list(outputs))
    axes = {**in_axes, **out_axes}
    dynamic_axes = {n: {a: d for a, d in ((axes[n][0], DIM_BATCH), (axes[n][1], DIM_SEQ)) if a is not None}
                    for n in [*inputs, *outputs]}
    props = build_general_metadata(spec=spec, torch_version=torch.__version__, onnx_version=onnx.__version__,
                                   opset=opset, vocab=vocab, class_names=class_names, feature_names=feature_names,
                                   model_config=model_config, train_config=train_config,
                                   checkpoint_sha256=checkpoint_sha256)

    def write(path: str) -> str:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            try:
                torch.onnx.export(module, tuple(torch.from_numpy(examples[n]) for n in inputs), path,
                                  dynamo=False, opset_version=opset, input_names=list(inputs),
                                  output_names=list(outputs), dynamic_axes=dynamic_axes, do_constant_folding=True)
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise ExportError(f"ONNX export failed: {type(e).__name__}: {first}") from e
        for w in caught:  # deprecation + tracer notes; the shape check and the gate are the real guard
            log.debug("exporter warning: %s", str(w.message).splitlines()[0])
        proto = onnx.load(path)
        settle_output_dims(proto, outs)
        io = check_spec_io(proto, ins, outs)
        onnx.helper.set_model_props(proto, props)
        proto.doc_string = f"rnnserve: {type(module).__name__} exported by rnnserve.export.module"
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, path)
        return io

    def gate_fn(path: str) -> dict[str, Any]:
        return run_module_parity(module, path, spec, examples, list(inputs), list(outputs), atol=atol, rtol=rtol,
                                 seq_lens=seq_lens, argmax_output=argmax_output, threads=threads)

    io, report, parity_path = write_gated(out_dir, type(module).__name__, write, gate_fn if gate else None)
    final_path = os.path.join(out_dir, MODEL_FILENAME)
    seconds = time.perf_counter() - t0
    log.info("exported %s: %s in %.1fs", final_path, io, seconds)
    return ExportResult(onnx_path=final_path, parity=report, seconds=seconds, parity_path=parity_path, io=io)
