"""Text on top of a ModelInstance: per-position predictions, sampling, streaming
generation that carries the recurrent state, and scoring.

Inputs arrive validated (serve/validation.py). Probabilities are computed in
float64 from the float32 logits.
"""
from __future__ import annotations

import math
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from export.metadata import INPUT_TOKENS, OUTPUT_LOGITS

from .runtime import ModelInstance
from .types import CharProb, GenerateEvent, PositionPrediction


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


def predict(inst: ModelInstance, ids: np.ndarray, top_k: int) -> Tuple[str, List[PositionPrediction]]:
    """One run over the text; per position the argmax char, its probability and the top_k chars."""
    logits = inst.run({INPUT_TOKENS: ids[None, :]}, [OUTPUT_LOGITS])[OUTPUT_LOGITS][0]
    probs = softmax(logits)
    positions = []
    for t, row in enumerate(probs):
        order = ranked(row)
        best = int(order[0])
        top = [CharProb(inst.vocab[int(i)], float(row[i])) for i in order[:top_k]]
        positions.append(PositionPrediction(index=t, input_char=inst.vocab[int(ids[t])],
                                            char=inst.vocab[best], prob=float(row[best]), top=top))
    return "".join(p.char for p in positions), positions


def _step(inst: ModelInstance, tokens: np.ndarray, state: dict):
    """One run carrying the state: returns (last-position logits, new state feeds)."""
    out = inst.run({INPUT_TOKENS: tokens, **state})
    new_state = {i: out[o] for i, o in inst.state_pairs()}
    return out[OUTPUT_LOGITS][0, -1], new_state


def generate(inst: ModelInstance, prompt_ids: np.ndarray, max_tokens: int, temperature: float,
             top_k: int, top_p: float, seed: Optional[int], stop: Sequence[str]) -> Iterator[GenerateEvent]:
    """Run the prompt once, then one run per new token (state carried): O(1) per token.

    Yields one event per generated character; the last has finish_reason "stop" (the
    text so far ends with a stop string, which is included) or "length".
    """
    rng = np.random.default_rng(seed)
    keep = max((len(s) for s in stop), default=0)
    logits, state = _step(inst, prompt_ids[None, :], {})
    tail = ""
    for i in range(max_tokens):
        tok = sample_next(logits, temperature, top_k, top_p, rng)
        ch = inst.vocab[tok]
        tail = (tail + ch)[-keep:] if keep else ""
        if any(tail.endswith(s) for s in stop):
            yield GenerateEvent(index=i, token_id=tok, text=ch, finish_reason="stop")
            return
        if i == max_tokens - 1:
            yield GenerateEvent(index=i, token_id=tok, text=ch, finish_reason="length")
            return
        yield GenerateEvent(index=i, token_id=tok, text=ch)
        logits, state = _step(inst, np.array([[tok]], np.int64), state)


def score(inst: ModelInstance, ids: np.ndarray) -> Tuple[int, float]:
    """(characters scored, total log-likelihood in nats) of ids[1:] given each prefix; one run."""
    logits = inst.run({INPUT_TOKENS: ids[None, :]}, [OUTPUT_LOGITS])[OUTPUT_LOGITS][0]
    logp = log_softmax(logits[:-1])
    n = len(ids) - 1
    ll = float(logp[np.arange(n), ids[1:]].sum())
    return n, ll


def per_char(n: int, ll: float) -> Tuple[float, float]:
    """(nats/char, bits/char) of a total log-likelihood over n characters."""
    nats = -ll / n
    return nats, nats / math.log(2)
