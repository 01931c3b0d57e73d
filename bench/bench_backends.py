"""The two inference backends side by side in one run (a benchmark, not a test).

Starts llama-cpp-python (the project's llmpods_server) and llama-server on the demo model, each behind nginx running
the config that roles/gateway renders for it, then, at 1, 4 and 8 concurrent streams of 128 tokens (greedy, the
end-of-sequence tokens banned so every stream is 128 tokens long), in rounds that alternate which backend goes
first:
  - aggregate tokens per second (all streams' tokens / the time from the first request to the last [DONE]);
  - time to the first token, p50 and p95 over the streams of all rounds;
  - the ratio llama-server / llama-cpp-python (goals at 4 streams: aggregate >= 1.7x, first-token p50 <= 1/10 of
    llama-cpp-python's; at 1 stream: aggregate >= 1.0x);
  - through the gateway / direct to the backend, for each backend at 1 and 4 streams (goal >= 0.97).
Every figure is printed as it is measured.

Only the two servers run during a measurement (one at a time; the other is idle). Timing on a shared machine is
noisy: the ratios come from the same rounds.

Usage: python bench/bench_backends.py [--rounds 3] [--tokens 128] [--parallel 4] [--threads 2] [--model PATH]
       [--llama-server PATH] [--gpu-layers 0] [--no-gateway] [--streams 1,4,8]
--no-gateway measures the backends directly only (a machine without nginx); --gpu-layers -1 puts every layer on the
GPU (both backends).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers.env import DEMO_MODEL, free_port, run_playbook  # noqa: E402
from helpers.gateway import LLAMA_SERVER, MODEL_NAME, Backend, Gateway, write_keys  # noqa: E402
from helpers.sse import stream_events  # noqa: E402

KEY = "sk-llmpods-bench-0123456789abcdef"
BACKENDS = ("llama-cpp-python", "llama-server")
PROMPT = "Once upon a time"
# SmolLM2's end-of-text, im_start and im_end: banned, so that every stream runs to max_tokens.
BANNED = {"0": -100, "1": -100, "2": -100}


def one_stream(port: int, path: str, key: str | None, tokens: int, seed: int) -> dict:
    """One streamed completion: when it was sent, its first token, its end, and how many content chunks."""
    body = {
        "prompt": PROMPT,
        "max_tokens": tokens,
        "temperature": 0,
        "seed": seed,
        "stream": True,
        "logit_bias": BANNED,
    }
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    sent = time.monotonic()
    conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"POST {path}: {resp.status} {resp.read()[:300]!r}")
    first = None
    finish = None
    done = False
    for event in stream_events(iter(resp.readline, b"")):
        if event == "[DONE]":
            done = True
            break
        choices = event.get("choices") or []
        if not choices:
            continue
        if first is None and choices[0].get("text"):
            first = time.monotonic()
        finish = choices[0].get("finish_reason") or finish
    conn.close()
    if not done or finish != "length":
        raise RuntimeError(f"POST {path}: the stream ended without [DONE] or before {tokens} tokens ({finish})")
    return {"sent": sent, "first": first, "ended": time.monotonic()}


def burst(port: int, path: str, key: str | None, streams: int, tokens: int) -> dict:
    """``streams`` streams at once: aggregate tokens/s and each stream's time to first token."""
    results: list[dict] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(streams)

    def run(seed: int) -> None:
        try:
            barrier.wait(60)
            results.append(one_stream(port, path, key, tokens, seed))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    wall = max(r["ended"] for r in results) - min(r["sent"] for r in results)
    return {"tok_s": streams * tokens / wall, "ttft": [r["first"] - r["sent"] for r in results]}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--parallel", type=int, default=4, help="llama-server slots (the chart's default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpu-layers", type=int, default=0)
    parser.add_argument("--streams", default="1,4,8")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--llama-server", type=Path, default=LLAMA_SERVER)
    parser.add_argument("--no-gateway", action="store_true")
    args = parser.parse_args()
    counts = [int(n) for n in args.streams.split(",")]
    if not args.model.exists():
        sys.exit(f"no model at {args.model} (`make model`)")
    if not args.llama_server.exists():
        sys.exit(f"no llama-server at {args.llama_server} (`make dev` takes it out of the CPU image)")

    work = Path(tempfile.mkdtemp(prefix="bench-backends-"))
    servers: dict[str, Backend] = {}
    gateways: dict[str, Gateway] = {}
    layers = str(args.gpu_layers if args.gpu_layers >= 0 else "all")
    try:
        for kind in BACKENDS:
            log = work / f"{kind}.log"
            if kind == "llama-server":
                env = {"LLAMA_ARG_THREADS": str(args.threads), "LLAMA_ARG_N_GPU_LAYERS": layers}
            else:
                env = {"N_THREADS": str(args.threads), "N_GPU_LAYERS": str(args.gpu_layers)}
            servers[kind] = Backend(
                args.model, free_port(), log, kind=kind, parallel=args.parallel, binary=args.llama_server, env=env
            ).start()
        for kind, backend in servers.items():
            backend.wait_ready()
            if args.no_gateway:
                continue
            gateway = Gateway(
                work / f"gw-{kind}", upstream_port=backend.port, listen_port=free_port(), gateway_backend=kind
            )
            write_keys(gateway.keys_file, [KEY])
            gateway.render(run_playbook)
            gateways[kind] = gateway.start()
        print(
            f"demo model {args.model.name}; llama-server slots {args.parallel}; threads {args.threads}; "
            f"GPU layers {layers}; {args.tokens} tokens per stream; {args.rounds} rounds",
            flush=True,
        )

        # Warm-up: one stream each, not counted.
        for backend in servers.values():
            burst(backend.port, "/v1/completions", None, 1, 8)

        modes = ["direct"] if args.no_gateway else ["gateway", "direct"]
        results: dict[tuple[str, str, int], list[dict]] = {}
        for streams in counts:
            for round_no in range(args.rounds):
                order = BACKENDS if round_no % 2 == 0 else BACKENDS[::-1]
                for kind in order:
                    for mode in modes if round_no % 2 == 0 else modes[::-1]:
                        if mode == "direct" and not args.no_gateway and streams == 8:
                            continue  # the gateway's cost is measured at 1 and 4 streams
                        if mode == "gateway":
                            port, path, key = gateways[kind].port, f"/{MODEL_NAME}/v1/completions", KEY
                        else:
                            port, path, key = servers[kind].port, "/v1/completions", None
                        result = burst(port, path, key, streams, args.tokens)
                        results.setdefault((kind, mode, streams), []).append(result)
                        print(
                            f"  {streams} streams, round {round_no + 1}, {kind:16} {mode:7}: "
                            f"{result['tok_s']:7.1f} tok/s, first token p50 {statistics.median(result['ttft']):.3f} s",
                            flush=True,
                        )

            main_mode = modes[0]
            summary = {}
            for kind in BACKENDS:
                runs = results[(kind, main_mode, streams)]
                ttft = [t for r in runs for t in r["ttft"]]
                summary[kind] = {
                    "tok_s": statistics.median(r["tok_s"] for r in runs),
                    "p50": statistics.median(ttft),
                    "p95": pct(ttft, 0.95),
                }
                s = summary[kind]
                print(
                    f"{streams} streams, {kind:16} ({main_mode}): {s['tok_s']:7.1f} tok/s aggregate, "
                    f"first token p50 {s['p50']:.3f} s p95 {s['p95']:.3f} s",
                    flush=True,
                )
            a, b = summary["llama-server"], summary["llama-cpp-python"]
            print(
                f"{streams} streams, llama-server / llama-cpp-python: aggregate {a['tok_s'] / b['tok_s']:.2f}x, "
                f"first token p50 {a['p50'] / b['p50']:.3f}x, p95 {a['p95'] / b['p95']:.3f}x",
                flush=True,
            )
            if not args.no_gateway and streams != 8:
                for kind in BACKENDS:
                    ratios = [
                        g["tok_s"] / d["tok_s"]
                        for g, d in zip(
                            results[(kind, "gateway", streams)], results[(kind, "direct", streams)], strict=True
                        )
                    ]
                    print(
                        f"{streams} streams, {kind:16}: through the gateway / direct "
                        f"{statistics.median(ratios):.3f} (rounds {', '.join(f'{r:.3f}' for r in ratios)})",
                        flush=True,
                    )
    finally:
        for gateway in gateways.values():
            gateway.stop()
        for backend in servers.values():
            backend.kill()
        if os.environ.get("BENCH_KEEP_LOGS"):
            print(f"logs in {work}")


if __name__ == "__main__":
    main()
