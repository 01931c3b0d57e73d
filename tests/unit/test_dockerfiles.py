"""The inference Dockerfiles, read as a builder reads them, and their agreement with the role.

Only the CPU image can be built on a plain Linux host; the CUDA, ROCm and Vulkan files are held to the
same contract here (and by hadolint) so that all four stay one design.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import LLAMA_CPP_PYTHON_VERSION, ROOT, VENV_BIN, need

DOCKER_DIR = ROOT / "files" / "docker"
ROLE = ROOT / "roles" / "inference_image"
TARGETS = ["cpu", "cuda", "rocm", "vulkan"]
ENTRYPOINT = ["python3", "-m", "llmpods_server"]
UID = "10001"


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        return _key_values(self.all("ENV"))

    def args(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for arg in self.all("ARG"):
            name, sep, value = arg.partition("=")
            out[name] = _unquote(value) if sep else None
        return out


@dataclass
class Dockerfile:
    global_args: dict[str, str | None]
    stages: list[Stage]


def _unquote(value: str) -> str:
    parts = shlex.split(value)
    return parts[0] if len(parts) == 1 else value


def _key_values(lines: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines:
        for token in shlex.split(line):
            key, _unused, value = token.partition("=")
            out[key] = value
    return out


def parse(path: Path) -> Dockerfile:
    """Join continuation lines, drop comments, split into the global ARGs and the stages."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"

    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _unused, args = line.partition(" ")
        keyword = keyword.upper()
        args = re.sub(r"\s+", " ", args.strip())
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image=words[0], name=name))
        elif not stages:
            assert keyword == "ARG", f"{path.name}: {keyword} before the first FROM"
            name, sep, value = args.partition("=")
            global_args[name] = _unquote(value) if sep else None
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return Dockerfile(global_args, stages)


def _role_vars() -> dict:
    return yaml.safe_load((ROLE / "vars" / "main.yml").read_text())


