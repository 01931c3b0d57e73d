"""What the gateway costs, measured side by side in one run (a benchmark, not a test).

Starts llama-cpp-python with the demo model and nginx running the config that roles/gateway renders, plus one
more server in the same nginx (so the same workers, log format and access log): a fixed 401, no check at all.
Then:
  1. GET /v1/models at 8 connections with wrk: requests/s through the gateway / direct (goal >= 0.97)
     and the p99 latency the gateway adds;
  2. rejected requests (401) per second against that bare 401 with the same client, in rounds that alternate
     which side goes first (goal >= 0.8 of it): with a wrong key (the same one each time), with a new wrong key
     on every request (a wrk Lua script), and with no key at all; the ratio is the median of the rounds' ratios;
  3. time to the first streamed token, through the gateway / direct, median of N (goal <= 1.05).

Usage: python bench/bench_gateway.py [--seconds 5] [--rounds 7] [--samples 15] [--model PATH]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers.env import DEMO_MODEL, free_port, run_playbook  # noqa: E402
from helpers.gateway import MODEL_NAME, Backend, Gateway, write_keys  # noqa: E402

KEY = "sk-llmpods-bench-0123456789abcdef"
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


# The body the gateway answers a wrong key with.
UNAUTHORIZED = json.dumps(
    {
        "error": {
            "message": "Invalid or missing API key. Send it as the header: Authorization: Bearer <key>",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    },
    separators=(",", ":"),
)
BARE_401 = """
    # bench_gateway.py: nginx answering a fixed 401, with no check at all.
    server {{
        listen {port} reuseport;
        location / {{
            add_header WWW-Authenticate 'Bearer realm="llmpods"' always;
            return 401 '{body}\\n';
        }}
    }}
"""
# A new wrong key on every request.
RANDOM_KEYS_LUA = """
counter = 0
request = function()
    counter = counter + 1
    return wrk.format(nil, nil, {["Authorization"] = "Bearer sk-wrong-" .. counter .. "-" .. math.random(1000000000)})
end
"""


def add_bare_401(conf: Path, port: int) -> None:
    """A second server in the rendered nginx.conf (inside http, after the gateway's server)."""
    text = conf.read_text().rstrip()
    assert text.endswith("}"), "nginx.conf ends with the http block"
    conf.write_text(text[:-1] + BARE_401.format(port=port, body=UNAUTHORIZED) + "}\n")


def wrk(
    url: str, seconds: int, connections: int, headers: list[str] | None = None, script: Path | None = None
) -> dict[str, float]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for header in headers or []:
        cmd += ["-H", header]
    if script is not None:
        cmd += ["-s", str(script)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return {
        "rps": rps,
        "p99_ms": float(p99.group(1)) * UNITS[p99.group(2)],
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "total": total,
    }


def first_token_ms(port: int, path: str, headers: dict[str, str]) -> float:
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": "Write one word."}],
            "max_tokens": 4,
            "stream": True,
            "temperature": 0,
        }
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    start = time.perf_counter()
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **headers})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    elapsed = None
    while line := resp.readline():
        if line.startswith(b"data: ") and b'"content"' in line and elapsed is None:
            elapsed = (time.perf_counter() - start) * 1e3
    conn.close()
    assert elapsed is not None, "no token streamed"
    return elapsed


