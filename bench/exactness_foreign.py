"""Exactness of serving recurrent ONNX models that rnnserve did not export (issue 11).

    python -m bench.exactness_foreign [--sequences 4] [--chunks 8]   (repo root)

The four models of tests/foreign_models.py (float features with hidden_in/hidden_out, a chunk
model with a rank-0 INT64 input and a [2, batch, 128] state, a fixed batch of 1, two state
pairs), served from a repository without config.pbtxt and with one, through tritonclient.
Per model, the largest absolute difference of:
  loop    concurrent sequences streamed in chunks vs onnxruntime running the same chunks with
          the state carried by the caller;
  whole   the same chunks vs one onnxruntime run over the whole sequence (causal models);
  alone   a burst of concurrent stateless requests (states sent, all outputs) vs each alone;
and how many rows the server's runs held on average (ModelStatistics).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
from types import SimpleNamespace

import numpy as np
import tritonclient.grpc as tc

from tests.fixtures import serving
from tests.foreign_models import CONFIGS, Reference, build, publish
from tests.serve.test_foreign_models import MODELS, infer, step_inputs, stream, zero_states


def sequences(ctx, model: str, ref: Reference, n: int, chunks: int, rng) -> tuple[float, float]:
    pairs, timed = MODELS[ref.name]
    seqs = [[step_inputs(model, rng, steps=int(rng.integers(1, 6)), sr=8000 if k % 3 == 2 else 16000)
             for _ in range(chunks)] for k in range(n)]
    results: dict[int, list] = {}
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, stream(ctx, model, 1 + k, seqs[k])))
               for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = next(o for o in ref.outputs if o not in {p[1] for p in pairs})
    loop = whole = 0.0
    for k, chunk_list in enumerate(seqs):
        state = zero_states(ref, 1)
        for chunk, got in zip(chunk_list, results[k]):
            want = ref.run({**chunk, **state})
            state = {i: want[o] for i, o in pairs}
            loop = max(loop, max(float(np.abs(got[name] - v).max()) for name, v in want.items()))
        if timed:
            key = next(iter(chunk_list[0]))
            run = ref.run({key: np.concatenate([c[key] for c in chunk_list], axis=1), **zero_states(ref, 1)})
            got = np.concatenate([r[out] for r in results[k]], axis=1)
            whole = max(whole, float(np.abs(got - run[out]).max()))
    return loop, whole if timed else float("nan")


def burst(ctx, model: str, ref: Reference, rng, n: int = 32) -> float:
    feeds = []
    for i in range(n):
        rows = 1 if ref.name == "fixed" else int(rng.integers(1, 3))
        f = step_inputs(model, rng, rows=rows, steps=4, sr=16000 if i % 3 else 8000)
        f.update({k: rng.standard_normal(v.shape).astype(np.float32) for k, v in zero_states(ref, rows).items()})
        feeds.append(f)
    answers: list = [None] * n
    threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, infer(ctx.client, model, feeds[i])))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return max(float(np.abs(answers[i][name] - v).max()) for i in range(n) for name, v in ref.run(feeds[i]).items())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--chunks", type=int, default=8)
    args = p.parse_args(argv)
    root = tempfile.mkdtemp(prefix="rnnserve-foreign-")
    paths = build(root)
    repo = os.path.join(root, "repo")
    for name, path in paths.items():
        publish(repo, name, path)
        publish(repo, f"{name}_cfg", path, CONFIGS[name])
    refs = {name: Reference(path, name) for name, path in paths.items()}
    rng = np.random.default_rng(0)
    print("| model | I/O from | sequences vs onnxruntime loop | chunks vs whole run | batched vs alone | rows/run |")
    print("|" + "---|" * 6)
    with serving(repo) as (_, address):
        ctx = SimpleNamespace(address=address, client=tc.InferenceServerClient(address))
        for name in paths:
            for model in (name, f"{name}_cfg"):
                loop, whole = sequences(ctx, model, refs[name], args.sequences, args.chunks, rng)
                alone = burst(ctx, model, refs[name], rng)
                stats = ctx.client.get_inference_statistics(model).model_stats[0]
                source = "config.pbtxt" if model.endswith("_cfg") else "graph"
                whole_text = f"{whole:.1e}" if whole == whole else "n/a (no time axis)"
                print(f"| {name} | {source} | {loop:.1e} | {whole_text} | {alone:.1e} | "
                      f"{stats.inference_count / max(1, stats.execution_count):.2f} |")
        ctx.client.close()


if __name__ == "__main__":
    main()
