"""Task charlm: next-character prediction on a UTF-8 text file.

Training reads random windows of seq_len + 1 chars from the first 90% of the
text; validation is the last 10%, measured with train.evaluate.evaluate_windows
(consecutive windows, state reset per window).  Periodic evaluations use
`eval_windows` windows spread over the split (cheap); the final one uses the
whole split.

Files in the output directory:
    checkpoint.pt   the best model so far (by validation loss)
    last.pt         the latest model + optimizer, schedule and RNG state (--resume)
    metrics.jsonl   one JSON object per train-log / eval / final event
    loss.png        train and validation curves

The learning rate warms up linearly, then follows a cosine to lr * min_lr_ratio.
Progress along the cosine is max(step / max_steps, elapsed / budget), so a
time-budgeted run ends its decay when the budget is spent.  On --resume,
time_budget is the time for this run: the budget becomes the time already spent
plus time_budget (so a finished run can be continued); max_steps stays a total.

SIGINT or SIGTERM stops after the current step: last.pt and loss.png are saved
and TrainingInterrupted is raised (train/stopping.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from rnnserve.train.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from rnnserve.train.data import CharData, random_windows
from rnnserve.train.evaluate import evaluate_windows, to_bits
from rnnserve.train.model import CharRNN, ModelConfig
from rnnserve.train.plot import plot_losses
from rnnserve.train.stopping import StopRequest, TrainingInterrupted, stop_on_signals
from rnnserve.train.threads import ThreadTuner

log = logging.getLogger(__name__)

# The char-LM presets (vocab_size comes from the corpus), picked by 10-minute
# pilot runs on tinyshakespeare on a shared 2-core CPU (bench/quality.py): a
# 2x512 LSTM with bf16 autocast reaches ~1500-1800 steps of 64x128 chars there
# (about 10-12 epochs) when the CPU is not contended, and overfits: with dropout
# 0.15 its validation loss turned up after step 1000 (best 1.469); with 0.3 it
# kept improving (1.440).
CHAR_PRESETS: dict[str, dict[str, Any]] = {
    name: dict(arch=arch, encoding="embedding", emb_size=64, hidden_size=512, num_layers=2, dropout=0.3)
    for name, arch in (("char-lstm", "lstm"), ("char-gru", "gru"), ("char-rnn", "rnn"))
}
CHAR_PRESET_NAMES = tuple(CHAR_PRESETS)
# Model fields that command-line flags may override.
MODEL_OVERRIDES = ("arch", "encoding", "emb_size", "hidden_size", "num_layers", "dropout", "bidirectional")
DEFAULT_MAX_STEPS = 3000  # used when neither max_steps nor time_budget is given
# The first EARLY_LOG_INTERVALS * log_interval steps, where the loss falls fastest, are logged
# EARLY_LOG_INTERVALS times as often, so the curve of a short run has a shape.
EARLY_LOG_INTERVALS = 5
THREAD_PROBE_FRACTION = 0.05  # of the time budget, at most, for timing thread counts that lose


@dataclass
class TrainConfig:
    corpus: str
    out: str
    model: str = "char-lstm"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 128
    batch_size: int = 64
    lr: float = 4e-3
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    beta2: float = 0.99
    warmup: int = 100
    grad_clip: float = 1.0
    max_steps: int | None = None
    time_budget: float | None = None  # minutes
    eval_interval: int = 250
    eval_windows: int = 128  # periodic evaluation on N windows spread over the split
    eval_window: int = 256
    log_interval: int = 20
    seed: int = 1337
    threads: int = 0  # 0: auto, the faster of 1 and all cores, re-timed as the load changes
    bf16: bool = True  # bfloat16 autocast for the forward/backward (params stay float32)
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.model not in CHAR_PRESETS:
            raise ValueError(f"unknown charlm model {self.model!r}; choose from {CHAR_PRESET_NAMES}")
        unknown = set(self.model_overrides) - set(MODEL_OVERRIDES)
        if unknown:
            raise ValueError(f"unknown model overrides: {sorted(unknown)}")
        if self.max_steps is None and not self.time_budget:
            self.max_steps = DEFAULT_MAX_STEPS
        for name in ("seq_len", "batch_size", "eval_interval", "eval_window", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), task="charlm")

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, **{**CHAR_PRESETS[self.model], **self.model_overrides})


@dataclass
class CharLMResult:
    model: CharRNN
    ckpt_path: str
    step: int
    best_val_nats: float
    final_val_nats: float  # the best checkpoint over the whole validation split
    elapsed_s: float


class Schedule:
    """Linear warm-up, then cosine decay by step or by elapsed time, whichever is further.

    `prior_elapsed` is the time spent before a resume: the time budget adds to it."""

    def __init__(self, cfg: TrainConfig, prior_elapsed: float = 0.0):
        self.cfg = cfg
        self.budget_s = prior_elapsed + cfg.time_budget * 60.0 if cfg.time_budget else None

    def progress(self, step: int, elapsed: float) -> float:
        p = 0.0
        if self.cfg.max_steps:
            p = max(p, step / self.cfg.max_steps)
        if self.budget_s:
            p = max(p, elapsed / self.budget_s)
        return min(p, 1.0)

    def lr(self, step: int, elapsed: float) -> float:
        c = self.cfg
        if step < c.warmup:
            return c.lr * (step + 1) / c.warmup
        cos = 0.5 * (1.0 + math.cos(math.pi * self.progress(step, elapsed)))
        return c.lr * (c.min_lr_ratio + (1.0 - c.min_lr_ratio) * cos)

    def done(self, step: int, elapsed: float) -> bool:
        return self.progress(step, elapsed) >= 1.0


def _optimizer(model: CharRNN, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Weight decay on weight matrices only, not on biases or the embedding.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.startswith("emb.") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2))


class MetricsLog:
    """metrics.jsonl: appended one event per line; on resume, events past the resumed step are dropped."""

    def __init__(self, path: str, resume_step: int | None):
        self.path = path
        if resume_step is None:
            open(path, "w").close()
        else:
            kept = [e for e in self.read() if e.get("step", 0) <= resume_step]
            with open(path, "w") as f:
                f.writelines(json.dumps(e) + "\n" for e in kept)

    def read(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def write(self, event: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")


def _resume_state(cfg: TrainConfig, model: CharRNN, opt, gen: torch.Generator) -> dict[str, Any]:
    path = os.path.join(cfg.out, "last.pt")
    ckpt = read_checkpoint(path)
    if "train_state" not in ckpt or "optimizer" not in ckpt:
        raise CheckpointError(f"{path} has no training state to resume from")
    saved_cfg = ModelConfig.from_dict(ckpt["model_config"])
    if saved_cfg != model.cfg:
        raise CheckpointError(f"{path} was trained with a different model: {saved_cfg} != {model.cfg}")
    model.load_state_dict(ckpt["state_dict"])
    opt.load_state_dict(ckpt["optimizer"])
    st = ckpt["train_state"]
    torch.set_rng_state(st["torch_rng"])
    gen.set_state(st["data_rng"])
    log.info("resumed from %s at step %d (%.0f s elapsed)", path, st["step"], st["elapsed"])
    return st


def _metrics(step: int, best: float, elapsed: float, train_loss: float | None) -> dict[str, Any]:
    return {"step": step, "best_val_nats": best, "best_val_bits": to_bits(best),
            "elapsed_s": elapsed, "train_loss": train_loss}


def _bar(cfg: TrainConfig, sched: Schedule, step: int, elapsed: float) -> tqdm:
    """Progress in percent of the run (by steps or by the time budget, whichever is further), so the bar
    has a total and an ETA either way; the step, loss and best validation loss ride in the postfix."""
    return tqdm(total=100.0, initial=100.0 * sched.progress(step, elapsed), disable=not cfg.progress,
                dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}{postfix}]")


def _plot(cfg: TrainConfig, model: CharRNN, mlog: MetricsLog, step: int, elapsed: float) -> None:
    m = model.cfg
    title = (f"{cfg.model} ({m.arch} {m.num_layers}x{m.hidden_size}, {model.num_params() / 1e6:.2f}M params): "
             f"{step} steps, {elapsed / 60:.1f} min")
    plot_losses(mlog.read(), os.path.join(cfg.out, "loss.png"), title=title)


def train_charlm(cfg: TrainConfig) -> CharLMResult:
    """Train; raises TrainingInterrupted on SIGINT/SIGTERM (after saving last.pt and loss.png)."""
    with stop_on_signals() as stop:
        return _train(cfg, stop)


def _train(cfg: TrainConfig, stop: StopRequest) -> CharLMResult:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = CharData.from_file(cfg.corpus, min_window=cfg.seq_len)
    model = CharRNN(cfg.model_config(len(data.vocab)))
    opt = _optimizer(model, cfg)
    os.makedirs(cfg.out, exist_ok=True)
    best_path, last_path = os.path.join(cfg.out, "checkpoint.pt"), os.path.join(cfg.out, "last.pt")

    step, prior_elapsed, best = 0, 0.0, float("inf")
    if cfg.resume:
        st = _resume_state(cfg, model, opt, gen)
        step, prior_elapsed, best = st["step"], st["elapsed"], st["best_val_nats"]
    sched = Schedule(cfg, prior_elapsed)
    if cfg.resume and sched.done(step, prior_elapsed):
        log.warning("nothing to train: step %d already reached --max-steps %s; raise --max-steps or give "
                    "--time-budget MINUTES (on --resume: the time for this run)", step, cfg.max_steps)
    tuner = ThreadTuner(max_probe_s=THREAD_PROBE_FRACTION * sched.budget_s if sched.budget_s else None) \
        if cfg.threads == 0 else None
    mlog = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"), step if cfg.resume else None)
    log.info("model %s: %s, %d params", cfg.model, model.cfg, model.num_params())

    t0 = time.perf_counter()

    def elapsed() -> float:
        return prior_elapsed + time.perf_counter() - t0

    def evaluate(n_windows: int | None, bf16: bool) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return evaluate_windows(model, data.val, window=cfg.eval_window, max_windows=n_windows)

    def save(path: str, train_loss: float | None, with_state: bool) -> None:
        extra = None
        if with_state:
            extra = {"optimizer": opt.state_dict(),
                     "train_state": {"step": step, "elapsed": elapsed(), "best_val_nats": best,
                                     "torch_rng": torch.get_rng_state(), "data_rng": gen.get_state()}}
        save_checkpoint(path, model, data.vocab, cfg.to_dict(), _metrics(step, best, elapsed(), train_loss),
                        extra=extra)

    def eval_and_save(train_loss: float | None) -> None:
        nonlocal best
        val = evaluate(cfg.eval_windows, cfg.bf16)
        event = {"event": "eval", "step": step, "val_nats": val, "val_bits": to_bits(val),
                 "elapsed_s": elapsed(), "eval_windows": cfg.eval_windows}
        if val < best:
            best = val
            save(best_path, train_loss, with_state=False)
            event["best"] = True
        mlog.write(event)
        save(last_path, train_loss, with_state=True)
        log.info("step %d: val %.4f nats/char (%.4f bits), best %.4f", step, val, to_bits(val), best)

    def show(bar: tqdm) -> None:
        bar.update(100.0 * sched.progress(step, elapsed()) - bar.n)
        text = f"step {step}"
        if last_loss is not None:
            text += f", loss {last_loss:.3f}"
        if best < float("inf"):
            text += f", best_val {best:.3f}"
        bar.set_postfix_str(text, refresh=False)

    model.train()
    bar = _bar(cfg, sched, step, prior_elapsed)
    loss_sum, loss_n, last_loss, t_log = 0.0, 0, None, time.perf_counter()
    while not stop and not sched.done(step, elapsed()):
        if tuner:
            tuner.start_step()
        lr = sched.lr(step, elapsed())
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = random_windows(data.train, cfg.seq_len, cfg.batch_size, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            logits, _ = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if tuner:
            tuner.end_step()
        step += 1
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        if step % cfg.log_interval == 0 or (step <= EARLY_LOG_INTERVALS * cfg.log_interval
                                            and step % max(1, cfg.log_interval // EARLY_LOG_INTERVALS) == 0):
            last_loss = loss_sum / loss_n
            now = time.perf_counter()
            mlog.write({"event": "train", "step": step, "loss": last_loss, "lr": lr, "elapsed_s": elapsed(),
                        "tokens_per_s": loss_n * cfg.batch_size * cfg.seq_len / (now - t_log),
                        "threads": torch.get_num_threads()})
            loss_sum, loss_n, t_log = 0.0, 0, now
        if step % cfg.eval_interval == 0:
            eval_and_save(last_loss)
        show(bar)
    bar.close()
    if loss_n:
        last_loss = loss_sum / loss_n
        mlog.write({"event": "train", "step": step, "loss": last_loss, "elapsed_s": elapsed(),
                    "threads": torch.get_num_threads()})
    if stop:
        save(last_path, last_loss, with_state=True)
        mlog.write({"event": "interrupted", "step": step, "elapsed_s": elapsed(), "signal": stop.signame})
        _plot(cfg, model, mlog, step, elapsed())
        raise TrainingInterrupted(stop.signame, step, elapsed(), sched.budget_s)
    if step % cfg.eval_interval != 0 or not os.path.exists(best_path):
        eval_and_save(last_loss)
    train_elapsed = elapsed()

    # The best checkpoint over the whole validation split, in float32 as it will be served.
    ckpt = read_checkpoint(best_path)
    model.load_state_dict(ckpt["state_dict"])
    full = evaluate(None, bf16=False)
    metrics = dict(ckpt["metrics"], val_full_nats=full, val_full_bits=to_bits(full),
                   eval_window=cfg.eval_window, num_params=model.num_params())
    save_checkpoint(best_path, model, data.vocab, cfg.to_dict(), metrics)
    mlog.write({"event": "final", "step": step, "checkpoint_step": metrics["step"], "val_full_nats": full,
                "val_full_bits": to_bits(full), "elapsed_s": train_elapsed})
    _plot(cfg, model, mlog, step, train_elapsed)
    log.info("done: %d steps in %.0f s; best checkpoint (step %d) %.4f nats/char, %.4f bits/char over "
             "the whole validation split -> %s", step, train_elapsed, metrics["step"], full, to_bits(full),
             best_path)
    model.eval()
    return CharLMResult(model=model, ckpt_path=best_path, step=step, best_val_nats=best,
                        final_val_nats=full, elapsed_s=train_elapsed)
