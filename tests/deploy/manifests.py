"""Rendered Kubernetes objects: valid against the API schemas, and following STYLE.md.

Schemas: `kubernetes-validate`'s strict OpenAPI schemas (unknown fields fail) for the oldest
Kubernetes the manifests support and the newest it ships; custom resources against a small
schema kept in schemas/. Conventions: the same security context (Pod Security "restricted"),
probes and resources on every container, a writable /tmp, and references that resolve.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from tests.deploy.settings_env import (
    is_tessera_image,
    load_yaml_documents,
    rendered_environment_problems,
    secret_template_keys_problems,
)

# The oldest Kubernetes release the manifests claim to support.
OLDEST_KUBERNETES = "1.30.0"
SCHEMAS = Path(__file__).parent / "schemas"

# Secrets that an overlay may reference without rendering them: the operator provides them.
EXTERNAL_SECRETS = {
    "tessera-secrets": "created by the operator from k8s/base/secret.example.yaml",
    "tessera-tls": "the Ingress certificate (cert-manager or by hand)",
}
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")
ALLOWED_VOLUME_TYPES = frozenset(
    {"emptyDir", "persistentVolumeClaim", "configMap", "secret", "projected", "downwardAPI"}
)

Object = dict[str, Any]


def kubernetes_versions() -> list[str]:
    """The oldest supported release and the newest whose schemas are installed."""
    from kubernetes_validate import utils

    return [OLDEST_KUBERNETES, utils.latest_version()]


@cache
def custom_schema(api_version: str, kind: str) -> dict[str, Any] | None:
    """The schema of a custom resource, from schemas/KIND.GROUP-VERSION.json, if we keep one."""
    group, _, version = api_version.rpartition("/")
    path = SCHEMAS / f"{kind.lower()}.{group}-{version}.json"
    return json.loads(path.read_text()) if group and path.is_file() else None


def schema_problems(objects: Iterable[Object], *, where: str) -> list[str]:
    """Each object against the strict schema of each checked Kubernetes version."""
    import jsonschema
    import kubernetes_validate

    problems = []
    for obj in objects:
        name = f"{where}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        custom = custom_schema(str(obj.get("apiVersion", "")), str(obj.get("kind", "")))
        if custom is not None:
            for error in jsonschema.Draft202012Validator(custom).iter_errors(obj):
                path = ".".join(str(part) for part in error.absolute_path)
                problems.append(f"{name}: {path}: {error.message}")
            continue
        for version in kubernetes_versions():
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                path = ".".join(str(part) for part in error.path)
                problems.append(f"{name} (Kubernetes {version}): {path}: {error.message}")
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(
                    f"{name}: no schema for {obj.get('apiVersion')} {obj.get('kind')} in "
                    f"Kubernetes {version}: an API removed there, or a custom resource whose "
                    f"schema belongs in tests/deploy/schemas/"
                )
    return problems


@dataclass(frozen=True)
class Workload:
    kind: str
    name: str
    pod: dict[str, Any]
    labels: dict[str, str]

    @property
    def containers(self) -> list[dict[str, Any]]:
        return list(self.pod.get("initContainers") or []) + list(self.pod["containers"])


def workloads(objects: Iterable[Object]) -> list[Workload]:
    return [
        Workload(
            kind=obj["kind"],
            name=obj["metadata"]["name"],
            pod=obj["spec"]["template"]["spec"],
            labels=obj["spec"]["template"].get("metadata", {}).get("labels", {}),
        )
        for obj in objects
        if obj.get("kind") in WORKLOAD_KINDS
    ]


def convention_problems(objects: list[Object], *, where: str) -> list[str]:
    """Security context, probes, resources, references and env of everything rendered."""
    messages: list[str] = []
    for workload in workloads(objects):
        messages += _workload_problems(workload)
    messages += _reference_problems(objects)
    messages += rendered_environment_problems(objects)
    return [f"{where}: {message}" for message in messages]


def _workload_problems(workload: Workload) -> Iterator[str]:
    name = f"{workload.kind}/{workload.name}"
    pod = workload.pod
    security = pod.get("securityContext") or {}
    if security.get("runAsNonRoot") is not True:
        yield f"{name}: pod securityContext.runAsNonRoot must be true"
    if not security.get("runAsUser"):
        yield f"{name}: pod securityContext.runAsUser must be a non-zero user id"
    if (security.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        yield f"{name}: pod securityContext.seccompProfile.type must be RuntimeDefault"
    if pod.get("automountServiceAccountToken") is not False:
        yield f"{name}: automountServiceAccountToken must be false (no pod calls the API)"
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            yield f"{name}: {flag} is not allowed"
    volumes = {volume["name"]: volume for volume in pod.get("volumes") or []}
    for volume in volumes.values():
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUME_TYPES:
            yield f"{name}: volume {volume['name']} of type {sorted(kinds)} is not allowed"
    for container in workload.containers:
        yield from _container_problems(workload, container, volumes)


def _container_problems(
    workload: Workload, container: dict[str, Any], volumes: dict[str, dict[str, Any]]
) -> Iterator[str]:
    name = f"{workload.kind}/{workload.name} container {container['name']}"
    security = container.get("securityContext") or {}
    if security.get("allowPrivilegeEscalation") is not False:
        yield f"{name}: securityContext.allowPrivilegeEscalation must be false"
    if security.get("privileged"):
        yield f"{name}: securityContext.privileged is not allowed"
    if security.get("readOnlyRootFilesystem") is not True:
        yield f"{name}: securityContext.readOnlyRootFilesystem must be true"
    capabilities = security.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []) or capabilities.get("add"):
        yield f"{name}: securityContext.capabilities must drop ALL and add none"
    resources = container.get("resources") or {}
    for section in ("requests", "limits"):
        for key in ("cpu", "memory"):
            if key not in (resources.get(section) or {}):
                yield f"{name}: resources.{section}.{key} is missing"
    image = container.get("image", "")
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    if "@" not in image and tag in ("", "latest"):
        yield f"{name}: image {image!r} must name a tag (not latest) or a digest"
    tmp = [mount for mount in container.get("volumeMounts") or [] if mount["mountPath"] == "/tmp"]
    if not tmp or "emptyDir" not in volumes.get(tmp[0]["name"], {}):
        yield f"{name}: /tmp must be an emptyDir mount (the root filesystem is read-only)"
    if workload.kind == "Job":
        return
    ports = {port.get("name") for port in container.get("ports") or []}
    if is_tessera_image(image) and "http" in ports:
        if _http_path(container.get("readinessProbe")) != "/readyz":
            yield f"{name}: readinessProbe must GET /readyz"
        if _http_path(container.get("livenessProbe")) != "/healthz":
            yield f"{name}: livenessProbe must GET /healthz"
    elif not container.get("livenessProbe"):
        yield f"{name}: livenessProbe is missing"


def _http_path(probe: dict[str, Any] | None) -> str | None:
    return ((probe or {}).get("httpGet") or {}).get("path")


def _reference_problems(objects: list[Object]) -> Iterator[str]:
    """Services select pods and ports, Ingresses and HPAs name what exists, so do env sources."""
    by_kind: dict[str, dict[str, Object]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    services = by_kind.get("Service", {})
    pods = workloads(objects)
    for name, service in services.items():
        selector = service["spec"].get("selector") or {}
        selected = [w for w in pods if selector and selector.items() <= w.labels.items()]
        if not selected:
            yield f"Service/{name}: its selector {selector} matches no pod template"
            continue
        port_names = {
            port.get("name")
            for workload in selected
            for container in workload.containers
            for port in container.get("ports") or []
        }
        for port in service["spec"]["ports"]:
            target = port.get("targetPort")
            if isinstance(target, str) and target not in port_names:
                yield f"Service/{name}: targetPort {target!r} is no container port of its pods"
    for name, ingress in by_kind.get("Ingress", {}).items():
        yield from _ingress_problems(name, ingress, services, by_kind.get("Secret", {}))
    for name, hpa in by_kind.get("HorizontalPodAutoscaler", {}).items():
        target = hpa["spec"]["scaleTargetRef"]
        scaled = by_kind.get(target["kind"], {}).get(target["name"])
        if scaled is None:
            yield f"HorizontalPodAutoscaler/{name}: {target['kind']}/{target['name']} is missing"
        elif "replicas" in scaled["spec"]:
            yield (
                f"{target['kind']}/{target['name']} sets replicas but is autoscaled: "
                f"each apply would undo the autoscaler's choice"
            )
    for workload in pods:
        for kind, name in _env_sources(workload):
            if name not in by_kind.get(kind, {}) and not (
                kind == "Secret" and name in EXTERNAL_SECRETS
            ):
                yield f"{workload.kind}/{workload.name}: {kind} {name!r} does not exist"


def _ingress_problems(
    name: str, ingress: Object, services: dict[str, Object], secrets: dict[str, Object]
) -> Iterator[str]:
    for rule in ingress["spec"].get("rules", []):
        for path in rule.get("http", {}).get("paths", []):
            backend = path["backend"]["service"]
            service = services.get(backend["name"])
            if service is None:
                yield f"Ingress/{name}: backend Service {backend['name']!r} does not exist"
                continue
            ports = service["spec"]["ports"]
            wanted = backend["port"]
            if not any(
                port.get("name") == wanted.get("name") or port["port"] == wanted.get("number")
                for port in ports
            ):
                yield f"Ingress/{name}: Service {backend['name']} has no port {wanted}"
    for tls in ingress["spec"].get("tls", []):
        secret = tls.get("secretName")
        if secret and secret not in secrets and secret not in EXTERNAL_SECRETS:
            yield f"Ingress/{name}: TLS Secret {secret!r} does not exist"


def _env_sources(workload: Workload) -> Iterator[tuple[str, str]]:
    for container in workload.containers:
        for source in container.get("envFrom") or []:
            if "configMapRef" in source:
                yield "ConfigMap", source["configMapRef"]["name"]
            if "secretRef" in source:
                yield "Secret", source["secretRef"]["name"]
        for variable in container.get("env") or []:
            reference = variable.get("valueFrom") or {}
            if "configMapKeyRef" in reference:
                yield "ConfigMap", reference["configMapKeyRef"]["name"]
            if "secretKeyRef" in reference:
                yield "Secret", reference["secretKeyRef"]["name"]


def overlays(root: Path) -> list[Path]:
    return sorted(path.parent for path in (root / "k8s" / "overlays").glob("*/kustomization.yaml"))


def unused_components(root: Path) -> list[str]:
    """Components that no overlay includes are never rendered, hence never checked."""
    used: set[Path] = set()
    for overlay in overlays(root):
        (kustomization,) = load_yaml_documents(overlay / "kustomization.yaml")
        used.update((overlay / path).resolve() for path in kustomization.get("components") or [])
    return [
        f"k8s/components/{path.parent.name} is used by no overlay, so nothing checks it"
        for path in sorted((root / "k8s" / "components").glob("*/kustomization.yaml"))
        if path.parent.resolve() not in used
    ]


def secret_template_problems(root: Path) -> list[str]:
    """k8s/base/secret.example.yaml: a valid Secret with every credential setting."""
    path = root / "k8s" / "base" / "secret.example.yaml"
    where = str(path.relative_to(root))
    (secret,) = load_yaml_documents(path)
    return schema_problems([secret], where=where) + secret_template_keys_problems(
        secret, where=where
    )
