"""`rnnserve-export batch`: every checkpoint found -> REPO/<model>/<version>/ behind the parity gate.

Per checkpoint (model name = its folder's name, or the file's stem with --name-from file):
  unchanged sha256 (vs the newest published version)  -> skipped
  otherwise  export_checkpoint (the parity gate) into staging -> version newest+1, published
             atomically with config.pbtxt and a manifest.json entry (see export/publish.py)
  variants   REPO/<model>-<variant>/<version>/ (version = the base version it derives from,
             or later if that number is taken), each measured and accepted or refused
             (export/variants.py); refused ones are reported, not published
  --keep N   then keeps the newest N versions of the model and of each of its variants.
A failing checkpoint never stops the others; the run then exits 1 and lists the failures.
"""
from __future__ import annotations

import glob
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from rnnserve.contract import DIM_BATCH, DIM_SEQ, INPUT_TOKENS, MODEL_FILENAME, OUTPUT_LOGITS, ModelMeta, parse_metadata
from rnnserve.export.forecast_variant import DEFAULT_MAX_MAE_CHANGE, load_test_series, value_pair
from rnnserve.export.int8 import DEFAULT_INT8, INT8_OPTIONS
from rnnserve.export.onnx_export import DEFAULT_OPSET, export_checkpoint
from rnnserve.export.parity import DEFAULT_TRAIN_SEQ_LEN
from rnnserve.export.publish import RepoWriter, sanitize_name
from rnnserve.export.tolerance import ATOL, RTOL, Tolerance
from rnnserve.export.tritonconfig import DEFAULT_MAX_BATCH_SIZE, triton_config
from rnnserve.export.variants import (
    DEFAULT_MIN_AGREEMENT,
    FP16_NOTE,
    load_eval_text,
    make_variant,
    percent_pair,
    variant_session,
)
from rnnserve.files import file_sha256
from rnnserve.train.checkpoint import load_checkpoint, read_checkpoint
from rnnserve.train.forecast_model import is_forecast_checkpoint, load_forecaster

log = logging.getLogger(__name__)

LATENCY_BATCH, LATENCY_SEQ, LATENCY_WARMUP, LATENCY_RUNS = 1, 64, 5, 30
CHECKPOINT_FILENAME = "checkpoint.pt"
_SUMMARY_KEYS = ("top1_agreement", "max_logit_diff", "max_output_diff", "fp32_test_mae", "variant_test_mae",
                 "test_mae_rel_change", "threshold", "eval_text", "eval_data")
Failure = tuple[str, str, str]  # (model, checkpoint, why)


@dataclass
class BatchOptions:
    checkpoints: list[str]
    repository: str
    keep: int | None = None
    variants: list[str] = field(default_factory=list)
    name_from: str = "dir"
    eval_text: str | None = None
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    max_mae_change: float = DEFAULT_MAX_MAE_CHANGE
    int8: str = DEFAULT_INT8
    threads: int | None = None
    atol: float = ATOL
    rtol: float = RTOL
    opset: int = DEFAULT_OPSET
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    progress: bool = True


@dataclass
class Row:
    model: str
    status: str                    # new | skipped | failed | refused
    arch: str = ""
    params: int | None = None
    max_diff: float | None = None   # base: parity gate vs PyTorch; variant: max |output diff| vs fp32 (eval data)
    agreement: float | None = None  # variants: top-1 agreement with fp32
    size: int | None = None
    p50_ms: float | None = None
    version: int | None = None
    reason: str = ""
    variant: str = ""
    threshold: float | None = None   # variants: the --min-agreement (forecasters: --max-mae-change) they met
    mae: tuple[float, float] | None = None  # forecaster variants: test-split MAE of fp32 and of the variant


