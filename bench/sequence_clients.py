"""The sequence clients of bench.bench_batching's streaming table (also bench.bench_statestore's):
tritonclient.grpc, unchanged, sending single-token steps of many sequences in three shapes.

  unary_sequences   one thread per sequence, each step a blocking infer()
  stream_sequences  K streams, each carrying N/K sequences, pipelined: a sequence sends its next
                    step the moment its previous answer arrives
  row_sequences     one client, every sequence a row of each request (the per-row sequence_id /
                    sequence_start / sequence_end inputs), unary or all requests on one stream

Each returns every sequence's last logits [N, V], for the exactness check against the in-process reference.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import numpy as np
import tritonclient.grpc as tc

from bench.bench_server import MODEL, VOCAB


def tokens_input(tokens: np.ndarray) -> tc.InferInput:
    tensor = tc.InferInput("tokens", list(tokens.shape), "INT64")
    tensor.set_data_from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
    return tensor


def _run_all(target: Callable, args: Iterable, errors: list) -> None:
    """One thread per argument; join them all, then raise the first error any of them hit."""
    threads = [threading.Thread(target=target, args=(a,)) for a in args]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]


def unary_sequences(address: str, tokens: np.ndarray, base_id: int) -> np.ndarray:
    """One thread per sequence, each step a blocking infer(); -> every sequence's last logits."""
    n, steps = tokens.shape
    last: list[np.ndarray] = [None] * n
    gate = threading.Barrier(n)
    errors: list = []

    def run(i: int) -> None:
        try:
            with tc.InferenceServerClient(address) as client:
                inputs = {v: [tokens_input(np.array([[v]]))] for v in set(tokens[i].tolist())}
                outputs = [tc.InferRequestedOutput("logits")]
                gate.wait()
                for t in range(steps):
                    result = client.infer(MODEL, inputs[int(tokens[i, t])], outputs=outputs,
                                          sequence_id=base_id + i, sequence_start=t == 0,
                                          sequence_end=t == steps - 1)
                last[i] = result.as_numpy("logits")[0, -1]
        except Exception as e:  # noqa: BLE001 - reported after the run
            errors.append(e)

    _run_all(run, range(n), errors)
    return np.stack(last)


def stream_sequences(address: str | list[str], tokens: np.ndarray, base_id: int, streams: int,
                     alternate: bool = False, step_ids: bool = False) -> np.ndarray:
    """`streams` tritonclient streams, each carrying n/streams sequences. Every sequence sends
    its next step the moment the answer to its previous step arrives (from tritonclient's
    callback), so a stream always has one step of each of its sequences in flight.
    Several addresses (replicas): each stream opens one stream per replica; sequence i lives
    on replica i % R, or (alternate) its step t goes to replica (i + t) % R. step_ids: each
    step carries its id (the `sequence_step` parameter)."""
    addresses = [address] if isinstance(address, str) else address
    n, steps = tokens.shape
    last: list[np.ndarray] = [None] * n
    groups = [list(range(k, n, streams)) for k in range(streams)]
    gate = threading.Barrier(streams)
    errors: list = []
    inputs = {v: [tokens_input(np.array([[v]]))] for v in range(len(VOCAB))}
    outputs = [tc.InferRequestedOutput("logits")]

    def run(group: list[int]) -> None:
        done = threading.Event()
        sent = dict.fromkeys(group, 0)          # steps sent per sequence
        left = [len(group)]
        clients = [tc.InferenceServerClient(a) for a in addresses]

        def send(i: int) -> None:
            t = sent[i]
            sent[i] = t + 1
            client = clients[((i + t) if alternate else i) % len(clients)]
            client.async_stream_infer(MODEL, inputs[int(tokens[i, t])], outputs=outputs,
                                      request_id=f"s{i}", sequence_id=base_id + i,   # a numeric id would be a step id
                                      sequence_start=t == 0, sequence_end=t == steps - 1,
                                      parameters={"sequence_step": t} if step_ids else None)

        def answered(result, error) -> None:
            try:
                if error is not None:
                    raise error
                i = int(result.get_response().id[1:])
                if sent[i] < steps:
                    send(i)
                    return
                last[i] = result.as_numpy("logits")[0, -1]
                left[0] -= 1
                if left[0] == 0:
                    done.set()
            except Exception as e:  # noqa: BLE001 - reported after the run
                errors.append(e)
                done.set()

        try:
            for client in clients:
                client.start_stream(callback=answered)
            gate.wait()
            for i in group:
                send(i)
            if not done.wait(600):
                raise TimeoutError("stream answers stopped coming")
        except Exception as e:  # noqa: BLE001 - reported after the run
            errors.append(e)
        finally:
            for client in clients:
                client.stop_stream()
                client.close()

    _run_all(run, groups, errors)
    return np.stack(last)


def row_sequences(address: str, tokens: np.ndarray, base_id: int, streamed: bool) -> np.ndarray:
    """One client, every sequence a row of each request (the sequence_id / sequence_start /
    sequence_end inputs): one request per step of all n sequences. Unary: each request after
    the previous answer. Streamed: all the requests sent at once on one stream (the server runs
    them in order); -> every sequence's last logits."""
    n, steps = tokens.shape
    ids = np.arange(base_id, base_id + n, dtype=np.uint64)

    def request(t: int) -> list:
        flags = [("sequence_start", np.full(n, t == 0)), ("sequence_end", np.full(n, t == steps - 1))]
        tensors = [tokens_input(tokens[:, t:t + 1]), tc.InferInput("sequence_id", [n], "UINT64")]
        tensors[1].set_data_from_numpy(ids)
        for name, flag in flags:
            tensors.append(tc.InferInput(name, [n], "BOOL"))
            tensors[-1].set_data_from_numpy(flag)
        return tensors

    requests = [request(t) for t in range(steps)]
    outputs = [tc.InferRequestedOutput("logits")]
    with tc.InferenceServerClient(address) as client:
        if not streamed:
            for inputs in requests:
                result = client.infer(MODEL, inputs, outputs=outputs)
            return result.as_numpy("logits")[:, -1]
        answers: list = []
        done = threading.Event()

        def answered(result, error) -> None:
            answers.append(error if error is not None else result)
            if len(answers) == steps:
                done.set()

        client.start_stream(callback=answered)
        for t, inputs in enumerate(requests):
            client.async_stream_infer(MODEL, inputs, outputs=outputs, request_id=str(t))
        if not done.wait(600):
            raise TimeoutError("stream answers stopped coming")
        client.stop_stream()
    failed = [a for a in answers if isinstance(a, Exception)]
    if failed:
        raise failed[0]
    return answers[-1].as_numpy("logits")[:, -1]
