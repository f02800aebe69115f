"""The tables bench.bench_batching prints (its measurements in, Markdown tables and goal lines out)."""
from __future__ import annotations

import os

from bench.bench_server import SEQ, VOCAB


def print_report(args, stateless, floor, streaming, local_runs, prefix, load_before) -> None:
    """The three tables and the goal lines, from what bench.bench_batching.main measured."""
    print(f"\nmodel: 2-layer LSTM, vocab {len(VOCAB)}, emb 64, hidden 256; onnxruntime intra-op threads "
          f"{args.threads or 'as the server chooses (its default flags)'}, inter-op 1; --max-queue-delay-us "
          f"{args.max_queue_delay_us}; {os.cpu_count()} CPUs, shared; load average before "
          f"{load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"\n1. stateless: batch 1, seq {SEQ}, {args.seconds:.0f} s each; ratio = req/s / in-process req/s")
    print(f"| {'mode':<18} | {'conc':>4} | {'p50 ms':>7} | {'p99 ms':>7} | {'req/s':>8} | {'ratio':>6} "
          f"| {'rows/run':>8} |")
    print(f"|{'-' * 20}|{'-' * 6}|{'-' * 9}|{'-' * 9}|{'-' * 10}|{'-' * 8}|{'-' * 10}|")
    for c, local, batched, served in stateless:
        modes = [("in-process", local), ("in-process batched", batched), ("server", served)]
        if "lone" in local:
            modes.insert(1, ("in-process, lone", local["lone"]))
        for mode, r in modes:
            rows = f"{r['rows_per_run']:.1f}" if "rows_per_run" in r else (str(c) if r is batched else "1")
            print(f"| {mode:<18} | {c:>4} | {r['p50']:>7.3f} | {r['p99']:>7.3f} | {r['rps']:>8.1f} "
                  f"| {r['rps'] / local['rps']:>5.2f}x | {rows:>8} |")
    print(f"| {'gRPC floor':<18} | {1:>4} | {floor['p50']:>7.3f} | {floor['p99']:>7.3f} | {floor['rps']:>8.1f} "
          f"| {'':>6} | {'0':>8} |")
    print("gRPC floor: bench.floor's server answers a canned response of the same size (no model, "
          "no validation), through the same tritonclient call")
    if any("lone" in local for _, local, _, _ in stateless):
        print("in-process, lone: the loop on a session like the server's for lone runs (--lone-threads, "
              "spinning while it runs); the server runs a concurrency-1 request there")
    for c, local, _, served in stateless:
        if c == 1:
            ok = served["p50"] <= local["p50"] + 0.5
            print(f"goal conc 1: server p50 {served['p50']:.3f} ms <= in-process {local['p50']:.3f} + 0.5 ms: "
                  f"{'met' if ok else 'MISSED'} (server - in-process = {served['p50'] - local['p50']:.3f} ms; "
                  f"the gRPC floor alone is {floor['p50']:.3f} ms)")
            if "lone" in local:
                lone = local["lone"]["p50"]
                print(f"  against the in-process loop on the lone-run threads ({lone:.3f} ms): server - in-process "
                      f"= {served['p50'] - lone:.3f} ms, {'within' if served['p50'] <= lone + 0.5 else 'over'} 0.5 ms")
        else:
            ratio = served["rps"] / local["rps"]
            print(f"goal conc {c}: server {ratio:.2f}x in-process >= 1.0x: {'met' if ratio >= 1.0 else 'MISSED'}")
    total = args.sequences * args.steps
    print(f"\n2. streaming: {args.sequences} sequences x {args.steps} single-token steps = {total} steps; "
          f"ratio = steps/s / the max-batch-1 server's with the same client shape")
    print(f"| {'mode':<48} | {'seconds':>7} | {'steps/s':>8} | {'rows/run':>8} | {'ratio':>6} "
          f"| {'max |dlogit|':>12} | {'client CPU':>10} | {'server CPU':>10} | {'of it, ort':>10} |")
    print(f"|{'-' * 50}|{'-' * 9}|{'-' * 10}|{'-' * 10}|{'-' * 8}|{'-' * 14}|{'-' * 12}|{'-' * 12}|{'-' * 12}|")
    for rows, secs in local_runs:
        label = f"in-process, {rows} row{'s' if rows > 1 else ''} per ort run"
        print(f"| {label:<48} | {secs:>7.2f} | {total / secs:>8.0f} | {rows:>8.1f} | {'':>6} "
              f"| {'reference' if rows > 1 else '':>12} | {'':>10} | {1e3 * secs / total:>10.3f} | {'':>10} |")
    one = {label.split(", ")[-1]: secs for label, secs, *_ in streaming if "max batch 1," in label}
    for label, secs, rows_per_run, diff, client_ms, server_ms, ort_ms in streaming:
        print(f"| {label:<48} | {secs:>7.2f} | {total / secs:>8.0f} | {rows_per_run:>8.1f} "
              f"| {one.get(label.split(', ')[-1], float('nan')) / secs:>5.2f}x | {diff:>12.2e} | {client_ms:>10.3f} "
              f"| {server_ms:>10.3f} | {ort_ms:>10.3f} |")
    print("client/server CPU: CPU ms per step (all threads of the client process / of the server process); "
          "of it, ort: onnxruntime's CPU for the runs the server made (ModelStatistics' runs of each size, "
          "each size timed in this process on the same model)")
    print("gRPC floor: bench.floor's server answers each streamed step at once with a canned answer "
          "(no model, no validation, no sequence state): the front end alone; grpc.aio floor: the same "
          "from a grpc.aio server, rnnserve-server's kind")
    goals_streaming(args, streaming, 1e3 * local_runs[-1][1] / total)
    naive_s, carry_s, diff = prefix
    print(f"\n3. one sequence of n = {args.prefix} tokens, predicted one token at a time, through the server")
    print(f"| {'client':<44} | {'seconds':>7} | {'ratio':>6} |")
    print(f"|{'-' * 46}|{'-' * 9}|{'-' * 8}|")
    print(f"| {'naive: resend the whole prefix (O(n^2) work)':<44} | {naive_s:>7.3f} | {naive_s / carry_s:>5.1f}x |")
    print(f"| {'server-side state: 1 new token per step':<44} | {carry_s:>7.3f} | {1:>5.1f}x |")
    print(f"last logits agree within {diff:.1e}")


def goals_streaming(args, streaming, best_ort_ms: float) -> None:
    """Issue 12's streaming goals, from table 2's rows (best_ort_ms: onnxruntime's ms per step in a
    batch of every sequence, in process: the least the steps can cost it)."""
    total = args.sequences * args.steps
    batched = [r for r in streaming if "max batch 1," not in r[0] and "floor" not in r[0]]
    aio_floor = [r[5] for r in streaming if r[0].startswith("grpc.aio floor")]
    streams = [r for r in batched if r[0].endswith(f"stream x{args.streams}")]
    if streams:
        label, secs, _, _, _, server_ms, ort_ms = streams[0]
        rate, outside = total / secs, server_ms - ort_ms
        print(f"goal: single-sequence requests over {args.streams} streams {rate:.0f} steps/s >= 4500: "
              f"{'met' if rate >= 4500 else 'MISSED'}")
        print(f"goal: server CPU per streamed step outside onnxruntime {outside:.3f} ms "
              f"({server_ms:.3f} - {ort_ms:.3f}) <= 0.12 ms: {'met' if outside <= 0.12 else 'MISSED'}"
              + (f" (the grpc.aio canned floor alone: {aio_floor[0]:.3f} ms)" if aio_floor else ""))
        print(f"  counting onnxruntime at {args.sequences} rows per run instead, the least it could cost: "
              f"{server_ms - best_ort_ms:.3f} ms ({server_ms:.3f} - {best_ort_ms:.3f})")
    many = [r for r in batched if "rows/request" in r[0]]
    if many:
        label, secs, _, diff, *_ = min(many, key=lambda r: r[1])
        rate = total / secs
        ok = rate >= 30000 and diff <= 1e-5
        print(f"goal: many sequences per request ('{label}') {rate:.0f} steps/s >= 30000, exact "
              f"(max |dlogit| {diff:.1e} <= 1e-5): {'met' if ok else 'MISSED'}")
