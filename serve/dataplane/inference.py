"""Tensor inference requests: validate, queue on the model's engine, build the response.

A request becomes one of:
- stateless work for the Batcher (no `sequence_id`): the state inputs the client
  sent (zeros for the rest) ride along; hn/cn are computed exactly only when an
  output of them is requested (requested_outputs None = every output);
- one step of a server-side sequence (`sequence_id` non-zero / non-empty), handed
  to the SequenceManager with `sequence_start` / `sequence_end`: Triton's semantics.

`submit()` does all validation and queueing synchronously, in the caller's order,
and returns at once (a Pending). That order is what keeps pipelined steps of one
sequence in arrival order. A blocking caller waits on Pending.raw and builds the
response in its own thread (keeping the batcher's thread free); a pipelined caller
takes Pending.response_future().
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from rnnserve.contract import INPUT_TOKENS
from rnnserve.serve.dataplane import validation
from rnnserve.serve.engine.runtime import ModelInstance
from rnnserve.serve.errors import Cancelled, DeadlineExceeded, ServeError
from rnnserve.serve.wire.types import InferRequest, InferResponse

log = logging.getLogger(__name__)


class Pending:
    """A queued request: the future of its model outputs, how to pull it from the queue, its
    deadline, and how to turn the outputs into the InferResponse (recording statistics)."""

    def __init__(self, inst: ModelInstance, req: InferRequest, outputs: list[str], rows: int, raw: Future,
                 cancel: Callable[[], bool] | None, deadline: float | None, t0: int,
                 queued: int):
        self.inst, self.req, self.outputs, self.rows = inst, req, outputs, rows
        self.raw = raw                      # Future of {output name: array}
        self.cancel = cancel                # None for sequence steps (dropped when they reach the batcher)
        self.deadline = deadline            # time.monotonic()
        self.t0 = t0
        self.queued = queued                # validated, about to queue (an inline run starts here)

    def respond(self, out: dict[str, np.ndarray]) -> InferResponse:
        t_out = time.perf_counter_ns()
        inst = self.inst
        resp = InferResponse(model_name=inst.name, model_version=inst.version, id=self.req.id,
                             outputs=[(n, out[n]) for n in self.outputs])
        end = time.perf_counter_ns()
        inst.stats.record_request(True, end - self.t0, rows=self.rows, input_ns=self.queued - self.t0,
                                  output_ns=end - t_out)
        return resp

    def failed(self) -> None:
        self.inst.stats.record_request(False, time.perf_counter_ns() - self.t0)

    def response_future(self) -> Future:
        """A Future of the InferResponse, completed from the outputs' future (for infer_async)."""
        response: Future = Future()

        def finish(done: Future) -> None:
            try:
                exc = done.exception()
                if exc is None:
                    response.set_result(self.respond(done.result()))
                    return
                self.failed()
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


def submit(inst: ModelInstance, req: InferRequest, max_seq_len: int, inline: bool = False) -> Pending:
    """Validate and queue one request; raises serve.errors.* for what is wrong before queueing.
    inline: the caller blocks on the answer, so stateless work may run on its thread when the
    model is idle (see Batcher.submit)."""
    t0 = time.perf_counter_ns()
    arrived = time.monotonic()
    engine = inst.engine
    try:
        params = validation.check_parameters(req.parameters)
        outputs = validation.check_outputs(inst, req.requested_outputs)
        feeds = validation.check_infer_inputs(inst, req.inputs, req.input_datatypes, max_seq_len)
        deadline = request_deadline(req, params.timeout_us, arrived)
        check_runnable(req, deadline)
        tokens = feeds[INPUT_TOKENS]
        batch = int(tokens.shape[0])
        cancel = None
        queued = time.perf_counter_ns()
        if params.in_sequence:
            sent = [n for n in engine.io.state_inputs if n in feeds]
            client_states = engine.states_from(feeds, batch) if sent else None
            fut = engine.submit_step(params.sequence_id, tokens, start=params.sequence_start,
                                     end=params.sequence_end, client_states=client_states,
                                     deadline=deadline, is_cancelled=req.is_cancelled)
        else:
            need_state = any(n in engine.io.state_outputs for n in outputs)
            fut, cancel = engine.submit(tokens, engine.states_from(feeds, batch), need_state,
                                        deadline=deadline, is_cancelled=req.is_cancelled, inline=inline)
    except ServeError:
        inst.stats.record_request(False, time.perf_counter_ns() - t0)
        raise
    return Pending(inst, req, outputs, batch, fut, cancel, deadline, t0, queued)
