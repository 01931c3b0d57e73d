# Copyright: llmpods maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

"""The one home of the DNS-label rule (RFC 1123 label) for the collection's roles and playbooks.

A model name is the URL prefix, the release name suffix and the pod name, so it must be a DNS label. The chart's
values.schema.json keeps its own copy (the chart is used without Ansible) and the model_ready module keeps one
(a module cannot call a test plugin). The test docs live next to this file (``dns_label.yml``).
"""

from __future__ import annotations

import re

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def dns_label(value) -> bool:
    """True for a string of at most 63 lower-case letters, digits and '-', starting and ending alphanumeric."""
    return isinstance(value, str) and DNS_LABEL.fullmatch(value) is not None


class TestModule:
    def tests(self):
        return {"dns_label": dns_label}
