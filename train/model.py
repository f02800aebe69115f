"""The rnnserve model family: one config dataclass, one nn.Module.

Every model maps int64 token ids [batch, seq] to logits [batch, seq, vocab]
and, when it is unidirectional, carries a recurrent state between calls, so a
sequence can be fed chunk by chunk.  The lecture notes' five models are
presets (see PRESETS).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from rnnserve.contract import ARCHS, state_shape

ENCODINGS = ("onehot", "embedding")

# State: h for rnncell/rnn/gru, (h, c) for lstm; h and c are [layers*dirs, batch, hidden].
State = tuple[torch.Tensor, ...] | None


@dataclass
class ModelConfig:
    arch: str = "lstm"
    vocab_size: int = 4
    encoding: str = "embedding"
    emb_size: int = 10
    hidden_size: int = 8
    num_layers: int = 1
    # Training only: between stacked layers (inside nn.RNN/LSTM/GRU) and on the
    # last layer's output before the Linear head.  Identity in eval mode/export.
    dropout: float = 0.0
    bidirectional: bool = False
    # head=False: the hidden state itself is the output (the notes' rnncell/rnn
    # models); needs hidden_size == vocab_size and one direction.
    head: bool = True

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if self.vocab_size < 1 or self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError("vocab_size, hidden_size and num_layers must be >= 1")
        if self.arch == "rnncell" and (self.num_layers != 1 or self.bidirectional):
            raise ValueError("rnncell is a single unidirectional cell: num_layers=1, bidirectional=False")
        if not self.head and (self.hidden_size != self.vocab_size or self.bidirectional):
            raise ValueError("head=False needs hidden_size == vocab_size and a unidirectional model")

    @property
    def input_size(self) -> int:
        return self.vocab_size if self.encoding == "onehot" else self.emb_size

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def streamable(self) -> bool:
        """Unidirectional models can carry their state across chunks."""
        return not self.bidirectional

    def state_shape(self, batch: int) -> tuple[int, int, int]:
        return state_shape(self.num_layers, self.num_directions, batch, self.hidden_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


def preset(name: str, vocab_size: int = 4) -> ModelConfig:
    """The lecture notes' five models (vocab 4 for the hello task)."""
    v = vocab_size
    table = {
        # 1. a loop over nn.RNNCell, one-hot in, hidden 4 = the 4 classes out.
        "rnncell": dict(arch="rnncell", encoding="onehot", hidden_size=v, head=False),
        # 2. nn.RNN, one-hot, one layer, hidden = classes.
        "rnn": dict(arch="rnn", encoding="onehot", hidden_size=v, num_layers=1, head=False),
        # 3.-5. Embedding(10) -> RNN/LSTM/GRU(hidden 8, 2 layers, batch_first) -> Linear.
        "emb-rnn": dict(arch="rnn", encoding="embedding", emb_size=10, hidden_size=8, num_layers=2),
        "emb-lstm": dict(arch="lstm", encoding="embedding", emb_size=10, hidden_size=8, num_layers=2),
        "emb-gru": dict(arch="gru", encoding="embedding", emb_size=10, hidden_size=8, num_layers=2),
    }
    if name not in table:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(table)}")
    return ModelConfig(vocab_size=v, **table[name])


PRESET_NAMES = ("rnncell", "rnn", "emb-rnn", "emb-lstm", "emb-gru")


class CharRNN(nn.Module):
    """tokens [B, T] -> logits [B, T, V] (+ final state), batch_first throughout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.encoding == "embedding":
            self.emb = nn.Embedding(cfg.vocab_size, cfg.emb_size)
        if cfg.arch == "rnncell":
            self.cell = nn.RNNCell(cfg.input_size, cfg.hidden_size)
        else:
            rnn_cls = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cfg.arch]
            self.rnn = rnn_cls(
                cfg.input_size,
                cfg.hidden_size,
                num_layers=cfg.num_layers,
                batch_first=True,
                dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
                bidirectional=cfg.bidirectional,
            )
        if cfg.head:
            # No parameters: the state dict is the same with or without it.
            self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
            self.fc = nn.Linear(cfg.hidden_size * cfg.num_directions, cfg.vocab_size)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cfg.encoding == "embedding":
            return self.emb(tokens)
        return F.one_hot(tokens, self.cfg.vocab_size).to(torch.float32)

    def forward(self, tokens: torch.Tensor, state: State = None):
        x = self.encode(tokens)
        if self.cfg.arch == "rnncell":
            # The notes' loop: one RNNCell step per time step, hidden carried.
            h = state[0][0] if state is not None else x.new_zeros(x.shape[0], self.cfg.hidden_size)
            outs = []
            for t in range(x.shape[1]):
                h = self.cell(x[:, t], h)
                outs.append(h)
            y = torch.stack(outs, dim=1)
            new_state: tuple[torch.Tensor, ...] = (h.unsqueeze(0),)
        elif self.cfg.arch == "lstm":
            y, (h, c) = self.rnn(x, tuple(state) if state is not None else None)
            new_state = (h, c)
        else:
            y, h = self.rnn(x, state[0] if state is not None else None)
            new_state = (h,)
        logits = self.fc(self.drop(y)) if self.cfg.head else y
        return logits, new_state

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
