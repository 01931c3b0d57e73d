"""Inference image figures, measured side by side in one run (a benchmark, not a test).

- size the runtime image adds over its base image, against a single-stage build of the same target
  (the build stage, compilers and all), and the ratio;
- cold build time (no layer cache) and the time of a rebuild with nothing changed;
- container start until the model is listed on /v1/models;
- generation speed in the container against the same llama-cpp-python on the host (same model,
  threads, prompt, temperature 0, token budget), and the ratio (goal: at least 0.95): once through the
  server (the image against the checkout's llmpods_server on the host) and once calling llama_cpp directly.

Run from the checkout after `make venv collection model`:  .venv/bin/python bench/bench_image.py [--skip-cold]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers.env import DEMO_MODEL as MODEL
from helpers.env import LLAMA_CPP_PYTHON_VERSION as VERSION
from helpers.env import ROOT, free_port, run_playbook

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
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as handle:
        yaml.safe_dump(play, handle)
    try:
        result = run_playbook(handle.name)
    finally:
        os.unlink(handle.name)
    if result.rc != 0:
        sys.exit(f"the role failed: {result.failure()}")


def docker_build(tag: str, *, target: str | None = None, nocache: bool = False) -> float:
    """Seconds for a legacy-builder build of the staged context (never pulling)."""
    cmd = ["docker", "build", "--pull=false", "-q", "-f", str(CONTEXT / f"{TARGET}.Dockerfile"), "-t", tag]
    cmd += ["--build-arg", f"LLAMA_CPP_PYTHON_VERSION={VERSION}"]
    if target:
        cmd += ["--target", target]
    if nocache:
        cmd.append("--no-cache")
    env = dict(os.environ, DOCKER_BUILDKIT="0")
    start = time.monotonic()
    subprocess.run([*cmd, str(CONTEXT)], check=True, env=env, capture_output=True, text=True)
    return time.monotonic() - start


def wait_listed(url: str, alias: str, start: float, alive) -> float:
    """Seconds from ``start`` until ``alias`` is listed on ``url``/v1/models."""
    while True:
        try:
            listed = requests.get(f"{url}/v1/models", timeout=5).json()
            if any(m["id"] == alias for m in listed.get("data", [])):
                return time.monotonic() - start
        except (requests.ConnectionError, json.JSONDecodeError):
            pass
        if time.monotonic() - start > 180 or not alive():
            sys.exit(f"{alias} was not listed on {url}")
        time.sleep(0.05)


def speed_figures(threads: int, max_tokens: int, runs: int) -> tuple[float, list[float], list[float], int]:
    """Container start until the model is listed, then tokens/s in the container and on the host.

    Both sides are the same server (llama-cpp-python's app with its own defaults, e.g. logits_all), fed the
    same request over HTTP: the image in Docker, and the checkout's llmpods_server on the venv's
    llama-cpp-python. They take turns, run by run, so that other load on the machine weighs on both alike.
    """
    env = {"MODEL_ALIAS": "bench", "N_THREADS": str(threads), "N_CTX": "2048"}
    port, host_port = free_port(), free_port()
    name = f"llmpods-bench-{port}"
    host_env = dict(
        os.environ, **env, MODEL=str(MODEL), HOST="127.0.0.1", PORT=str(host_port),
        PYTHONPATH=str(ROOT / "files" / "docker"), PYTHONDONTWRITEBYTECODE="1",
    )  # fmt: skip
    host = subprocess.Popen(
        [sys.executable, "-m", "llmpods_server"], env=host_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    flags = [item for key, value in env.items() for item in ("-e", f"{key}={value}")]
    start = time.monotonic()
    sh(
        "docker", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000",
        "-v", f"{MODEL.parent}:/models:ro", "-e", f"MODEL=/models/{MODEL.name}", *flags, IMAGE,
    )  # fmt: skip
    box_url, host_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{host_port}"
    try:

        def box_alive() -> bool:
            return sh("docker", "inspect", "--format", "{{.State.Running}}", name, check=False).stdout.strip() == "true"

        ready = wait_listed(box_url, "bench", start, box_alive)
        wait_listed(host_url, "bench", time.monotonic(), lambda: host.poll() is None)
        body = {"model": "bench", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}

        def rate(url: str) -> tuple[float, int]:
            t0 = time.monotonic()
            answer = requests.post(f"{url}/v1/completions", json=body, timeout=300).json()
            tokens = answer["usage"]["completion_tokens"]
            return tokens / (time.monotonic() - t0), tokens

        rate(box_url)  # warm-up, both sides
        rate(host_url)
        box_rates, host_rates, tokens = [], [], 0
        for _unused in range(runs):
            box_rate, tokens = rate(box_url)
            host_rate, _unused = rate(host_url)
            box_rates.append(box_rate)
            host_rates.append(host_rate)
        return ready, box_rates, host_rates, tokens
    finally:
        sh("docker", "rm", "-f", name, check=False)
        host.terminate()
        host.wait(timeout=30)


# The same generation loop, run by the container's python and by the host's: no server, no HTTP.
LIBRARY_LOOP = """
import sys, time, llama_cpp
model, threads, tokens, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
llama = llama_cpp.Llama(model_path=model, n_ctx=2048, n_threads=threads, logits_all=True, verbose=False)
llama.create_completion(prompt, max_tokens=8, temperature=0)
llama.reset()
start = time.monotonic()
answer = llama.create_completion(prompt, max_tokens=tokens, temperature=0)
print(answer["usage"]["completion_tokens"] / (time.monotonic() - start))
"""


def library_figures(threads: int, max_tokens: int, runs: int) -> tuple[list[float], list[float]]:
    """tokens/s of llama_cpp called directly, in the image and on the host, taking turns."""
    args = [str(threads), str(max_tokens), PROMPT]
    box_cmd = [
        "docker", "run", "--rm", "-v", f"{MODEL.parent}:/models:ro", "--entrypoint", "python3", IMAGE,
        "-c", LIBRARY_LOOP, f"/models/{MODEL.name}", *args,
    ]  # fmt: skip
    host_cmd = [sys.executable, "-c", LIBRARY_LOOP, str(MODEL), *args]
    box, host = [], []
    for _unused in range(runs):
        box.append(float(sh(*box_cmd).stdout.split()[-1]))
        host.append(float(sh(*host_cmd).stdout.split()[-1]))
    return box, host


def _runs(values: list[float]) -> str:
    return "runs: " + " ".join(f"{v:.1f}" for v in values)


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

    ready, box_rates, host_rates, tokens = speed_figures(args.threads, args.tokens, args.runs)
    box, host = statistics.median(box_rates), statistics.median(host_rates)
    ratios = [b / h for b, h in zip(box_rates, host_rates, strict=True)]
    lib_box, lib_host = library_figures(args.threads, args.tokens, args.runs)
    lib_ratios = [b / h for b, h in zip(lib_box, lib_host, strict=True)]

    rows = [
        ("image", IMAGE, ""),
        ("size added over base, runtime (multi-stage)", mib(runtime_added), ""),
        ("size added over base, single-stage (build stage)", mib(single_added), ""),
        ("  ratio runtime / single-stage", f"{runtime_added / single_added:.2f}", "smaller is better"),
        ("cold build, no cache", f"{cold:.0f} s" if cold is not None else "skipped", ""),
        ("rebuild, nothing changed", f"{warm:.1f} s", ""),
        ("  ratio cold / rebuild", f"{cold / warm:.0f}x" if cold is not None else "-", ""),
        ("container start -> model listed", f"{ready:.1f} s", ""),
        (f"tokens/s in container, median ({tokens} tok, {args.threads} threads)", f"{box:.1f}", _runs(box_rates)),
        (f"tokens/s on host, median ({tokens} tok, {args.threads} threads)", f"{host:.1f}", _runs(host_rates)),
        ("  ratio container / host (median of paired runs)", f"{statistics.median(ratios):.3f}", "goal >= 0.95"),
        ("tokens/s, llama_cpp called directly, in the image", f"{statistics.median(lib_box):.1f}", _runs(lib_box)),
        ("tokens/s, llama_cpp called directly, on the host", f"{statistics.median(lib_host):.1f}", _runs(lib_host)),
        ("  ratio image / host (median of paired runs)", f"{statistics.median(lib_ratios):.3f}", "goal >= 0.95"),
    ]
    width = max(len(r[0]) for r in rows)
    for label, value, note in rows:
        print(f"{label:<{width}}  {value:>14}  {note}")


if __name__ == "__main__":
    main()
