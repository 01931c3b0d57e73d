"""Inference image figures, measured side by side in one run (a benchmark, not a test).

- size the runtime image adds over its base image, against a single-stage build of the same target
  (the build stage, compilers and all), and the ratio;
- cold build time (no layer cache) and the time of a rebuild with nothing changed;
- container start until the model is listed on /v1/models;
- generation speed in the container against the same llama-cpp-python on the host (same model,
  threads, prompt, temperature 0, token budget), and the ratio (goal: at least 0.95).

Run from the checkout after `make venv collection model`:  .venv/bin/python bench/bench_image.py [--skip-cold]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODEL = ROOT / ".llmpods" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
VERSION = "0.3.36"
TARGET = "cpu"
IMAGE = f"llmpods/inference-{TARGET}:{VERSION}"
BASE = "debian:bookworm-slim"
CONTEXT = ROOT / ".build" / "inference_image" / "context"
PROMPT = "Once upon a time, in a village at the edge of a great forest,"


def sh(*cmd: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, env=env)


def image_size(ref: str) -> int:
    return int(sh("docker", "image", "inspect", "--format", "{{.Size}}", ref).stdout)


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def apply_role() -> None:
    """Stage the context and build the image the way users do: through the role."""
    play = [
        {
            "name": "Build the inference image",
            "hosts": "localhost",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Build it",
                    "ansible.builtin.include_role": {"name": "llmpods.inference.inference_image"},
                    "vars": {"inference_image_target": TARGET, "inference_image_version": VERSION},
                }
            ],
        }
    ]
    env = dict(os.environ)
    env.update(
        ANSIBLE_COLLECTIONS_PATH=str(ROOT / ".build" / "collections"),
        ANSIBLE_PYTHON_INTERPRETER=sys.executable,
        ANSIBLE_LOCALHOST_WARNING="false",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="false",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as handle:
        yaml.safe_dump(play, handle)
    try:
        proc = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", str(ROOT / "inventory" / "localhost.yml"), handle.name],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        os.unlink(handle.name)
    if proc.returncode != 0:
        sys.exit(f"the role failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def docker_build(tag: str, *, target: str | None = None, nocache: bool = False) -> float:
    """Seconds for a legacy-builder build of the staged context (never pulling)."""
    cmd = ["docker", "build", "--pull=false", "-q", "-f", f"{TARGET}.Dockerfile", "-t", tag]
    cmd += ["--build-arg", f"LLAMA_CPP_PYTHON_VERSION={VERSION}"]
    if target:
        cmd += ["--target", target]
    if nocache:
        cmd.append("--no-cache")
    env = dict(os.environ, DOCKER_BUILDKIT="0")
    start = time.monotonic()
    subprocess.run([*cmd, str(CONTEXT)], check=True, env=env, capture_output=True, text=True)
    return time.monotonic() - start


def container_figures(threads: int, max_tokens: int, runs: int) -> tuple[float, list[float], int]:
    """(seconds from `docker run` to the model listed, tokens/s per run, tokens per run)."""
    port = free_port()
    name = f"llmpods-bench-{port}"
    start = time.monotonic()
    sh(
        "docker", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000",
        "-v", f"{MODEL.parent}:/models:ro", "-e", f"MODEL=/models/{MODEL.name}", "-e", "MODEL_ALIAS=bench",
        "-e", f"N_THREADS={threads}", "-e", "N_CTX=2048", IMAGE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                listed = requests.get(f"{url}/v1/models", timeout=5).json()
                if any(m["id"] == "bench" for m in listed.get("data", [])):
                    break
            except (requests.ConnectionError, json.JSONDecodeError):
                pass
            if time.monotonic() - start > 180:
                sys.exit("the model was not listed within 180 s")
            time.sleep(0.05)
        ready = time.monotonic() - start
        body = {"model": "bench", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
        requests.post(f"{url}/v1/completions", json={**body, "max_tokens": 8}, timeout=300)  # warm-up
        rates, tokens = [], 0
        for _ in range(runs):
            t0 = time.monotonic()
            answer = requests.post(f"{url}/v1/completions", json=body, timeout=300).json()
            elapsed = time.monotonic() - t0
            tokens = answer["usage"]["completion_tokens"]
            rates.append(tokens / elapsed)
        return ready, rates, tokens
    finally:
        sh("docker", "rm", "-f", name, check=False)


def host_figures(threads: int, max_tokens: int, runs: int) -> tuple[list[float], int]:
    import llama_cpp

    llama = llama_cpp.Llama(model_path=str(MODEL), n_ctx=2048, n_threads=threads, verbose=False)
    llama.create_completion(PROMPT, max_tokens=8, temperature=0)  # warm-up
    rates, tokens = [], 0
    for _ in range(runs):
        llama.reset()
        t0 = time.monotonic()
        answer = llama.create_completion(PROMPT, max_tokens=max_tokens, temperature=0)
        elapsed = time.monotonic() - t0
        tokens = answer["usage"]["completion_tokens"]
        rates.append(tokens / elapsed)
    del llama
    return rates, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-cold", action="store_true", help="skip the no-cache build (minutes)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per run")
    parser.add_argument("--runs", type=int, default=3, help="generation runs per side")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="n_threads on both sides")
    args = parser.parse_args()
    if not MODEL.exists():
        sys.exit(f"no demo model at {MODEL}: run `make model` first")

    apply_role()
    single = f"llmpods/inference-{TARGET}:{VERSION}-single-stage"
    cold_tag = f"llmpods/inference-{TARGET}:{VERSION}-bench-cold"
    docker_build(single, target="build")
    base = image_size(BASE)
    runtime_added = image_size(IMAGE) - base
    single_added = image_size(single) - base
    sh("docker", "rmi", single, check=False)

    cold = None
    if not args.skip_cold:
        cold = docker_build(cold_tag, nocache=True)
    warm = docker_build(cold_tag)
    sh("docker", "rmi", cold_tag, check=False)

    ready, box_rates, box_tokens = container_figures(args.threads, args.tokens, args.runs)
    host_rates, host_tokens = host_figures(args.threads, args.tokens, args.runs)
    box, host = statistics.median(box_rates), statistics.median(host_rates)

    rows = [
        ("image", IMAGE, ""),
        ("size added over base, runtime (multi-stage)", mib(runtime_added), ""),
        ("size added over base, single-stage (build stage)", mib(single_added), ""),
        ("  ratio runtime / single-stage", f"{runtime_added / single_added:.2f}", "smaller is better"),
        ("cold build, no cache", f"{cold:.0f} s" if cold is not None else "skipped", ""),
        ("rebuild, nothing changed", f"{warm:.1f} s", ""),
        ("  ratio cold / rebuild", f"{cold / warm:.0f}x" if cold is not None else "-", ""),
        ("container start -> model listed", f"{ready:.1f} s", ""),
        (f"tokens/s in container ({box_tokens} tok, {args.threads} threads)", f"{box:.1f}", str(box_rates)),
        (f"tokens/s on host ({host_tokens} tok, {args.threads} threads)", f"{host:.1f}", str(host_rates)),
        ("  ratio container / host", f"{box / host:.3f}", "goal >= 0.95"),
    ]
    width = max(len(r[0]) for r in rows)
    for label, value, note in rows:
        print(f"{label:<{width}}  {value:>14}  {note}")


if __name__ == "__main__":
    main()