def rejections(bare: str, through: str, rounds: int, seconds: int, work: Path) -> dict[str, dict[str, float]]:
    """401s per second, each way of being refused next to the bare 401 with the same client, in alternating order."""
    script = work / "random_keys.lua"
    script.write_text(RANDOM_KEYS_LUA)
    clients: dict[str, dict] = {
        "wrong key": {"headers": ["Authorization: Bearer sk-wrong-0123456789abcdef"]},
        "new wrong key per request": {"script": script},
        "no key": {},
    }
    rps: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    wrk(bare, 2, 32)
    wrk(through, 2, 32)
    for number in range(rounds):
        for name, client in clients.items():
            pair = [("bare", bare), (name, through)]
            measured = {side: wrk(url, seconds, 32, **client) for side, url in pair[:: 1 if number % 2 else -1]}
            assert measured[name]["non2xx"] == measured[name]["total"], (name, measured[name])
            rps.setdefault(f"bare ({name})", []).append(measured["bare"]["rps"])
            rps.setdefault(name, []).append(measured[name]["rps"])
            ratios.setdefault(name, []).append(measured[name]["rps"] / measured["bare"]["rps"])
    return {
        name: {
            "bare": statistics.median(rps[f"bare ({name})"]),
            "rps": statistics.median(rps[name]),
            "ratio": statistics.median(ratios[name]),
            "lowest": min(ratios[name]),
            "highest": max(ratios[name]),
        }
        for name in clients
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5, help="duration of each wrk run")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds of the 401 measurements")
    parser.add_argument("--samples", type=int, default=15, help="first-token samples per side")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool):
            print(f"bench_gateway: {tool} is not installed", file=sys.stderr)
            return 1
    if not args.model.exists():
        print(f"bench_gateway: no model at {args.model} (make model)", file=sys.stderr)
        return 1

    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    backend = Backend(args.model, free_port(), work / "backend.log")
    gateway = Gateway(work / "gateway", upstream_port=backend.port, listen_port=free_port())
    bare_port = free_port()
    write_keys(gateway.keys_file, [KEY, "sk-llmpods-other-key"])
    gateway.render(run_playbook)
    add_bare_401(gateway.config_dir / "nginx.conf", bare_port)
    backend.start()
    try:
        backend.wait_ready()
        gateway.start()
        direct = f"http://127.0.0.1:{backend.port}"
        through = f"http://127.0.0.1:{gateway.port}"
        auth = [f"Authorization: Bearer {KEY}"]

        # Warm both paths, then measure direct and through the gateway back to back.
        wrk(f"{direct}/v1/models", 2, 8)
        wrk(f"{through}/{MODEL_NAME}/v1/models", 2, 8, auth)
        d = wrk(f"{direct}/v1/models", args.seconds, 8)
        g = wrk(f"{through}/{MODEL_NAME}/v1/models", args.seconds, 8, auth)
        assert d["non2xx"] == 0 and g["non2xx"] == 0, (d, g)

        refused = rejections(
            f"http://127.0.0.1:{bare_port}/{MODEL_NAME}/v1/models",
            f"{through}/{MODEL_NAME}/v1/models",
            args.rounds,
            args.seconds,
            work,
        )

        first_direct, first_gateway = [], []
        first_token_ms(backend.port, "/v1/chat/completions", {})
        for _unused in range(args.samples):  # interleaved, so drift hits both sides alike
            first_direct.append(first_token_ms(backend.port, "/v1/chat/completions", {}))
            first_gateway.append(
                first_token_ms(gateway.port, f"/{MODEL_NAME}/v1/chat/completions", {"Authorization": f"Bearer {KEY}"})
            )
    finally:
        gateway.stop()
        backend.kill()
        shutil.rmtree(work, ignore_errors=True)

    med_d, med_g = statistics.median(first_direct), statistics.median(first_gateway)
    rows = [
        (
            "GET /v1/models req/s (8 conns)",
            f"{d['rps']:.0f}",
            f"{g['rps']:.0f}",
            f"{g['rps'] / d['rps']:.3f}",
            ">= 0.97",
        ),
        (
            "GET /v1/models p99 ms",
            f"{d['p99_ms']:.2f}",
            f"{g['p99_ms']:.2f}",
            f"+{g['p99_ms'] - d['p99_ms']:.2f} ms",
            "",
        ),
    ]
    for name, measured in refused.items():
        direct, through = f"{measured['bare']:.0f}", f"{measured['rps']:.0f}"
        ratio = f"{measured['ratio']:.3f} ({measured['lowest']:.2f}-{measured['highest']:.2f})"
        rows.append((f"401 req/s, {name} (32 conns)", direct, through, ratio, ">= 0.8"))
    rows.append(
        (
            f"first token ms, median of {args.samples}",
            f"{med_d:.1f}",
            f"{med_g:.1f}",
            f"{med_g / med_d:.3f}",
            "<= 1.05",
        )
    )
    print(f"\ngateway benchmark ({os.cpu_count()} CPUs, wrk {args.seconds} s per run, {args.rounds} rounds of 401s)")
    print("401 rows: 'direct' is nginx answering a fixed 401 with no check, in the same nginx, to the same client; the")
    print("ratio is the median of the rounds' ratios (lowest-highest in brackets), each round measuring both sides")
    print("back to back, in turns first; the req/s are each side's median.")
    print(f"{'measure':<48}{'direct':>10}{'gateway':>10}{'ratio':>20}{'goal':>10}")
    for row in rows:
        print(f"{row[0]:<48}{row[1]:>10}{row[2]:>10}{row[3]:>20}{row[4]:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
