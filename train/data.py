"""Character data for the charlm task: corpus, vocabulary, split and random windows."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

VAL_FRACTION = 0.1  # the last 10% of the text, the usual char-LM split


class CorpusError(Exception):
    """The corpus file is missing, not UTF-8, or too small to train on."""


def read_corpus(path: str) -> str:
    if not os.path.isfile(path):
        raise CorpusError(f"corpus not found: {path}; give a UTF-8 text file (e.g. ../shared/data/tinyshakespeare.txt)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus {path} is not UTF-8 text ({e}); give a UTF-8 text file") from e
    return text


def build_vocab(text: str) -> list[str]:
    """Sorted unique characters; index = token id."""
    return sorted(set(text))


def encode(text: str, vocab: list[str]) -> torch.Tensor:
    stoi = {c: i for i, c in enumerate(vocab)}
    try:
        return torch.tensor([stoi[c] for c in text], dtype=torch.long)
    except KeyError as e:
        raise CorpusError(f"character {e.args[0]!r} is not in the vocabulary") from e


def split_ids(ids: torch.Tensor, val_fraction: float = VAL_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """The first (1 - val_fraction) for training, the last val_fraction for validation."""
    n_val = int(len(ids) * val_fraction)
    return ids[: len(ids) - n_val], ids[len(ids) - n_val:]


@dataclass
class CharData:
    vocab: list[str]
    train: torch.Tensor  # int64 ids
    val: torch.Tensor

    @classmethod
    def from_file(cls, path: str, min_window: int = 2) -> CharData:
        text = read_corpus(path)
        vocab = build_vocab(text)
        train, val = split_ids(encode(text, vocab))
        if len(train) < min_window + 1 or len(val) < 2:
            raise CorpusError(f"corpus {path} is too small ({len(text)} chars) for windows of "
                              f"{min_window} chars and a 10% validation split")
        log.info("corpus %s: %d chars, vocab %d, train %d, val %d",
                 path, len(text), len(vocab), len(train), len(val))
        return cls(vocab=vocab, train=train, val=val)


def random_windows(ids: torch.Tensor, seq_len: int, batch_size: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random windows of seq_len + 1 chars: (inputs, targets), both [B, seq_len]."""
    if len(ids) < seq_len + 1:
        raise ValueError(f"need at least {seq_len + 1} ids for seq_len {seq_len}, have {len(ids)}")
    starts = torch.randint(0, len(ids) - seq_len, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len + 1)
    windows = ids[starts[:, None] + offsets[None, :]]
    return windows[:, :-1], windows[:, 1:]
