# Copyright: llmpods maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

"""Translate a rendered Kubernetes pod (``helm template`` output) into a plan for the Docker engine.

The plan is plain data: ``community.docker.docker_container`` parameters for an infra container that owns the
pod's network namespace and for each init and app container, the files that configMap and Secret volumes hold,
the host paths the pod needs, and the probes to run the way the kubelet does. The ``local_pod`` role executes it.
Nothing here talks to Docker or the file system, so it is unit-tested against hand-written manifests.

The filter docs live next to this file (``pod_plan.yml``, ``k8s_quantity.yml``).
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

try:
    from ansible.errors import AnsibleFilterError
except ImportError:  # the unit tests also run without Ansible installed

    class AnsibleFilterError(Exception):  # type: ignore[no-redef]
        pass


LABEL_PREFIX = "io.llmpods"
LABEL_POD = f"{LABEL_PREFIX}.pod"
LABEL_ROLE = f"{LABEL_PREFIX}.pod-role"
LABEL_CONTAINER = f"{LABEL_PREFIX}.container"
LABEL_POD_HASH = f"{LABEL_PREFIX}.pod-hash"
LABEL_SPEC_HASH = f"{LABEL_PREFIX}.spec-hash"

REDACTED = "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
ENV_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")

# Kubernetes probe defaults (core/v1 Probe).
PROBE_DEFAULTS = {
    "initialDelaySeconds": 0,
    "periodSeconds": 10,
    "timeoutSeconds": 1,
    "failureThreshold": 3,
    "successThreshold": 1,
}
PROPAGATION = {"None": "rprivate", "HostToContainer": "rslave", "Bidirectional": "rshared"}
PULL_POLICY = {"Always": "always", "IfNotPresent": "missing", "Never": "never"}
SUFFIXES = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}
QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")


class PodSpecError(AnsibleFilterError):
    """The manifests ask for something that cannot run on a single Docker host, or are malformed."""


# ---------------------------------------------------------------------------------------------- small helpers


def _hash(value: Any) -> str:
    data = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def k8s_quantity(value: Any) -> float | int:
    """A Kubernetes quantity ("500m", "2Gi", "1.5", 3) as a number: int when whole, else float."""
    if isinstance(value, bool):
        raise PodSpecError(f"not a quantity: {value!r}")
    if isinstance(value, int | float):
        return value
    match = QUANTITY.match(str(value).strip())
    if not match:
        raise PodSpecError(f"not a Kubernetes quantity: {value!r}")
    try:
        number = Decimal(match.group(1)) * Decimal(SUFFIXES[match.group(2) or ""])
    except InvalidOperation as exc:
        raise PodSpecError(f"not a Kubernetes quantity: {value!r}") from exc
    return int(number) if number == number.to_integral_value() else float(number)


def _octal(mode: int | None) -> str | None:
    return None if mode is None else f"0{mode:o}"


def _expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes $(VAR) expansion: known names are replaced, unknown ones kept, $$ escapes."""

    def repl(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return ENV_REF.sub(repl, text)


def _decode_secret(secret: Mapping[str, Any]) -> dict[str, str]:
    name = secret.get("metadata", {}).get("name", "?")
    out: dict[str, str] = {}
    for key, value in (secret.get("data") or {}).items():
        try:
            out[key] = base64.b64decode(str(value), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise PodSpecError(f"Secret {name} key {key}: not base64-encoded UTF-8 text ({exc})") from exc
    for key, value in (secret.get("stringData") or {}).items():
        out[key] = str(value)
    return out


def _configmap_data(configmap: Mapping[str, Any]) -> dict[str, str]:
    name = configmap.get("metadata", {}).get("name", "?")
    if configmap.get("binaryData"):
        raise PodSpecError(f"ConfigMap {name}: binaryData is not supported locally")
    return {key: "" if value is None else str(value) for key, value in (configmap.get("data") or {}).items()}


# ---------------------------------------------------------------------------------------------- manifests


class Manifests:
    """The objects of one rendered release, indexed by kind and name."""

    def __init__(self, documents: Any):
        if isinstance(documents, str):
            raise PodSpecError("pod_plan wants parsed documents: pipe helm template output through from_yaml_all")
        if isinstance(documents, Mapping):
            documents = [documents]
        self.objects: list[dict[str, Any]] = []
        for doc in documents or []:
            if not doc:
                continue
            if not isinstance(doc, Mapping) or "kind" not in doc:
                raise PodSpecError(f"not a Kubernetes object: {str(doc)[:80]!r}")
            if doc["kind"].endswith("List") and isinstance(doc.get("items"), list):
                self.objects.extend(dict(item) for item in doc["items"] if item)
            else:
                self.objects.append(dict(doc))

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj.get("kind") == kind]

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        for obj in self.of_kind(kind):
            if obj.get("metadata", {}).get("name") == name:
                return obj
        return None

    def workload(self, name: str | None) -> dict[str, Any]:
        found = [obj for obj in self.objects if obj.get("kind") in WORKLOAD_KINDS]
        if name:
            found = [obj for obj in found if obj.get("metadata", {}).get("name") == name]
        if len(found) != 1:
            names = [f"{obj['kind']}/{obj.get('metadata', {}).get('name')}" for obj in found]
            wanted = f" named {name}" if name else ""
            raise PodSpecError(f"expected exactly one workload{wanted} in the manifests, found {names or 'none'}")
        return found[0]


# ---------------------------------------------------------------------------------------------- the planner


class PodPlanner:
    def __init__(
        self,
        manifests: Manifests,
        *,
        state_dir: str,
        pod_name: str | None,
        workload: str | None,
        namespace: str | None,
        host_port: int | None,
        bind_address: str,
        publish: int | str | None,
        infra_image: str | None,
        infra_command: list[str] | None,
        restart_policy: str,
        pull: str | None,
        redact: bool = False,
    ):
        self.redact = redact
        self.manifests = manifests
        self.workload = manifests.workload(workload)
        meta = self.workload.get("metadata", {})
        template = self.workload.get("spec", {}).get("template") or {}
        self.template_meta = template.get("metadata") or {}
        self.spec = template.get("spec") or {}
        if not self.spec.get("containers"):
            raise PodSpecError(f"{self.workload['kind']}/{meta.get('name')}: the pod template has no containers")
        self.pod = pod_name or meta.get("name")
        if not self.pod or not DNS_LABEL.match(self.pod):
            raise PodSpecError(f"pod name {self.pod!r} is not a DNS label (lowercase letters, digits, '-')")
        self.namespace = namespace or meta.get("namespace") or "default"
        self.state_dir = state_dir.rstrip("/")
        self.host_port = host_port
        self.bind_address = bind_address
        self.publish = publish
        self.infra_image = infra_image
        self.infra_command = infra_command or ["sleep", "infinity"]
        self.restart_policy = restart_policy
        self.pull = pull
        self.infra_name = f"{self.pod}-infra"
        self.notes: list[str] = []
        self.pod_sc = self.spec.get("securityContext") or {}
        self.volumes = {vol["name"]: vol for vol in self.spec.get("volumes") or []}
        # Data whose change means "a new pod" (configMaps, and Secrets read once at start).
        self.pod_inputs: dict[str, Any] = {}

    # -- naming

    def docker_name(self, container: str, init: bool = False) -> str:
        return f"{self.pod}-init-{container}" if init else f"{self.pod}-{container}"

    # -- lookups

    def _configmap(self, name: str, optional: bool, what: str) -> dict[str, str] | None:
        obj = self.manifests.get("ConfigMap", name)
        if obj is None:
            if optional:
                return None
            raise PodSpecError(f"{what}: ConfigMap {name} is not among the rendered manifests")
        data = _configmap_data(obj)
        self.pod_inputs[f"ConfigMap/{name}"] = _hash(data)
        return data

    def _secret(self, name: str, optional: bool, what: str, *, live: bool = False) -> dict[str, str] | None:
        obj = self.manifests.get("Secret", name)
        if obj is None:
            if optional:
                return None
            raise PodSpecError(f"{what}: Secret {name} is not among the rendered manifests")
        data = _decode_secret(obj)
        if not live:
            # Read once at container start (env, subPath): a change needs a new pod.
            self.pod_inputs[f"Secret/{name}"] = _hash(data)
        return data

    def _container_ports(self) -> dict[str, int]:
        ports: dict[str, int] = {}
        for container in self.spec["containers"]:
            for port in container.get("ports") or []:
                if port.get("name"):
                    ports[port["name"]] = int(port["containerPort"])
        return ports

    def _resolve_port(self, port: Any, where: str) -> int:
        if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
            return int(port)
        named = self._container_ports()
        if port in named:
            return named[port]
        raise PodSpecError(f"{where}: port {port!r} is neither a number nor a named container port")

    # -- security and identity

    def _sc(self, container: Mapping[str, Any]) -> dict[str, Any]:
        merged = {
            key: self.pod_sc[key]
            for key in ("runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile")
            if key in self.pod_sc
        }
        merged.update(container.get("securityContext") or {})
        return merged

    def _user(self, container: Mapping[str, Any]) -> str | None:
        sc = self._sc(container)
        uid, gid = sc.get("runAsUser"), sc.get("runAsGroup")
        if uid is None and gid is not None:
            raise PodSpecError(f"container {container['name']}: runAsGroup without runAsUser cannot be run locally")
        if uid is None:
            if sc.get("runAsNonRoot"):
                self.notes.append(
                    f"container {container['name']}: runAsNonRoot without runAsUser; the image's user is used"
                )
            return None
        return f"{int(uid)}:{int(gid)}" if gid is not None else str(int(uid))

    def _uid_gid(self, container: Mapping[str, Any]) -> tuple[int | None, int | None]:
        sc = self._sc(container)
        uid, gid = sc.get("runAsUser"), sc.get("runAsGroup")
        return (None if uid is None else int(uid), None if gid is None else int(gid))

    def _groups(self) -> list[str]:
        groups = [str(int(g)) for g in self.pod_sc.get("supplementalGroups") or []]
        if self.pod_sc.get("fsGroup") is not None:
            groups.append(str(int(self.pod_sc["fsGroup"])))
        return sorted(set(groups), key=int)

    def _security(self, container: Mapping[str, Any]) -> dict[str, Any]:
        sc = self._sc(container)
        out: dict[str, Any] = {}
        caps = sc.get("capabilities") or {}
        if caps.get("drop"):
            out["cap_drop"] = sorted(str(c) for c in caps["drop"])
        if caps.get("add"):
            out["capabilities"] = sorted(str(c) for c in caps["add"])
        if sc.get("readOnlyRootFilesystem"):
            out["read_only"] = True
        if sc.get("privileged"):
            out["privileged"] = True
        opts = []
        if sc.get("allowPrivilegeEscalation") is False:
            opts.append("no-new-privileges")
        seccomp = (sc.get("seccompProfile") or {}).get("type")
        if seccomp == "Unconfined":
            opts.append("seccomp=unconfined")
        if opts:
            out["security_opts"] = opts
        return out

    # -- environment

    def _field_ref(self, path: str, what: str) -> str:
        labels = self.template_meta.get("labels") or {}
        annotations = self.template_meta.get("annotations") or {}
        simple = {
            "metadata.name": self.pod,
            "metadata.namespace": self.namespace,
            "metadata.uid": self.pod,
            "spec.nodeName": "localhost",
            "spec.serviceAccountName": self.spec.get("serviceAccountName") or "default",
            # Inside the pod's network namespace the pod is reachable on loopback.
            "status.podIP": "127.0.0.1",
            "status.podIPs": "127.0.0.1",
            "status.hostIP": "127.0.0.1",
            "status.hostIPs": "127.0.0.1",
        }
        if path in simple:
            return simple[path]
        match = re.match(r"^metadata\.(labels|annotations)\['([^']+)'\]$", path)
        if match:
            source = labels if match.group(1) == "labels" else annotations
            return str(source.get(match.group(2), ""))
        raise PodSpecError(f"{what}: fieldRef {path} is not supported locally")

    def _resource_ref(self, ref: Mapping[str, Any], containers: Mapping[str, Any], what: str) -> str:
        target = containers.get(ref.get("containerName") or "")
        resources = (target or {}).get("resources") or {}
        section, _unused, name = str(ref.get("resource", "")).partition(".")
        if section not in ("limits", "requests") or name not in ("cpu", "memory", "ephemeral-storage"):
            raise PodSpecError(f"{what}: resourceFieldRef {ref.get('resource')} is not supported locally")
        value = (resources.get(section) or {}).get(name)
        if value is None:
            raise PodSpecError(f"{what}: resourceFieldRef {ref.get('resource')} has no value in the spec")
        divisor = k8s_quantity(ref.get("divisor", 1))
        return str(math.ceil(Decimal(str(k8s_quantity(value))) / Decimal(str(divisor))))

    def _env(self, container: Mapping[str, Any], by_name: Mapping[str, Any]) -> tuple[dict[str, str], set[str]]:
        env: dict[str, str] = {}
        secret_names: set[str] = set()
        cname = container["name"]
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                ref = source["configMapRef"]
                data = self._configmap(ref["name"], bool(ref.get("optional")), f"container {cname} envFrom")
            elif "secretRef" in source:
                ref = source["secretRef"]
                data = self._secret(ref["name"], bool(ref.get("optional")), f"container {cname} envFrom")
                secret_names.update(prefix + key for key in data or {})
            else:
                raise PodSpecError(f"container {cname}: envFrom entry {source!r} is not supported")
            for key, value in (data or {}).items():
                env[prefix + key] = value
                if "configMapRef" in source:
                    secret_names.discard(prefix + key)
        for item in container.get("env") or []:
            name = item["name"]
            what = f"container {cname} env {name}"
            secret_names.discard(name)
            if "valueFrom" not in item:
                env[name] = _expand(str(item.get("value", "")), env)
                continue
            source = item["valueFrom"]
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                data = self._secret(ref["name"], bool(ref.get("optional")), what)
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise PodSpecError(f"{what}: Secret {ref['name']} has no key {ref['key']}")
                env[name] = data[ref["key"]]
                secret_names.add(name)
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                data = self._configmap(ref["name"], bool(ref.get("optional")), what)
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise PodSpecError(f"{what}: ConfigMap {ref['name']} has no key {ref['key']}")
                env[name] = data[ref["key"]]
            elif "fieldRef" in source:
                env[name] = self._field_ref(source["fieldRef"]["fieldPath"], what)
            elif "resourceFieldRef" in source:
                env[name] = self._resource_ref(source["resourceFieldRef"], by_name, what)
            else:
                raise PodSpecError(f"{what}: valueFrom {sorted(source)} is not supported locally")
        return env, secret_names

    # -- resources

    def _resources(self, container: Mapping[str, Any]) -> dict[str, Any]:
        resources = container.get("resources") or {}
        limits = resources.get("limits") or {}
        requests = resources.get("requests") or {}
        out: dict[str, Any] = {}
        if "cpu" in limits:
            out["cpus"] = float(k8s_quantity(limits["cpu"]))
        if "memory" in limits:
            out["memory"] = str(int(k8s_quantity(limits["memory"])))
        if "memory" in requests:
            reservation = int(k8s_quantity(requests["memory"]))
            if "memory" not in limits or reservation < int(k8s_quantity(limits["memory"])):
                out["memory_reservation"] = str(reservation)
        for name in sorted(set(limits) | set(requests)):
            if name in ("cpu", "memory", "ephemeral-storage") or name.startswith("hugepages-"):
                continue
            count = int(k8s_quantity(limits.get(name, requests.get(name))))
            if name == "nvidia.com/gpu":
                out["device_requests"] = [{"driver": "nvidia", "count": count, "capabilities": [["gpu"]]}]
            elif name == "amd.com/gpu":
                out["devices"] = ["/dev/kfd", "/dev/dri"]
            elif name.startswith("gpu.intel.com/") or name in ("squat.ai/dri", "devic.es/dri"):
                out["devices"] = ["/dev/dri"]
            else:
                self.notes.append(f"container {container['name']}: resource {name} is ignored locally")
        return out

    # -- volumes and mounts

    def _volume_dir(self, volume: str) -> str:
        return f"{self.state_dir}/volumes/{volume}"

    def _mounted_by(self) -> dict[str, list[Mapping[str, Any]]]:
        users: dict[str, list[Mapping[str, Any]]] = {}
        for container in (self.spec.get("initContainers") or []) + self.spec["containers"]:
            for mount in container.get("volumeMounts") or []:
                users.setdefault(mount["name"], []).append(container)
        return users

    def _projected_files(
        self, kind: str, volume: Mapping[str, Any], source: Mapping[str, Any], users: list[Mapping[str, Any]]
    ) -> list[dict[str, Any]]:
        """Files a configMap or secret volume shows, with the mode and owner the kubelet would give them."""
        vname = volume["name"]
        what = f"volume {vname}"
        optional = bool(source.get("optional"))
        if kind == "secret":
            data = self._secret(source["secretName"], optional, what, live=True)
        else:
            data = self._configmap(source["name"], optional, what)
        data = data or {}
        default_mode = source.get("defaultMode", 0o644)
        if source.get("items"):
            entries = []
            for item in source["items"]:
                if item["key"] not in data:
                    if optional:
                        continue
                    raise PodSpecError(f"{what}: key {item['key']} is not in the {kind}")
                entries.append((item["path"], data[item["key"]], item.get("mode", default_mode)))
        else:
            entries = [(key, value, default_mode) for key, value in sorted(data.items())]
        fs_group = self.pod_sc.get("fsGroup")
        uids = {self._uid_gid(c) for c in users}
        owner = group = None
        if fs_group is not None:
            # fsGroup: root-owned, group fsGroup, group-readable (the kubelet's ownership rule).
            owner, group = 0, int(fs_group)
        elif len(uids) == 1:
            uid, gid = next(iter(uids))
            owner, group = uid, gid if gid is not None else uid
        files = []
        for path, content, mode in entries:
            if path.startswith("/") or ".." in path.split("/"):
                raise PodSpecError(f"{what}: item path {path!r} must be relative and stay inside the volume")
            mode = int(mode)
            if fs_group is not None:
                mode |= 0o440
            files.append(
                {
                    "path": f"{self._volume_dir(vname)}/{path}",
                    "content": content,
                    "mode": _octal(mode),
                    # Without privileges to chown, the owner's read bits are granted to everyone (the pod
                    # directory itself is private to the deploying user).
                    "mode_unprivileged": _octal(mode | ((mode & 0o400) >> 6) | ((mode & 0o400) >> 3)),
                    "owner": owner,
                    "group": group,
                    "secret": kind == "secret",
                }
            )
        return files

    def _volumes(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
        """dirs, files, host paths, and per volume how it is mounted."""
        users = self._mounted_by()
        dirs = [{"path": self.state_dir, "mode": "0700"}, {"path": f"{self.state_dir}/volumes", "mode": "0755"}]
        files: list[dict[str, Any]] = []
        host_paths: list[dict[str, Any]] = []
        how: dict[str, Any] = {}
        for name, volume in sorted(self.volumes.items()):
            if name not in users:
                continue
            kinds = [key for key in volume if key != "name"]
            kind = kinds[0] if kinds else "emptyDir"
            if kind == "hostPath":
                source = volume["hostPath"]
                host_paths.append({"volume": name, "path": source["path"], "type": source.get("type", "")})
                how[name] = {"type": "bind", "source": source["path"]}
            elif kind == "emptyDir":
                source = volume.get("emptyDir") or {}
                if len({c["name"] for c in users[name]}) == 1:
                    tmpfs: dict[str, Any] = {"type": "tmpfs", "tmpfs_mode": "1777"}
                    if source.get("sizeLimit"):
                        tmpfs["tmpfs_size"] = str(int(k8s_quantity(source["sizeLimit"])))
                    how[name] = tmpfs
                else:
                    # Shared between containers (e.g. an init container's download): a host directory that
                    # every container user can write, as an emptyDir is.
                    dirs.append({"path": self._volume_dir(name), "mode": "0777"})
                    how[name] = {"type": "bind", "source": self._volume_dir(name)}
            elif kind in ("configMap", "secret"):
                dirs.append({"path": self._volume_dir(name), "mode": "0755"})
                vol_files = self._projected_files(kind, volume, volume[kind], users[name])
                for item in vol_files:
                    parent = item["path"].rsplit("/", 1)[0]
                    if parent != self._volume_dir(name) and not any(d["path"] == parent for d in dirs):
                        dirs.append({"path": parent, "mode": "0755"})
                files.extend(vol_files)
                how[name] = {"type": "bind", "source": self._volume_dir(name), "read_only": True}
            elif kind == "persistentVolumeClaim":
                claim = volume[kind].get("claimName")
                raise PodSpecError(
                    f"volume {name}: persistentVolumeClaim {claim} is not supported locally; "
                    "use a hostPath (or a download) for the model on the Docker target"
                )
            else:
                raise PodSpecError(f"volume {name}: {kind} volumes are not supported locally")
        return dirs, files, host_paths, how

    def _mounts(self, container: Mapping[str, Any], how: Mapping[str, Any]) -> list[dict[str, Any]]:
        mounts = []
        for mount in container.get("volumeMounts") or []:
            name = mount["name"]
            if name not in self.volumes:
                raise PodSpecError(f"container {container['name']}: volumeMount {name} names no pod volume")
            base = dict(how[name])
            entry: dict[str, Any] = {"target": mount["mountPath"], "type": base["type"]}
            sub = mount.get("subPath") or mount.get("subPathExpr")
            if base["type"] == "tmpfs":
                if sub:
                    raise PodSpecError(f"container {container['name']}: subPath on emptyDir {name} needs a shared dir")
                entry.update({k: v for k, v in base.items() if k.startswith("tmpfs_")})
            else:
                source = base["source"]
                if sub:
                    if sub.startswith("/") or ".." in sub.split("/"):
                        raise PodSpecError(f"container {container['name']}: subPath {sub!r} must stay in the volume")
                    source = f"{source.rstrip('/')}/{sub}"
                    secret = self.volumes[name].get("secret")
                    if secret:
                        # A subPath mount is not updated in place: its content is part of the pod.
                        self._secret(secret["secretName"], True, f"volume {name}")
                entry["source"] = source
                if mount.get("readOnly") or base.get("read_only"):
                    entry["read_only"] = True
                if mount.get("mountPropagation") in PROPAGATION:
                    entry["propagation"] = PROPAGATION[mount["mountPropagation"]]
            mounts.append(entry)
        return mounts

    # -- containers

    def _container(
        self, container: Mapping[str, Any], how: Mapping[str, Any], by_name: Mapping[str, Any], *, init: bool
    ) -> dict[str, Any]:
        env, secret_names = self._env(container, by_name)
        params: dict[str, Any] = {
            "name": self.docker_name(container["name"], init=init),
            "image": container["image"],
            "network_mode": f"container:{self.infra_name}",
            "ipc_mode": f"container:{self.infra_name}",
        }
        if self.spec.get("shareProcessNamespace"):
            params["pid_mode"] = f"container:{self.infra_name}"
        if container.get("command"):
            params["entrypoint"] = [_expand(str(a), env) for a in container["command"]]
        if container.get("args"):
            params["command"] = [_expand(str(a), env) for a in container["args"]]
        if env:
            params["env"] = dict(sorted(env.items()))
        if container.get("workingDir"):
            params["working_dir"] = container["workingDir"]
        user = self._user(container)
        if user:
            params["user"] = user
        groups = self._groups()
        if groups:
            params["groups"] = groups
        params.update(self._security(container))
        params.update(self._resources(container))
        mounts = self._mounts(container, how)
        if mounts:
            params["mounts"] = mounts
        if container.get("tty"):
            params["tty"] = True
        if container.get("stdin"):
            params["interactive"] = True
        pull = self.pull or PULL_POLICY.get(container.get("imagePullPolicy", "IfNotPresent"), "missing")
        params["pull"] = pull
        params["stop_timeout"] = int(self.spec.get("terminationGracePeriodSeconds", 30))
        if not init:
            params["restart_policy"] = self.restart_policy
        labels = {
            **{str(k): str(v) for k, v in (self.template_meta.get("labels") or {}).items()},
            LABEL_POD: self.pod,
            LABEL_ROLE: "init" if init else "container",
            LABEL_CONTAINER: container["name"],
        }
        params["labels"] = labels
        return {
            "params": params,
            "sensitive": bool(secret_names),
            "secret_env": sorted(secret_names),
            "name": container["name"],
            "docker_name": params["name"],
            "uid": self._uid_gid(container)[0],
        }

    def _probe(self, container: Mapping[str, Any], kind: str, probe: Mapping[str, Any], published: int | None):
        timing = {key: int(probe.get(key, default)) for key, default in PROBE_DEFAULTS.items()}
        cname = container["name"]
        entry: dict[str, Any] = {
            "container": cname,
            "docker_name": self.docker_name(cname),
            "kind": kind,
            "initial_delay": timing["initialDelaySeconds"],
            "period": timing["periodSeconds"],
            "timeout": timing["timeoutSeconds"],
            "failure_threshold": timing["failureThreshold"],
            "success_threshold": timing["successThreshold"],
        }
        where = f"container {cname} {kind}Probe"
        if "httpGet" in probe:
            get = probe["httpGet"]
            port = self._resolve_port(get.get("port"), where)
            path = get.get("path") or "/"
            if not path.startswith("/"):
                path = "/" + path
            entry.update(
                action="http",
                scheme=str(get.get("scheme", "HTTP")).lower(),
                path=path,
                port=port,
                headers={h["name"]: h["value"] for h in get.get("httpHeaders") or []},
            )
        elif "tcpSocket" in probe:
            entry.update(action="tcp", port=self._resolve_port(probe["tcpSocket"].get("port"), where))
        elif "exec" in probe:
            entry.update(
                action="exec", command=[str(a) for a in probe["exec"].get("command") or []], host=None, host_port=None
            )
        elif "grpc" in probe:
            self.notes.append(f"{where}: gRPC probes are not run locally")
            return None
        else:
            raise PodSpecError(f"{where}: no handler (httpGet, tcpSocket, exec)")
        if entry.get("port") is not None:
            given_host = (probe.get("httpGet") or {}).get("host")
            if given_host:
                entry["host"], entry["host_port"] = given_host, entry["port"]
            elif published is not None and entry["port"] == published and self.host_port is not None:
                # Through the published port, as a client on this host reaches it.
                entry["host"] = "127.0.0.1" if self.bind_address in ("0.0.0.0", "::", "") else self.bind_address
                entry["host_port"] = self.host_port
            else:
                # The pod IP, as the kubelet does; the role fills it in from the infra container.
                entry["host"], entry["host_port"] = None, entry["port"]
        return entry

    def _published_port(self) -> int | None:
        if self.publish is not None:
            return self._resolve_port(self.publish, "publish")
        labels = self.template_meta.get("labels") or {}
        for service in self.manifests.of_kind("Service"):
            spec = service.get("spec") or {}
            selector = spec.get("selector") or {}
            if not selector or any(labels.get(k) != v for k, v in selector.items()):
                continue
            for port in spec.get("ports") or []:
                return self._resolve_port(
                    port.get("targetPort", port.get("port")), f"Service {service['metadata'].get('name')}"
                )
        for container in self.spec["containers"]:
            for port in container.get("ports") or []:
                return int(port["containerPort"])
        return None

    def plan(self) -> dict[str, Any]:
        dirs, files, host_paths, how = self._volumes()
        containers_spec = self.spec["containers"]
        init_spec = list(self.spec.get("initContainers") or [])
        # Native sidecars (init containers that keep running) start with, and before, the app containers.
        sidecars = [c for c in init_spec if c.get("restartPolicy") == "Always"]
        init_spec = [c for c in init_spec if c.get("restartPolicy") != "Always"]
        by_name = {c["name"]: c for c in init_spec + sidecars + containers_spec}
        names = [c["name"] for c in init_spec + sidecars + containers_spec]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise PodSpecError(f"container names repeat: {dupes}")
        init = [self._container(c, how, by_name, init=True) for c in init_spec]
        apps = [self._container(c, how, by_name, init=False) for c in sidecars + containers_spec]

        published = self._published_port()
        probes = []
        for container in sidecars + containers_spec:
            for kind in ("startup", "readiness", "liveness"):
                if container.get(f"{kind}Probe"):
                    probe = self._probe(container, kind, container[f"{kind}Probe"], published)
                    if probe:
                        probes.append(probe)

        first = containers_spec[0]
        infra: dict[str, Any] = {
            "name": self.infra_name,
            "image": self.infra_image or first["image"],
            "entrypoint": list(self.infra_command),
            "hostname": self.pod,
            "ipc_mode": "shareable",
            # Nothing to handle SIGTERM in a sleeping PID 1; stopping it is always a kill.
            "stop_signal": "SIGKILL",
            "read_only": True,
            "cap_drop": ["ALL"],
            "security_opts": ["no-new-privileges"],
            "user": "65534:65534",
            "restart_policy": self.restart_policy,
            "pull": self.pull or PULL_POLICY.get(first.get("imagePullPolicy", "IfNotPresent"), "missing"),
        }
        if published is not None and self.host_port is not None:
            bind = self.bind_address
            bind = f"[{bind}]" if ":" in bind else bind
            infra["published_ports"] = [f"{bind}:{int(self.host_port)}:{published}"]
        aliases = {
            name: str(alias["ip"]) for alias in self.spec.get("hostAliases") or [] for name in alias["hostnames"]
        }
        if aliases:
            infra["etc_hosts"] = aliases
        sysctls = {s["name"]: str(s["value"]) for s in self.pod_sc.get("sysctls") or []}
        if sysctls:
            infra["sysctls"] = sysctls

        # A new pod whenever the template, the infra, or data read once at start changes.
        pod_hash = _hash(
            {
                "template": {"metadata": self.template_meta, "spec": self.spec},
                "inputs": self.pod_inputs,
                "infra": infra,
                "state_dir": self.state_dir,
            }
        )
        common = {LABEL_POD: self.pod, LABEL_POD_HASH: pod_hash}
        infra["labels"] = {
            **{str(k): str(v) for k, v in (self.template_meta.get("labels") or {}).items()},
            **common,
            LABEL_ROLE: "infra",
        }
        for entry in init + apps:
            entry["params"]["labels"].update(common)
            spec_hash = _hash({k: v for k, v in entry["params"].items() if k != "labels"})
            entry["params"]["labels"][LABEL_SPEC_HASH] = spec_hash

        if self.redact:
            for item in files:
                if item["secret"]:
                    item["content"] = REDACTED
            for entry in init + apps:
                for name in entry["secret_env"]:
                    entry["params"]["env"][name] = REDACTED

        return {
            "pod": self.pod,
            "namespace": self.namespace,
            "hash": pod_hash,
            "workload": f"{self.workload['kind']}/{self.workload['metadata']['name']}",
            "state_dir": self.state_dir,
            "labels": common,
            "dirs": dirs,
            "files": files,
            "host_paths": host_paths,
            "infra": infra,
            "init_containers": init,
            "containers": apps,
            "probes": probes,
            "published": (
                None
                if published is None or self.host_port is None
                else {"address": self.bind_address, "port": int(self.host_port), "container_port": published}
            ),
            "notes": self.notes,
        }


# ---------------------------------------------------------------------------------------------- filters


def pod_plan(
    manifests: Iterable[Mapping[str, Any]] | Mapping[str, Any],
    state_dir: str,
    pod_name: str | None = None,
    workload: str | None = None,
    namespace: str | None = None,
    host_port: int | None = None,
    bind_address: str = "127.0.0.1",
    publish: int | str | None = None,
    infra_image: str | None = None,
    infra_command: list[str] | None = None,
    restart_policy: str = "unless-stopped",
    pull: str | None = None,
    redact: bool = False,
) -> dict[str, Any]:
    """Plan how to run the one pod that the manifests describe on a Docker engine."""
    if not state_dir:
        raise PodSpecError("pod_plan needs state_dir, the host directory for the pod's volume files")
    # Empty strings mean "not set", so a role can pass its defaults straight through.
    planner = PodPlanner(
        Manifests(copy.deepcopy(manifests)),
        state_dir=str(state_dir),
        pod_name=pod_name or None,
        workload=workload or None,
        namespace=namespace or None,
        host_port=None if host_port in (None, "") else int(host_port),
        bind_address=bind_address or "127.0.0.1",
        publish=None if publish in (None, "") else publish,
        infra_image=infra_image or None,
        infra_command=list(infra_command) if infra_command else None,
        restart_policy=restart_policy or "unless-stopped",
        pull=pull or None,
        redact=bool(redact),
    )
    return planner.plan()


class FilterModule:
    def filters(self):
        return {"pod_plan": pod_plan, "k8s_quantity": k8s_quantity}
