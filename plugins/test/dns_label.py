# Copyright: llmpods maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

"""The ``dns_label`` test: the collection's naming rules (``plugins/module_utils/_names.py``, their one home) for
roles and playbooks. The test docs live next to this file (``dns_label.yml``)."""

from __future__ import annotations

from ansible.errors import AnsibleError

from ansible_collections.llmpods.inference.plugins.module_utils._names import is_dns_label


def dns_label(value, rule: str | None = None) -> bool:
    """True for a DNS label; with ``rule`` ('model' or 'release'), a DNS-1035 label short enough for that name."""
    try:
        return is_dns_label(value, rule)
    except ValueError as exc:
        raise AnsibleError(f"dns_label: {exc}") from exc


class TestModule:
    def tests(self):
        return {"dns_label": dns_label}
