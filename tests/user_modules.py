"""Recurrent modules written the way users write them, for rnnserve.export.module tests
(tests/export/test_module_export.py) and serving (tests/serve/test_forecast_serving.py)."""
from __future__ import annotations

import torch.nn as nn


class GRUTagger(nn.Module):
    """tokens [B, T] -> tags [B, T, 3], with a two-layer head of its own."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.gru = nn.GRU(8, 16, batch_first=True)
        self.head = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3))

    def forward(self, tokens, h0):
        y, hn = self.gru(self.emb(tokens), h0)
        return self.head(y), hn


class LSTMRegressor(nn.Module):
    """x [B, T, 4] -> LayerNorm -> 2-layer LSTM -> y [B, T, 1]."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.lstm = nn.LSTM(4, 10, num_layers=2, batch_first=True)
        self.out = nn.Linear(10, 1)

    def forward(self, x, h0, c0):
        y, (hn, cn) = self.lstm(self.norm(x), (h0, c0))
        return self.out(y), hn, cn


class BiClassifier(nn.Module):
    """tokens [B, T] -> one label per sequence [B, 4]: bidirectional, so stateless."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.rnn = nn.GRU(6, 8, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, tokens):
        y, _ = self.rnn(self.emb(tokens))
        return self.fc(y.mean(dim=1))


class TimeMajor(nn.Module):
    """x [T, B, 3] (batch_first=False) -> y [T, B, 2], state [1, B, 5]."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(3, 5)
        self.fc = nn.Linear(5, 2)

    def forward(self, x, h):
        y, hn = self.rnn(x, h)
        return self.fc(y), hn


class NotCausal(nn.Module):
    """Subtracts the chunk's mean over time: the whole run and a streamed run differ."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(2, 4, batch_first=True)

    def forward(self, x, h0):
        y, hn = self.gru(x - x.mean(dim=1, keepdim=True), h0)
        return y, hn
