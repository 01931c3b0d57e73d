# Copyright: llmpods maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

"""Translate the pod that the llm-inference chart renders into a plan for the Docker engine.

The plan is plain data: ``community.docker.docker_container`` parameters for an infra container that owns the
pod's network namespace, then each init and app container, plus the files that configMap and Secret volumes
hold and the host paths the pod mounts. The ``local_pod`` role executes it. It handles exactly what the chart
renders and refuses anything else by name, so a construct the Docker target would silently get wrong fails
before anything changes. Nothing here talks to Docker or the file system.

The filter docs live next to this file (``pod_plan.yml``, ``k8s_quantity.yml``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from ansible.errors import AnsibleFilterError

from ansible_collections.llmpods.inference.plugins.module_utils import _names

ENV_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")
QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
SUFFIXES = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1}
SUFFIXES.update({s: 1024 ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))})
SUFFIXES.update({s: 1000 ** (i + 1) for i, s in enumerate(("k", "M", "G", "T", "P", "E"))})
PULL_POLICY = {"Always": "always", "IfNotPresent": "missing", "Never": "never"}

# What the chart renders. Kinds the Docker target has no use for (the autoscaler, the helm test pod) are skipped.
USED_KINDS = ("Deployment", "ConfigMap", "Secret", "Service")
CLUSTER_KINDS = ("HTTPScaledObject", "InterceptorRoute", "ScaledObject")
# Pod spec fields: translated, or about scheduling and cluster identity only (nothing to do on one host).
POD_FIELDS = {"containers", "initContainers", "volumes", "securityContext", "terminationGracePeriodSeconds"}
POD_CLUSTER_FIELDS = {"automountServiceAccountToken", "enableServiceLinks", "imagePullSecrets", "runtimeClassName"}
POD_CLUSTER_FIELDS |= {"priorityClassName", "nodeSelector", "tolerations", "affinity"}
SECURITY = {"runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile"}
POD_SECURITY = SECURITY | {"fsGroup", "fsGroupChangePolicy", "supplementalGroups"}
CONTAINER_SECURITY = SECURITY | {"readOnlyRootFilesystem", "capabilities", "allowPrivilegeEscalation"}
CONTAINER_FIELDS = {"name", "image", "imagePullPolicy", "command", "args", "env", "ports", "resources"}
CONTAINER_FIELDS |= {"securityContext", "volumeMounts", "startupProbe", "readinessProbe", "livenessProbe"}
PROBE_FIELDS = {"httpGet", "exec", "initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold"}
PROBE_FIELDS |= {"successThreshold", "terminationGracePeriodSeconds"}
RESOURCES = {"cpu", "memory", "nvidia.com/gpu", "amd.com/gpu"}
# Requests only: what the scheduler reserves on a node; one Docker host has nothing to reserve it from.
REQUESTS = RESOURCES | {"ephemeral-storage"}
VOLUME_FIELDS = {
    "hostPath": {"path", "type"},
    "emptyDir": {"sizeLimit"},
    "configMap": {"name", "defaultMode", "items"},
    "secret": {"secretName", "defaultMode", "items"},
}


class PodPlanError(AnsibleFilterError):
    """The manifests hold something the local pod does not run, or are malformed."""


def _refuse(what: str, where: str) -> PodPlanError:
    return PodPlanError(f"pod_plan: {what} is not supported ({where})")


def _only(obj: Mapping[str, Any], allowed: set[str], where: str, ignored: Iterable[str] = ()) -> None:
    for key in sorted(set(obj) - allowed - set(ignored)):
        raise _refuse(key, where)


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def k8s_quantity(value: Any) -> float | int:
    """A Kubernetes quantity ("500m", "2Gi", "1.5", 3) as a number: int when whole, else float."""
    if isinstance(value, bool):
        raise PodPlanError(f"not a Kubernetes quantity: {value!r}")
    if isinstance(value, int | float):
        return value
    match = QUANTITY.match(str(value).strip())
    try:
        number = Decimal(match.group(1)) * Decimal(SUFFIXES[match.group(2) or ""]) if match else None
    except InvalidOperation:
        number = None
    if number is None:
        raise PodPlanError(f"not a Kubernetes quantity: {value!r}")
    return int(number) if number == number.to_integral_value() else float(number)


def _expand(text: Any, env: Mapping[str, str]) -> str:
    """Kubernetes $(VAR) expansion: known names are replaced, unknown ones kept, $$ escapes."""

    return ENV_REF.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), str(text))


def _data(obj: Mapping[str, Any]) -> dict[str, str]:
    """The keys of a ConfigMap or Secret as text."""
    where = f"{obj['kind']} {obj['metadata']['name']}"
    if obj.get("binaryData"):
        raise _refuse("binaryData", where)
    out = {}
    for key, value in (obj.get("data") or {}).items():
        if obj["kind"] == "ConfigMap":
            out[key] = "" if value is None else str(value)
            continue
        try:
            out[key] = base64.b64decode(str(value), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise PodPlanError(f"pod_plan: {where} key {key} is not base64-encoded UTF-8 text ({exc})") from exc
    out.update({key: str(value) for key, value in (obj.get("stringData") or {}).items()})
    return out


class PodPlanner:
    def __init__(self, documents: Any, state_dir: str, pod_name: str | None, namespace: str | None):
        if isinstance(documents, str | bytes) or not isinstance(documents, Iterable):
            raise PodPlanError("pod_plan wants parsed documents: pipe helm template output through from_yaml_all")
        self.objects: dict[tuple[str, str], Mapping[str, Any]] = {}
        for doc in documents:
            if not doc:
                continue
            if not isinstance(doc, Mapping) or "kind" not in doc or "name" not in (doc.get("metadata") or {}):
                raise PodPlanError(f"pod_plan: not a Kubernetes object: {str(doc)[:80]!r}")
            kind, name = doc["kind"], doc["metadata"]["name"]
            hook = "helm.sh/hook" in (doc["metadata"].get("annotations") or {})
            if kind in USED_KINDS and not hook:
                self.objects[(kind, name)] = doc
            elif kind not in CLUSTER_KINDS and not (kind == "Pod" and hook):
                raise _refuse(f"kind {kind}", f"{kind}/{name}")
        deployments = [obj for (kind, _name), obj in sorted(self.objects.items()) if kind == "Deployment"]
        if len(deployments) != 1:
            raise PodPlanError(f"pod_plan: expected one Deployment in the manifests, found {len(deployments)}")
        self.deployment = deployments[0]
        template = self.deployment["spec"]["template"]
        self.meta = template.get("metadata") or {}
        self.labels = {str(k): str(v) for k, v in (self.meta.get("labels") or {}).items()}
        self.spec = template["spec"]
        self.pod = pod_name or self.deployment["metadata"]["name"]
        if not _names.DNS_LABEL.match(self.pod):
            raise PodPlanError(f"pod_plan: pod name {self.pod!r} is not a DNS label (lowercase letters, digits, '-')")
        self.namespace = namespace or self.deployment["metadata"].get("namespace") or "default"
        self.state_dir = state_dir.rstrip("/")
        self.infra = _names.pod_docker_names(self.pod)["infra"]
        self.pod_sc = self.spec.get("securityContext") or {}
        self.configmaps: dict[str, str] = {}  # name -> hash of the data: a change means a new pod

    def lookup(self, kind: str, name: str, where: str) -> dict[str, str]:
        obj = self.objects.get((kind, name))
        if obj is None:
            raise PodPlanError(f"pod_plan: {where} wants {kind} {name}, which is not among the manifests")
        data = _data(obj)
        if kind == "ConfigMap":
            self.configmaps[name] = _hash(data)
        return data

    def check(self) -> None:
        """Refuse, by name, everything in the pod spec that the plan would not honour."""
        spec = self.spec
        _only(spec, POD_FIELDS, "pod spec", POD_CLUSTER_FIELDS)
        _only(self.pod_sc, POD_SECURITY, "pod securityContext")
        for container in (spec.get("initContainers") or []) + spec["containers"]:
            where = f"container {container['name']}"
            _only(container, CONTAINER_FIELDS, where)
            sc = container.get("securityContext") or {}
            _only(sc, CONTAINER_SECURITY, f"{where} securityContext")
            for source in (sc, self.pod_sc):
                profile = (source.get("seccompProfile") or {}).get("type", "RuntimeDefault")
                if profile != "RuntimeDefault":
                    raise _refuse(f"seccompProfile {profile}", where)
            for item in container.get("env") or []:
                _only(item, {"name", "value"}, f"{where} env {item['name']}")
            for mount in container.get("volumeMounts") or []:
                _only(mount, {"name", "mountPath", "readOnly"}, f"{where} volumeMount {mount['name']}")
            for port in container.get("ports") or []:
                _only(port, {"name", "containerPort", "protocol"}, f"{where} port {port.get('name', '')}")
            for kind in ("startup", "readiness", "liveness"):
                # httpGet and exec probes; locally they are not run: model_ready waits for readiness instead.
                _only(container.get(f"{kind}Probe") or {}, PROBE_FIELDS, f"{where} {kind}Probe")
            resources = container.get("resources") or {}
            _only(resources, {"limits", "requests"}, f"{where} resources")
            _only(resources.get("limits") or {}, RESOURCES, f"{where} resources.limits")
            _only(resources.get("requests") or {}, REQUESTS, f"{where} resources.requests")
        for volume in spec.get("volumes") or []:
            kind = next((key for key in volume if key != "name"), "emptyDir")
            _only(volume, {"name", kind}, f"volume {volume['name']}")
            if kind not in VOLUME_FIELDS:
                raise PodPlanError(
                    f"pod_plan: volume type {kind} is not supported (volume {volume['name']}); "
                    "the Docker target takes the model from a hostPath or a download"
                )
            _only(volume.get(kind) or {}, VOLUME_FIELDS[kind], f"volume {volume['name']} {kind}")

    def user(self, container: Mapping[str, Any]) -> tuple[int | None, int | None]:
        sc = {**self.pod_sc, **(container.get("securityContext") or {})}
        uid, gid = sc.get("runAsUser"), sc.get("runAsGroup")
        if sc.get("runAsNonRoot") and not uid:
            raise _refuse(f"runAsNonRoot with runAsUser {uid}", f"container {container['name']}")
        if uid is None and gid is not None:
            raise _refuse("runAsGroup without runAsUser", f"container {container['name']}")
        return (None if uid is None else int(uid)), (None if gid is None else int(gid))

    def files(self, name: str, kind: str, source: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The files a configMap or secret volume shows, with the mode and owner the kubelet gives them."""
        ref = source["secretName"] if kind == "secret" else source["name"]
        data = self.lookup("Secret" if kind == "secret" else "ConfigMap", ref, f"volume {name}")
        default_mode = int(source.get("defaultMode", 0o644))
        entries = [(key, key, default_mode) for key in sorted(data)]
        if source.get("items"):
            entries = [(i["key"], i["path"], int(i.get("mode", default_mode))) for i in source["items"]]
        fs_group = self.pod_sc.get("fsGroup")
        files = []
        for key, path, mode in entries:
            if key not in data:
                raise PodPlanError(f"pod_plan: volume {name}: {kind} {ref} has no key {key}")
            if "/" in path or path in ("", ".", ".."):
                raise PodPlanError(f"pod_plan: volume {name}: item path {path!r} is not a file name")
            # fsGroup: root-owned, group fsGroup, group-readable (the kubelet's ownership rule).
            mode |= 0o440 if fs_group is not None else 0
            files.append(
                {
                    "path": f"{self.state_dir}/volumes/{name}/{path}",
                    "content": data[key],
                    "mode": f"0{mode:o}",
                    # Without the privilege to chown, the owner's read bit goes to everyone; the pod's state
                    # directory itself stays private to the deploying user.
                    "mode_unprivileged": f"0{mode | (mode & 0o400) >> 3 | (mode & 0o400) >> 6:o}",
                    "owner": None if fs_group is None else 0,
                    "group": None if fs_group is None else int(fs_group),
                    "secret": kind == "secret",
                }
            )
        return files

    def volumes(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
        """Directories, files, host paths, and per volume how a container mounts it."""
        users: dict[str, set[str]] = {}
        for container in (self.spec.get("initContainers") or []) + self.spec["containers"]:
            for mount in container.get("volumeMounts") or []:
                users.setdefault(mount["name"], set()).add(container["name"])
        dirs = [{"path": self.state_dir, "mode": "0700"}, {"path": f"{self.state_dir}/volumes", "mode": "0755"}]
        files: list[dict[str, Any]] = []
        host_paths: list[dict[str, Any]] = []
        how: dict[str, Any] = {}
        for volume in self.spec.get("volumes") or []:
            name = volume["name"]
            kind = next((key for key in volume if key != "name"), "emptyDir")
            source = volume.get(kind) or {}
            local_dir = f"{self.state_dir}/volumes/{name}"
            if name not in users:
                continue
            if kind == "hostPath":
                host_paths.append({"volume": name, "path": source["path"], "type": source.get("type", "")})
                how[name] = {"type": "bind", "source": source["path"]}
            elif kind == "emptyDir" and len(users[name]) == 1:
                how[name] = {"type": "tmpfs", "tmpfs_mode": "1777"}
                if source.get("sizeLimit"):
                    how[name]["tmpfs_size"] = str(int(k8s_quantity(source["sizeLimit"])))
            elif kind == "emptyDir":
                # Shared by several containers (the download and the server): a host directory every
                # container user may write, as an emptyDir is.
                dirs.append({"path": local_dir, "mode": "0777"})
                how[name] = {"type": "bind", "source": local_dir}
            else:
                dirs.append({"path": local_dir, "mode": "0755"})
                files += self.files(name, kind, source)
                how[name] = {"type": "bind", "source": local_dir, "read_only": True}
        return dirs, files, host_paths, how

    def container(self, container: Mapping[str, Any], how: Mapping[str, Any], role: str) -> dict[str, Any]:
        env: dict[str, str] = {}
        for item in container.get("env") or []:
            env[item["name"]] = _expand(item.get("value", ""), env)
        params: dict[str, Any] = {
            "name": f"{self.pod}-init-{container['name']}" if role == "init" else f"{self.pod}-{container['name']}",
            "image": container["image"],
            "network_mode": f"container:{self.infra}",
            "ipc_mode": f"container:{self.infra}",
            "pull": PULL_POLICY.get(container.get("imagePullPolicy", "IfNotPresent"), "missing"),
            "stop_timeout": int(self.spec.get("terminationGracePeriodSeconds", 30)),
        }
        if container.get("command"):
            params["entrypoint"] = [_expand(arg, env) for arg in container["command"]]
        if container.get("args"):
            params["command"] = [_expand(arg, env) for arg in container["args"]]
        if env:
            params["env"] = dict(sorted(env.items()))
        uid, gid = self.user(container)
        if uid is not None:
            params["user"] = str(uid) if gid is None else f"{uid}:{gid}"
        groups = [*self.pod_sc.get("supplementalGroups", []), self.pod_sc.get("fsGroup")]
        if any(g is not None for g in groups):
            params["groups"] = sorted({str(int(g)) for g in groups if g is not None}, key=int)
        sc = container.get("securityContext") or {}
        caps = sc.get("capabilities") or {}
        _only(caps, {"add", "drop"}, f"container {container['name']} capabilities")
        if caps.get("drop"):
            params["cap_drop"] = sorted(caps["drop"])
        if caps.get("add"):
            params["capabilities"] = sorted(caps["add"])
        if sc.get("readOnlyRootFilesystem"):
            params["read_only"] = True
        if sc.get("allowPrivilegeEscalation") is False:
            params["security_opts"] = ["no-new-privileges"]
        params.update(self.resources(container))
        mounts = []
        for mount in container.get("volumeMounts") or []:
            if mount["name"] not in how:
                raise PodPlanError(f"pod_plan: container {container['name']} mounts {mount['name']}, no pod volume")
            entry = {"target": mount["mountPath"], **how[mount["name"]]}
            if mount.get("readOnly") and entry["type"] == "bind":
                entry["read_only"] = True
            mounts.append(entry)
        if mounts:
            params["mounts"] = mounts
        if role == "app":
            params["restart_policy"] = "unless-stopped"
        params["labels"] = {**self.labels, _names.LABEL_ROLE: role, _names.LABEL_CONTAINER: container["name"]}
        return {"name": container["name"], "role": role, "params": params}

    def resources(self, container: Mapping[str, Any]) -> dict[str, Any]:
        limits = (container.get("resources") or {}).get("limits") or {}
        requests = (container.get("resources") or {}).get("requests") or {}
        out: dict[str, Any] = {}
        if "cpu" in limits:
            out["cpus"] = float(k8s_quantity(limits["cpu"]))
        if "memory" in limits:
            out["memory"] = str(int(k8s_quantity(limits["memory"])))
        if "memory" in requests:
            reservation = int(k8s_quantity(requests["memory"]))
            if "memory" not in limits or reservation < int(out["memory"]):
                out["memory_reservation"] = str(reservation)
        if "nvidia.com/gpu" in limits:
            count = int(k8s_quantity(limits["nvidia.com/gpu"]))
            out["device_requests"] = [{"driver": "nvidia", "count": count, "capabilities": [["gpu"]]}]
        if "amd.com/gpu" in limits:
            out["devices"] = ["/dev/kfd", "/dev/dri"]
        return out

    def published(self, host_port: int, bind_address: str) -> list[str]:
        """The Service's target port (the pod's only way in), published on the host."""
        named = {p["name"]: int(p["containerPort"]) for c in self.spec["containers"] for p in c.get("ports") or []}
        for (kind, name), service in sorted(self.objects.items()):
            selector = (service.get("spec") or {}).get("selector") or {}
            if kind != "Service" or not selector or any(self.labels.get(k) != v for k, v in selector.items()):
                continue
            target = service["spec"]["ports"][0].get("targetPort", service["spec"]["ports"][0]["port"])
            port = named.get(target, target)
            if not isinstance(port, int):
                raise PodPlanError(f"pod_plan: Service {name} targetPort {target!r} is no container port")
            bind = f"[{bind_address}]" if ":" in bind_address else bind_address
            return [f"{bind}:{int(host_port)}:{port}"]
        raise PodPlanError("pod_plan: no Service among the manifests selects the pod; it says which port to publish")

    def plan(self, host_port: int, bind_address: str) -> dict[str, Any]:
        self.check()
        dirs, files, host_paths, how = self.volumes()
        names = [c["name"] for c in (self.spec.get("initContainers") or []) + self.spec["containers"]]
        if len(set(names)) != len(names):
            raise PodPlanError(f"pod_plan: container names repeat: {names}")
        init = [self.container(c, how, "init") for c in self.spec.get("initContainers") or []]
        apps = [self.container(c, how, "app") for c in self.spec["containers"]]
        first = self.spec["containers"][0]
        infra = {
            "name": self.infra,
            "image": first["image"],
            "pull": PULL_POLICY.get(first.get("imagePullPolicy", "IfNotPresent"), "missing"),
            "entrypoint": ["sleep", "infinity"],
            "hostname": self.pod,
            "ipc_mode": "shareable",
            # Nothing handles SIGTERM in a sleeping PID 1: stopping it is always a kill.
            "stop_signal": "SIGKILL",
            "read_only": True,
            "cap_drop": ["ALL"],
            "security_opts": ["no-new-privileges"],
            "user": "65534:65534",
            "restart_policy": "unless-stopped",
            "published_ports": self.published(host_port, bind_address),
            "labels": {**self.labels, _names.LABEL_ROLE: "infra"},
        }
        # A new pod whenever the template, a configMap it reads, or the infra changes; not a Secret, whose
        # mounted files are updated in place, as the kubelet does.
        pod_hash = _hash(
            {
                "template": self.meta,
                "spec": self.spec,
                "configmaps": self.configmaps,
                "infra": infra,
                "state_dir": self.state_dir,
            }
        )
        common = {_names.LABEL_POD: self.pod, _names.LABEL_NAMESPACE: self.namespace, _names.LABEL_POD_HASH: pod_hash}
        containers = [{"name": "infra", "role": "infra", "params": infra}, *init, *apps]
        for entry in containers:
            entry["params"]["labels"].update(common)
        return {
            "pod": self.pod,
            "hash": pod_hash,
            "state_dir": self.state_dir,
            "dirs": dirs,
            "files": files,
            "host_paths": host_paths,
            "containers": containers,
        }


def pod_plan(
    manifests: Iterable[Mapping[str, Any]],
    state_dir: str,
    host_port: int,
    pod_name: str | None = None,
    namespace: str | None = None,
    bind_address: str = "127.0.0.1",
) -> dict[str, Any]:
    """Plan how to run the pod of the chart's Deployment on a Docker engine."""
    if not state_dir:
        raise PodPlanError("pod_plan needs state_dir, the host directory for the pod's volume files")
    # Empty strings mean "not set", so a role can pass its defaults straight through.
    planner = PodPlanner(manifests, str(state_dir), pod_name or None, namespace or None)
    return planner.plan(int(host_port), bind_address or "127.0.0.1")


class FilterModule:
    def filters(self):
        return {"pod_plan": pod_plan, "pod_docker_names": _names.pod_docker_names, "k8s_quantity": k8s_quantity}