@pytest.fixture(scope="module", params=TARGETS)
def target(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def dockerfile(target: str) -> Dockerfile:
    return parse(DOCKER_DIR / f"{target}.Dockerfile")


def test_versions_are_pinned_at_the_top(dockerfile: Dockerfile) -> None:
    args = dockerfile.global_args
    assert args.get("LLAMA_CPP_PYTHON_VERSION") == LLAMA_CPP_PYTHON_VERSION
    bases = {k: v for k, v in args.items() if k.startswith("BASE") and k.endswith("IMAGE")}
    assert bases, "base images are top-of-file ARGs"
    for name, image in bases.items():
        assert image and ":" in image and not image.endswith(":latest"), f"{name}={image} is not pinned to a tag"
    for stage in dockerfile.stages:
        assert stage.image.startswith("${") and stage.image.endswith("}"), "FROM uses the pinned ARG"


def test_multi_stage_build_then_runtime(dockerfile: Dockerfile) -> None:
    assert len(dockerfile.stages) >= 2
    build, runtime = dockerfile.stages[0], dockerfile.stages[-1]
    assert build.name == "build"
    assert runtime.name == "runtime"
    assert any(c.startswith("--from=build /opt/llmpods ") for c in runtime.all("COPY"))
    assert not any("build-essential" in r or "cmake" in r for r in runtime.all("RUN")), "no compilers at run time"


# What each target's build stage must pass to CMake (its GGML backend), and the build argument that picks the GPU
# architectures where the target has one.
GGML_FLAGS = {
    "cpu": ["-DGGML_BLAS=ON", "-DGGML_BLAS_VENDOR=OpenBLAS", "-DGGML_NATIVE=OFF"],
    "cuda": ["-DGGML_CUDA=ON", "-DGGML_NATIVE=OFF"],
    "rocm": ["-DGGML_HIP=ON", "-DGGML_NATIVE=OFF"],
    "vulkan": ["-DGGML_VULKAN=ON", "-DGGML_NATIVE=OFF"],
}
ARCH_ARG = {"cuda": "CMAKE_CUDA_ARCHITECTURES", "rocm": "AMDGPU_TARGETS"}


def test_cmake_flags_are_current_ggml_ones(target: str, dockerfile: Dockerfile) -> None:
    build = dockerfile.stages[0]
    cmake_args = build.args()["CMAKE_ARGS"] or ""
    flags = cmake_args.split()
    for flag in GGML_FLAGS[target]:
        assert flag in flags, f"{flag} missing from CMAKE_ARGS of {target}"
    assert "-DGGML_NATIVE=OFF" in flags, "portable build: no -march=native"
    text = (DOCKER_DIR / f"{target}.Dockerfile").read_text()
    assert not re.search(r"-DLLAMA_[A-Z_]+", text), "legacy LLAMA_* CMake flags are gone upstream"
    assert "CUBLAS" not in text and "HIPBLAS=" not in text
    assert build.env().get("CMAKE_ARGS") == "${CMAKE_ARGS}"
    arch_arg = ARCH_ARG.get(target)
    if arch_arg:
        assert build.args().get(arch_arg), f"{arch_arg} is a build argument with a default"
        assert f"${{{arch_arg}}}" in cmake_args


def test_both_backends_are_built_at_the_pinned_version(dockerfile: Dockerfile) -> None:
    """The wheel and llama-server come from the pinned llama-cpp-python sdist, through the one shared script, with
    the stage's CMAKE_ARGS (in the environment), into the venv the runtime stage copies; the wheel stays in
    /wheels, where `make wheels` takes it for the host."""
    build = dockerfile.stages[0]
    assert "LLAMA_CPP_PYTHON_VERSION" in build.args()
    assert "build-llama-cpp.sh /usr/local/bin/" in build.all("COPY")
    runs = [r for r in build.all("RUN") if "build-llama-cpp.sh" in r]
    assert len(runs) == 1 and runs[0].endswith('build-llama-cpp.sh "${LLAMA_CPP_PYTHON_VERSION}" /opt/llmpods /wheels')
    assert not [r for r in build.all("RUN") if "pip wheel" in r], "llama.cpp is compiled in one step, once"


def test_the_build_script_compiles_llama_cpp_once() -> None:
    """One CMake tree: the wheel's build directory is kept and configured again for llama-server alone, with the
    image's CMAKE_ARGS left as the wheel's build cached them."""
    script = (DOCKER_DIR / "build-llama-cpp.sh").read_text()
    assert '--no-binary=llama-cpp-python --dest "${work}/sdist" "llama-cpp-python==${version}"' in script
    assert '--config-settings=build-dir="${work}/build" "${work}/src"' in script
    assert '"llama-cpp-python[server]==${version}"' in script
    assert 'cmake --build "${work}/build" --target llama-server' in script
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in script, "nothing fetched from outside the package index at build time"


def test_ca_bundle_stays_in_the_build_stage(dockerfile: Dockerfile) -> None:
    build, runtime = dockerfile.stages[0], dockerfile.stages[-1]
    assert build.all("COPY").count("build-ca/ /opt/build-ca/") == 1
    for stage in dockerfile.stages:
        assert "PIP_CERT" not in stage.env(), "PIP_CERT is never baked into an image's environment"
        for copy in stage.all("COPY"):
            assert "/etc/ssl" not in copy, "the image's own CA file is never overwritten"
    assert not any("build-ca" in c for c in runtime.all("COPY"))
    assert "export PIP_CERT=/opt/build-ca/ca-bundle.crt" in " ".join(build.all("RUN"))


def test_runtime_contract(dockerfile: Dockerfile) -> None:
    runtime = dockerfile.stages[-1]
    user = runtime.all("USER")
    assert user == [f"{UID}:{UID}"], "numeric non-root user, so runAsNonRoot can verify it"
    assert json.loads(runtime.all("ENTRYPOINT")[-1]) == ENTRYPOINT, "exec-form entrypoint"
    env = runtime.env()
    assert env["INTERRUPT_REQUESTS"] == "false"
    assert env["HOST"] == "0.0.0.0"
    assert env["PORT"] == "8000"
    assert runtime.all("EXPOSE") == ["8000"]
    assert any(f"--uid {UID}" in r and f"--gid {UID}" in r for r in runtime.all("RUN"))
    labels = _key_values(runtime.all("LABEL"))
    for key in ("title", "description", "version", "source", "licenses"):
        assert f"org.opencontainers.image.{key}" in labels
    assert labels["org.opencontainers.image.version"] == "${LLAMA_CPP_PYTHON_VERSION}"


def test_apt_lists_removed_in_the_same_layer(dockerfile: Dockerfile) -> None:
    for stage in dockerfile.stages:
        for run in stage.all("RUN"):
            if "apt-get install" in run:
                assert "apt-get update" in run and "rm -rf /var/lib/apt/lists/*" in run
                assert "--no-install-recommends" in run


def test_role_targets_match_the_dockerfiles() -> None:
    role_targets = _role_vars()["_inference_image_targets"]
    assert sorted(role_targets) == sorted(TARGETS)
    for target, spec in role_targets.items():
        assert spec["dockerfile"] == f"{target}.Dockerfile"
        assert (DOCKER_DIR / spec["dockerfile"]).is_file()
    specs = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    assert sorted(specs["main"]["options"]["inference_image_target"]["choices"]) == sorted(TARGETS)


def test_argument_specs_mirror_defaults() -> None:
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    options = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    assert list(options) == list(defaults), "argument_specs and defaults list the same keys in the same order"
    for key, value in defaults.items():
        assert options[key].get("default") == value, key
        assert options[key].get("description"), key
    assert defaults["inference_image_version"] == LLAMA_CPP_PYTHON_VERSION


def test_hadolint_clean() -> None:
    hadolint = VENV_BIN / "hadolint"
    need(hadolint.exists(), f"hadolint at {hadolint}")
    files = sorted(str(p) for p in DOCKER_DIR.glob("*.Dockerfile"))
    proc = subprocess.run([str(hadolint), *files], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_client_is_the_tests_pin(dockerfile: Dockerfile) -> None:
    pins = dict(
        line.split("==", 1) for line in (ROOT / "requirements-dev.txt").read_text().splitlines() if "==" in line
    )
    assert dockerfile.global_args.get("PROMETHEUS_CLIENT_VERSION") == pins["prometheus-client"]
    runs = " ".join(dockerfile.stages[0].all("RUN"))
    assert 'pip install "prometheus-client==${PROMETHEUS_CLIENT_VERSION}"' in runs


STRIP_SCRIPT = DOCKER_DIR / "strip-venv.sh"


def test_the_strip_step_is_the_shared_script(dockerfile: Dockerfile) -> None:
    build = dockerfile.stages[0]
    assert "strip-venv.sh /usr/local/bin/" in build.all("COPY")
    runs = build.all("RUN")
    assert runs[-1] == "strip-venv.sh /opt/llmpods", "the build stage ends with the shared strip step"
    install = next(i for i, r in enumerate(runs) if "pip install" in r)
    assert install < len(runs) - 1
    assert not any("site-packages" in r for r in runs), "no copy of the strip step inline"


def fake_venv(root: Path) -> Path:
    """What the wheel install leaves in the venv, in miniature: the package, the CMake tree, pip, library copies."""
    site = root / "lib" / "python3.11" / "site-packages"
    lib = site / "llama_cpp" / "lib"
    lib.mkdir(parents=True)
    for name in ("libllama.so.0.0.7", "libggml-base.so.0.9.4"):
        (lib / name).write_bytes(b"\x7fELF" + name.encode())
        stem = name.split(".so.", maxsplit=1)[0]
        for alias in (f"{stem}.so.0", f"{stem}.so"):
            (lib / alias).write_bytes(b"\x7fELF" + name.encode())  # the wheel copies, it does not link
    (site / "llama_cpp" / "__init__.py").write_text("")
    for junk in ("lib/cmake", "include", "pip", "pip-24.2.dist-info", "setuptools", "setuptools-75.dist-info"):
        (site / junk).mkdir(parents=True)
    (site / "_distutils_hack").mkdir()
    (site / "distutils-precedence.pth").write_text("")
    (root / "bin").mkdir()
    for name in ("pip", "pip3", "python3"):
        (root / "bin" / name).write_text("")
    return site


def test_strip_script_keeps_what_the_server_imports(tmp_path: Path) -> None:
    site = fake_venv(tmp_path)
    proc = subprocess.run(["bash", str(STRIP_SCRIPT), str(tmp_path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in site.iterdir()) == ["llama_cpp"]
    assert sorted(p.name for p in (tmp_path / "bin").iterdir()) == ["python3"]
    lib = site / "llama_cpp" / "lib"
    for stem, real in (("libllama", "libllama.so.0.0.7"), ("libggml-base", "libggml-base.so.0.9.4")):
        assert (lib / real).is_file() and not (lib / real).is_symlink()
        for alias in (f"{stem}.so.0", f"{stem}.so"):
            assert (lib / alias).is_symlink() and (lib / alias).readlink() == Path(real), alias


def test_strip_script_refuses_a_venv_without_llama_cpp(tmp_path: Path) -> None:
    (tmp_path / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    proc = subprocess.run(["bash", str(STRIP_SCRIPT), str(tmp_path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "no llama_cpp" in proc.stderr
    assert (tmp_path / "lib" / "python3.11" / "site-packages").is_dir(), "nothing removed"
