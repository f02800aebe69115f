"""Tensor inference requests: validate, queue on the model's engine, build the response.

A request becomes one of:
- stateless work for the Batcher (no `sequence_id`): the state inputs the client
  sent (zeros for the rest) ride along; the state outputs are computed exactly only
  when one of them is requested (requested_outputs None = every output);
- one step of a server-side sequence (`sequence_id` non-zero / non-empty), handed
  to the SequenceManager with `sequence_start` / `sequence_end`: Triton's semantics;
- one step each of many sequences, one per row (the `sequence_id` input and its
  companions, serve/dataplane/sequence_rows.py): a step of each row's sequence, run as one unit
  when they can (serve/engine/sequence_units.py).

`submit()` does all validation and queueing synchronously, in the caller's order,
and returns at once (a Pending). That order is what keeps pipelined steps of one
sequence in arrival order. A blocking caller (`infer`) waits with Pending.result() and
builds the response in its own thread (keeping the batcher's thread free); a pipelined
caller takes Pending.response_future().
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from rnnserve.serve.dataplane import answers, sequence_rows, validation
from rnnserve.serve.engine.model_engine import ModelEngine, wait
from rnnserve.serve.engine.promise import Promise
from rnnserve.serve.engine.runtime import ModelInstance
from rnnserve.serve.errors import Cancelled, DeadlineExceeded, InvalidArgument
from rnnserve.serve.wire.types import InferRequest, InferResponse

log = logging.getLogger(__name__)


class Pending:
    """A queued request: the future of its model outputs, how to pull it from the queue, its
    deadline, and how to turn the outputs into the InferResponse."""

    def __init__(self, inst: ModelInstance, req: InferRequest, outputs: list[str], raw: Future,
                 cancel: Callable[[], bool] | None, deadline: float | None):
        self.inst, self.req, self.outputs = inst, req, outputs
        self.raw = raw                      # Future of {output name: array}
        self.cancel = cancel                # None for sequence steps (dropped when they reach the batcher)
        self.deadline = deadline            # time.monotonic()
        self.answer_limit: int | None = None   # check the answer's size once computed (answers.py)

    def respond(self, out: dict[str, np.ndarray]) -> InferResponse:
        response = InferResponse(model_name=self.inst.name, model_version=self.inst.version, id=self.req.id,
                                 outputs=[(n, out[n]) for n in self.outputs])
        if self.answer_limit is not None:   # its size was not known before the run
            answers.check_response(response, self.answer_limit)
        return response

    def result(self) -> InferResponse:
        """Wait for the outputs, polling cancellation and the deadline (ModelEngine's wait), and
        build the response on the caller's thread (keeping the batcher's thread free)."""
        return self.respond(wait(self.raw, self.cancel, self.req.is_cancelled, self.deadline))

    def response_future(self) -> Future:
        """A Future of the InferResponse, completed from the outputs' future (for infer_async)."""
        response: Future = Promise()

        def finish(done: Future) -> None:
            try:
                exc = done.exception()
                if exc is None:
                    response.set_result(self.respond(done.result()))
                    return
                response.set_exception(exc)
            except BaseException as e:  # noqa: BLE001 - a waiting caller must always get an answer
                log.exception("model %s: building the response failed", self.inst.name)
                if not response.done():
                    response.set_exception(e)

        self.raw.add_done_callback(finish)
        return response


def request_deadline(req: InferRequest, timeout_us: int, arrived: float) -> float | None:
    """The earlier of the gRPC deadline and the `timeout` parameter (µs after arrival), monotonic."""
    deadlines = [d for d in (req.deadline, arrived + timeout_us / 1e6 if timeout_us else None) if d is not None]
    return min(deadlines) if deadlines else None


def check_runnable(req: InferRequest, deadline: float | None) -> None:
    """Refuse a request that was cancelled or whose deadline passed before it was even queued."""
    if req.is_cancelled is not None and req.is_cancelled():
        raise Cancelled("the request was cancelled before it ran")
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded("the request's deadline passed before it ran")


def infer(engine: ModelEngine, req: InferRequest, max_seq_len: int, max_batch: int,
          params: validation.RequestParams | None = None) -> InferResponse:
    """Validate, queue and wait for one request: the blocking form (DataPlane.infer). Stateless
    work may run on the caller's thread when the model is idle (see Batcher.submit)."""
    return submit(engine, req, max_seq_len, max_batch, params, inline=True).result()


def _check_rows(engine: ModelEngine, rows: sequence_rows.SequenceRows, params: validation.RequestParams,
                feeds: dict, batch: int) -> None:
    if params.in_sequence:
        raise InvalidArgument("a request names its sequences either with the 'sequence_id' parameter "
                              "or with the 'sequence_id' input (one id per row), not both")
    if len(rows.ids) != batch:
        raise InvalidArgument(f"input 'sequence_id' has {len(rows.ids)} ids for {batch} rows of the "
                              "model's inputs; send one id per row")
    sent = [n for n in engine.io.state_inputs if n in feeds]
    if sent:
        raise InvalidArgument(f"state inputs ({', '.join(sent)}) cannot be sent with a per-row "
                              "'sequence_id' input: each row starts from the zero state")


def submit(engine: ModelEngine, req: InferRequest, max_seq_len: int, max_batch: int,
           params: validation.RequestParams | None = None, inline: bool = False) -> Pending:
    """Validate and queue one request; raises serve.errors.* for what is wrong before queueing.
    params: its parameters, already checked (None: check them here). inline: the caller blocks
    on the answer, so stateless work may run on its thread when the model is idle (see Batcher.submit)."""
    arrived = time.monotonic()
    inst = engine.inst
    if params is None:
        params = validation.check_parameters(req.parameters)
    outputs = validation.check_outputs(inst, req.requested_outputs)
    model_inputs, rows = sequence_rows.take(req.inputs, req.input_datatypes)
    feeds = validation.check_infer_inputs(inst, model_inputs, req.input_datatypes, max_seq_len, max_batch)
    deadline = request_deadline(req, params.timeout_us, arrived)
    check_runnable(req, deadline)
    inputs = feeds if len(feeds) == len(engine.io.inputs) else engine.inputs_of(feeds)   # no states sent
    batch = engine.io.rows(feeds)
    size = answers.tensor_answer_bytes(engine.io, outputs, feeds, inst.name, inst.version, req.id)
    answers.check(size, engine.settings.max_response_bytes, "request", answers.TENSOR_HINT)
    cancel = None
    if rows is not None:
        _check_rows(engine, rows, params, feeds, batch)
        fut = engine.submit_rows(rows.ids, rows.start, rows.end, inputs, deadline, req.is_cancelled, outputs)
    elif params.in_sequence:
        sent = [n for n in engine.io.state_inputs if n in feeds]
        client_states = engine.states_from(feeds, batch) if sent else None
        fut = engine.submit_step(params.sequence_id, inputs, start=params.sequence_start,
                                 end=params.sequence_end, client_states=client_states,
                                 deadline=deadline, is_cancelled=req.is_cancelled,
                                 step_id=validation.step_id(params, req.id), outputs=outputs)
    else:
        need_state = any(n in engine.io.state_outputs for n in outputs)
        fut, cancel = engine.submit(inputs, engine.states_from(feeds, batch), need_state,
                                    deadline=deadline, is_cancelled=req.is_cancelled, inline=inline,
                                    outputs=outputs)
    pending = Pending(inst, req, outputs, fut, cancel, deadline)
    if size is None:
        pending.answer_limit = engine.settings.max_response_bytes
    return pending
