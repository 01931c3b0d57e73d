# Copyright: llmpods maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

"""The one home of the collection's naming rules, for its modules (which run without the controller's plugins),
its filter and test plugins, and through the ``llmpods.inference.dns_label`` test, its roles and playbooks.

A model name is the URL prefix, the model id, and the suffix of the release name ``llm-<name>``, whose objects
(Service, Deployment, KEDA's ``keda-hpa-<release>``) carry it. So:

- no rule: an RFC 1123 label, at most 63 characters (a pod, a container, a model id a client sends);
- ``release``: a Helm release (or fullnameOverride) name: a DNS-1035 label (it names a Service, so it starts with a
  letter), at most 53 characters (Helm's limit, which also keeps ``keda-hpa-<release>`` within 63);
- ``model``: a model name of the catalog: a DNS-1035 label of at most 49 characters, so that ``llm-<name>`` is a
  release name.

The chart's values.schema.json keeps its own copy: the chart is used without Ansible.
Private to this collection: the interface may change without notice.
"""

from __future__ import annotations

import re

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Longest name per rule: Helm's release names, and a model name within llm-<name>.
RELEASE_MAX = 53
MODEL_MAX = RELEASE_MAX - len("llm-")
RULES = {"release": RELEASE_MAX, "model": MODEL_MAX}


def is_dns_label(value, rule=None):
    """True for a DNS label; with ``rule`` ('model' or 'release'), a DNS-1035 label short enough for that name.
    An unknown rule raises ValueError."""
    if rule is None:
        return isinstance(value, str) and DNS_LABEL.fullmatch(value) is not None
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    return isinstance(value, str) and len(value) <= RULES[rule] and DNS_1035_LABEL.fullmatch(value) is not None


# The local pod on a Docker engine (the pod_plan filter, the local_pod role): the labels on each of its containers.
LABEL_POD = "io.llmpods.pod"
LABEL_ROLE = "io.llmpods.pod-role"
LABEL_CONTAINER = "io.llmpods.container"
LABEL_NAMESPACE = "io.llmpods.namespace"
LABEL_POD_HASH = "io.llmpods.pod-hash"


def pod_docker_names(pod_name):
    """The names a local pod has on the Docker engine, to find it again without a plan: its infra container (which
    owns the pod's network) and the labels that carry the pod's name and the hash of its template."""
    return {"infra": f"{pod_name}-infra", "pod_label": LABEL_POD, "hash_label": LABEL_POD_HASH}
