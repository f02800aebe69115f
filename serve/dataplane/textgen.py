"""Text on top of a model's engine: per-position predictions, sampling, streaming
generation that carries the recurrent state, and scoring.

Every run goes through ModelEngine.run (serve/engine/model_engine.py), so concurrent text
requests share onnxruntime runs with each other and with tensor requests.
Inputs arrive validated (serve/dataplane/validation.py). Probabilities are computed in
float64 from the float32 logits.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from rnnserve.contract import INPUT_TOKENS, OUTPUT_LOGITS
from rnnserve.serve.engine.model_engine import ModelEngine, States
from rnnserve.serve.engine.runtime import ModelInstance
from rnnserve.serve.wire.types import CharProb, GenerateEvent, PositionPrediction


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(logits))


def ranked(probs: np.ndarray) -> np.ndarray:
    """Ids by descending probability; ties keep the lower id first (like argmax)."""
    return np.argsort(-probs, kind="stable")


def sample_next(logits: np.ndarray, temperature: float, top_k: int, top_p: float,
                rng: np.random.Generator) -> int:
    """One token id from a [vocab] logits row: greedy at temperature 0, else top-k, then nucleus."""
    if temperature == 0:
        return int(np.argmax(logits))
    probs = softmax(np.asarray(logits, np.float64) / temperature)
    order = ranked(probs)
    if top_k > 0:
        order = order[:top_k]
    if top_p < 1.0:
        cum = np.cumsum(probs[order])
        order = order[:int(np.searchsorted(cum, top_p * cum[-1])) + 1]  # smallest set reaching top_p
    p = probs[order]
    cum = np.cumsum(p)
    i = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
    return int(order[min(i, len(order) - 1)])


def positions(inst: ModelInstance, ids: np.ndarray, logits: np.ndarray, top_k: int,
              offset: int = 0) -> list[PositionPrediction]:
    """Per position (numbered from `offset`): the argmax char, its probability and the top_k chars."""
    probs = softmax(logits)
    out = []
    for t, row in enumerate(probs):
        order = ranked(row)
        best = int(order[0])
        top = [CharProb(inst.vocab[int(i)], float(row[i])) for i in order[:top_k]]
        out.append(PositionPrediction(index=offset + t, input_char=inst.vocab[int(ids[t])],
                                      char=inst.vocab[best], prob=float(row[best]), top=top))
    return out


def predict(engine: ModelEngine, ids: np.ndarray, top_k: int) -> tuple[str, list[PositionPrediction]]:
    """One run over the text; no final state is needed, so it may share a padded run."""
    logits = engine.run({INPUT_TOKENS: ids[None, :]}, engine.zero_states(1), need_state=False)[OUTPUT_LOGITS][0]
    found = positions(engine.inst, ids, logits, top_k)
    return "".join(p.char for p in found), found


def step(engine: ModelEngine, tokens: np.ndarray, state: States) -> tuple[np.ndarray, States]:
    """One run carrying the state: returns (logits [batch, T, vocab], the new state)."""
    out = engine.run({INPUT_TOKENS: tokens}, state, need_state=True)
    # Copies: a batched run's outputs are views shared by every row of that run.
    return out[OUTPUT_LOGITS], tuple(np.ascontiguousarray(out[n]) for n in engine.io.state_outputs)


def generate(engine: ModelEngine, prompt_ids: np.ndarray, max_tokens: int, temperature: float,
             top_k: int, top_p: float, seed: int | None, stop: Sequence[str]) -> Iterator[GenerateEvent]:
    """Run the prompt once, then one run per new token (state carried): O(1) per token.

    Each run is one batcher item, so the steps of concurrent generates share runs.
    Yields one event per generated character; the last has finish_reason "stop" (the
    text so far ends with a stop string, which is included) or "length".
    """
    vocab = engine.inst.vocab
    rng = np.random.default_rng(seed)
    keep = max((len(s) for s in stop), default=0)
    logits, state = step(engine, prompt_ids[None, :], engine.zero_states(1))
    tail = ""
    for i in range(max_tokens):
        tok = sample_next(logits[0, -1], temperature, top_k, top_p, rng)
        ch = vocab[tok]
        tail = (tail + ch)[-keep:] if keep else ""
        if any(tail.endswith(s) for s in stop):
            yield GenerateEvent(index=i, token_id=tok, text=ch, finish_reason="stop")
            return
        if i == max_tokens - 1:
            yield GenerateEvent(index=i, token_id=tok, text=ch, finish_reason="length")
            return
        yield GenerateEvent(index=i, token_id=tok, text=ch)
        logits, state = step(engine, np.array([[tok]], np.int64), state)


def score(engine: ModelEngine, ids: np.ndarray) -> tuple[int, float]:
    """(characters scored, total log-likelihood in nats) of ids[1:] given each prefix; one run."""
    logits = engine.run({INPUT_TOKENS: ids[None, :]}, engine.zero_states(1), need_state=False)[OUTPUT_LOGITS][0]
    logp = log_softmax(logits[:-1])
    n = len(ids) - 1
    ll = float(logp[np.arange(n), ids[1:]].sum())
    return n, ll


def per_char(n: int, ll: float) -> tuple[float, float]:
    """(nats/char, bits/char) of a total log-likelihood over n characters."""
    nats = -ll / n
    return nats, nats / math.log(2)