@dataclass
class BatchOutcome:
    rows: list[Row]
    failures: list[Failure]
    pruned: dict[str, list[int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures


def discover(specs: list[str]) -> list[str]:
    """Checkpoint files: a directory -> every **/checkpoint.pt under it; a file; or a glob."""
    found: list[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            hits = glob.glob(os.path.join(glob.escape(spec), "**", CHECKPOINT_FILENAME), recursive=True)
        elif os.path.isfile(spec):
            hits = [spec]
        else:
            hits = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
        if not hits:
            log.warning("no checkpoint matches %s", spec)
        found += [os.path.abspath(p) for p in hits]
    return sorted(set(found))


def plan(paths: list[str], name_from: str, variants: list[str]) -> tuple[list[tuple[str, str]], list[Failure]]:
    """[(model name, checkpoint)] and the failures: names that collide are refused, never guessed."""
    named = [(sanitize_name(os.path.basename(os.path.dirname(p)) if name_from == "dir"
                            else os.path.splitext(os.path.basename(p))[0]), p) for p in paths]
    by_name: dict[str, list[str]] = {}
    for name, p in named:
        by_name.setdefault(name, []).append(p)
    variant_names = {f"{n}-{v}": n for n in by_name for v in variants}
    todo, failed = [], []
    for name, p in named:
        if len(by_name[name]) > 1:
            others = ", ".join(q for q in by_name[name] if q != p)
            failed.append((name, p, f"model name {name!r} also comes from {others}; rename a folder "
                                    f"or use --name-from file"))
        elif name in variant_names:
            failed.append((name, p, f"model name {name!r} is the {name[len(variant_names[name]) + 1:]} "
                                    f"variant name of {variant_names[name]!r}"))
        else:
            todo.append((name, p))
    return todo, failed


def _latency_feeds(meta: ModelMeta) -> tuple[dict[str, np.ndarray], str]:
    """Inputs at batch 1, seq 64 (zero states; random tokens for char models), and the output to fetch."""
    if meta.is_char_model:
        rng = np.random.default_rng(0)
        feeds = {INPUT_TOKENS: rng.integers(0, meta.vocab_size, (LATENCY_BATCH, LATENCY_SEQ), dtype=np.int64),
                 **{n: np.zeros(meta.state_shape(LATENCY_BATCH), np.float32) for n in meta.state_inputs}}
        return feeds, OUTPUT_LOGITS
    spec = meta.spec
    sizes = {DIM_BATCH: LATENCY_BATCH, DIM_SEQ: LATENCY_SEQ}
    feeds = {t.name: np.zeros([sizes.get(d, 1) if isinstance(d, str) else d for d in t.shape], t.dtype)
             for t in spec.inputs}
    feeds.update({s.input: np.zeros(s.concrete_shape(LATENCY_BATCH), s.dtype) for s in spec.states})
    return feeds, spec.outputs[0].name


def measure_latency(path: str, meta: ModelMeta, variant: str = "", threads: int | None = None) -> float:
    """p50 milliseconds of one onnxruntime CPU run at batch 1, seq 64 (zero state), after warm-up."""
    sess = variant_session(path, variant, threads)
    feeds, output = _latency_feeds(meta)
    for _ in range(LATENCY_WARMUP):
        sess.run([output], feeds)
    times = []
    for _ in range(LATENCY_RUNS):
        t0 = time.perf_counter()
        sess.run([output], feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def parity_record(report: dict[str, Any]) -> dict[str, Any]:
    """What the manifest keeps of a gate report (the whole report is parity.json beside the model)."""
    return {"pass": report["pass"], "max_abs_diff": report["max_abs_diff"], "max_rel_diff": report["max_rel_diff"],
            "worst": report["worst"], "atol": report["tolerance"]["atol"], "rtol": report["tolerance"]["rtol"],
            "file": "parity.json"}


def _meta_of(path: str) -> ModelMeta:
    import onnx
    return parse_metadata({p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props})


def _variant_facts(rep: dict[str, Any]) -> dict[str, Any]:
    """A variant report's Row fields (char models: agreement on text; forecasters: test MAE or agreement)."""
    mae = (rep["fp32_test_mae"], rep["variant_test_mae"]) if rep.get("criterion") == "test_mae" else None
    return {"max_diff": rep.get("max_logit_diff", rep.get("max_output_diff")),
            "agreement": rep.get("top1_agreement"), "threshold": rep.get("threshold"), "mae": mae}


def _skipped_row(repo: RepoWriter, name: str) -> Row:
    version = repo.newest(name)
    rec = repo.record(name, version)
    files, vrep = rec.get("files", {}), rec.get("variant_report")
    facts = _variant_facts(vrep) if vrep else {"max_diff": rec.get("parity", {}).get("max_abs_diff")}
    return Row(name, "skipped", rec.get("arch", ""), rec.get("params"), size=files.get(MODEL_FILENAME, {}).get("bytes"),
               p50_ms=rec.get("latency_p50_ms"), version=version, **facts)


class _Job:
    """One checkpoint: base model, then its variants, then pruning."""

    def __init__(self, repo: RepoWriter, opts: BatchOptions, name: str, ckpt: str):
        self.repo, self.opts, self.name, self.ckpt = repo, opts, name, ckpt
        self.sha = file_sha256(ckpt)
        self._loaded: tuple[Any, dict[str, Any]] | None = None
        self.rows: list[Row] = []
        self.failures: list[Failure] = []

    def loaded(self):
        if self._loaded is None:
            is_forecast = is_forecast_checkpoint(read_checkpoint(self.ckpt))
            self._loaded = (load_forecaster if is_forecast else load_checkpoint)(self.ckpt)
        return self._loaded

    def run(self) -> None:
        repo, opts = self.repo, self.opts
        if repo.newest_sha(self.name) == self.sha:
            self.rows.append(_skipped_row(repo, self.name))
            version = repo.newest(self.name)
        else:
            version = self._export_base()
        base_onnx = repo.model_path(self.name, version)
        for variant in opts.variants:
            self._variant(variant, base_onnx, version)
        if opts.keep:
            for n in [self.name] + [f"{self.name}-{v}" for v in opts.variants]:
                repo.prune(n, opts.keep)

    def _export_base(self) -> int:
        repo = self.repo
        version = (repo.newest(self.name) or 0) + 1
        staged = repo.staging_dir(self.name, version)
        try:
            return self._gate_and_publish(staged, version)
        except Exception:
            repo.discard(os.path.dirname(staged))  # nothing half-done stays, even in staging
            raise

    def _gate_and_publish(self, staged: str, version: int) -> int:
        repo, opts = self.repo, self.opts
        res = export_checkpoint(self.ckpt, staged, opset=opts.opset, gate=True, atol=opts.atol,
                                rtol=opts.rtol, threads=opts.threads)
        model, ckpt = self.loaded()
        meta = _meta_of(res.onnx_path)
        p50 = measure_latency(res.onnx_path, meta, threads=opts.threads)
        report = res.parity
        record = {"checkpoint": self.ckpt, "checkpoint_sha256": self.sha, "arch": meta.config.get("arch", ""),
                  "params": model.num_params(), "latency_p50_ms": round(p50, 4),
                  "latency_shape": [LATENCY_BATCH, LATENCY_SEQ],
                  "parity": {**parity_record(report), "cases": len(report["cases"]),
                             "stepwise": len(report["stepwise"])}}
        repo.publish(self.name, version, staged, triton_config(self.name, meta, max_batch_size=opts.max_batch_size),
                     record, {"variant": None, "base_model": None})
        self.rows.append(Row(self.name, "new", meta.config.get("arch", ""), model.num_params(),
                             report["max_abs_diff"], None,
                             os.path.getsize(repo.model_path(self.name, version)), p50, version))
        return version

    def _variant(self, variant: str, base_onnx: str, base_version: int) -> None:
        repo = self.repo
        vname = f"{self.name}-{variant}"
        if not _meta_of(base_onnx).is_char_model and variant != "int8":
            self._fail(vname, f"{variant} variants are built for char models only (forecasters: int8)")
            return
        if repo.newest_sha(vname) == self.sha:
            self.rows.append(_skipped_row(repo, vname))
            return
        version = max(base_version, (repo.newest(vname) or 0) + 1)
        staged = repo.staging_dir(vname, version)
        try:
            self._build_variant(variant, vname, version, staged, base_onnx, base_version)
        except Exception as e:
            repo.discard(os.path.dirname(staged))
            log.debug("variant %s failed", vname, exc_info=True)
            self._fail(vname, f"{type(e).__name__}: {e}")

    def _build_variant(self, variant: str, vname: str, version: int, staged: str, base_onnx: str,
                       base_version: int) -> None:
        repo, opts = self.repo, self.opts
        model, ckpt = self.loaded()
        meta = _meta_of(base_onnx)
        forecaster = not meta.is_char_model
        series = load_test_series(ckpt["train_config"]) if forecaster else None
        text = None if forecaster else load_eval_text(meta, ckpt["train_config"], opts.eval_text)
        seq_len = ckpt["train_config"].get("seq_len")
        result = make_variant(variant, base_onnx, staged, repo.work_dir(vname), model=model,
                              train_seq_len=seq_len if isinstance(seq_len, int) and seq_len > 0
                              else DEFAULT_TRAIN_SEQ_LEN,
                              base_ref=f"{self.name}/{base_version}", text=text,
                              min_agreement=opts.min_agreement, threads=opts.threads,
                              tol=Tolerance(opts.atol, opts.rtol), int8=INT8_OPTIONS[opts.int8],
                              series=series, max_mae_change=opts.max_mae_change)
        rep = result.report
        summary = {"model": vname, "accepted": result.accepted, "reason": result.reason,
                   **{k: rep[k] for k in _SUMMARY_KEYS if k in rep}}
        path = os.path.join(staged, MODEL_FILENAME)
        size, p50 = os.path.getsize(path), measure_latency(path, meta, variant, opts.threads)
        if not result.accepted:  # measured and shown, never published
            repo.discard(os.path.dirname(staged))
            repo.annotate(self.name, base_version, f"variant_{variant}", {**summary, "version": None})
            self.rows.append(Row(vname, "refused", meta.arch, model.num_params(), size=size, p50_ms=p50,
                                 reason=result.reason, variant=variant, **_variant_facts(rep)))
            return
        record = {"checkpoint": self.ckpt, "checkpoint_sha256": self.sha, "arch": meta.config.get("arch", ""),
                  "params": model.num_params(), "latency_p50_ms": round(p50, 4),
                  "latency_shape": [LATENCY_BATCH, LATENCY_SEQ], "variant_report": rep}
        if result.parity is not None:
            record["parity"] = parity_record(result.parity)
        repo.publish(vname, version, staged, triton_config(vname, meta, max_batch_size=opts.max_batch_size,
                                                           variant=variant),
                     record, {"variant": variant, "base_model": self.name})
        repo.annotate(self.name, base_version, f"variant_{variant}", {**summary, "version": version})
        self.rows.append(Row(vname, "new", meta.arch, model.num_params(), size=size, p50_ms=p50, version=version,
                             variant=variant, **_variant_facts(rep)))

    def _fail(self, model: str, why: str) -> None:
        self.failures.append((model, self.ckpt, why))
        self.rows.append(Row(model, "failed", reason=why))


def run_batch(opts: BatchOptions) -> BatchOutcome:
    paths = discover(opts.checkpoints)
    todo, failures = plan(paths, opts.name_from, opts.variants)
    rows = [Row(n, "failed", reason=why) for n, _, why in failures]
    if not paths:
        failures.append(("-", ", ".join(opts.checkpoints), "no checkpoint found"))
        return BatchOutcome(rows, failures)
    with RepoWriter(opts.repository) as repo:
        bar = tqdm(todo, desc="export batch", unit="model", disable=not opts.progress, file=sys.stderr)
        for name, ckpt in bar:
            bar.set_postfix_str(name)
            job = None
            try:
                job = _Job(repo, opts, name, ckpt)
                job.run()
            except Exception as e:  # one model failing never stops the others
                log.debug("model %s failed", name, exc_info=True)
                why = f"{type(e).__name__}: {e}"
                failures.append((name, ckpt, why))
                rows.append(Row(name, "failed", reason=why))
            if job is not None:
                rows += job.rows
                failures += job.failures
    return BatchOutcome(rows, failures)


def _fmt(v: Any, spec: str = "") -> str:
    return "-" if v is None or v == "" else format(v, spec)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def _agreement(r: Row) -> str:
    if r.agreement is None:
        return "-"
    return percent_pair(r.agreement, r.agreement if r.threshold is None else r.threshold)[0]


def _mae(r: Row) -> str:
    """fp32 -> variant test MAE and the relative change, digits as in the refusal's reason."""
    if r.mae is None:
        return "-"
    a, b = value_pair(*r.mae)
    change = (r.mae[1] - r.mae[0]) / r.mae[0] if r.mae[0] else 0.0
    shown = percent_pair(abs(change), abs(change) if r.threshold is None else r.threshold)[0]
    return f"{a} -> {b} ({'+' if change >= 0 else '-'}{shown})"


def format_table(rows: list[Row]) -> str:
    head = ["model", "arch", "params", "parity max diff", "top-1 agree", "test MAE (change)", "onnx size",
            f"p50 ms (b{LATENCY_BATCH} s{LATENCY_SEQ})", "version", "status"]
    body = [[r.model, r.arch or "-", _fmt(r.params, ","), _fmt(r.max_diff, ".2e"),
             _agreement(r), _mae(r), _size(r.size), _fmt(r.p50_ms, ".3f"),
             _fmt(r.version), r.status] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
    out.append("parity max diff: models = the parity gate vs PyTorch; variants = max |output diff| vs the fp32 "
               "model on the eval text (forecasters: test split). top-1 agree: variants vs fp32 on the eval text. "
               "test MAE: a forecaster's int8 variant, fp32 -> int8 on its test split.")
    return "\n".join(out)


def format_report(outcome: BatchOutcome) -> str:
    text = [format_table(outcome.rows)]
    refused = [r for r in outcome.rows if r.status == "refused"]
    if refused:
        text.append("refused variants (not published):")
        text += [f"  {r.model}: {r.reason}" for r in refused]
    if any(r.variant == "fp16" and r.status == "new" for r in outcome.rows):
        text.append(f"note: {FP16_NOTE}")
    if outcome.failures:
        text.append(f"FAILED ({len(outcome.failures)}):")
        text += [f"  {m} [{c}]: {why}" for m, c, why in outcome.failures]
    return "\n".join(text)
