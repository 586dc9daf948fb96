"""Every overlay renders, validates against the Kubernetes schemas and follows STYLE.md;
docker-compose accepts the compose files; YAML is lint-clean."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy import check, manifests, settings_env, tools
from tests.deploy.tools import REPO

OVERLAYS = [path.name for path in manifests.overlays(REPO)]


@pytest.fixture(scope="module")
def rendered(kustomize: list[str]) -> dict[str, list[dict[str, Any]]]:
    return {name: tools.render(kustomize, REPO / "k8s" / "overlays" / name) for name in OVERLAYS}


def test_there_are_dev_and_prod_overlays() -> None:
    assert {"dev", "prod"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_is_valid_kubernetes(overlay: str, rendered: dict[str, list[Any]]) -> None:
    assert manifests.schema_problems(rendered[overlay], where=overlay) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_follows_the_conventions(overlay: str, rendered: dict[str, list[Any]]) -> None:
    assert manifests.convention_problems(rendered[overlay], where=overlay) == []


def test_every_component_is_rendered_by_an_overlay() -> None:
    assert manifests.unused_components(REPO) == []


def test_dev_runs_its_own_backends_and_needs_no_outside_secret(
    rendered: dict[str, list[Any]],
) -> None:
    objects = rendered["dev"]
    kinds = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}

    assert {
        ("StatefulSet", "postgres"),
        ("StatefulSet", "redis"),
        ("StatefulSet", "minio"),
    } <= kinds
    assert [obj for obj in objects if obj["kind"] == "HorizontalPodAutoscaler"] == []
    secrets = {name for kind, name in kinds if kind == "Secret"}
    for workload in manifests.workloads(objects):
        for container in workload.containers:
            for source in container.get("envFrom") or []:
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets


def test_prod_uses_managed_backends_autoscaling_gpu_and_monitoring(
    rendered: dict[str, list[Any]],
) -> None:
    objects = rendered["prod"]
    by_kind: dict[str, dict[str, Any]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj

    assert "StatefulSet" not in by_kind
    assert set(by_kind["HorizontalPodAutoscaler"]) == {"worker", "inference", "inference-worker"}
    assert "ServiceMonitor" in by_kind
    for name in ("inference", "inference-worker"):
        pod = by_kind["Deployment"][name]["spec"]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] and pod["tolerations"]
        assert pod["containers"][0]["image"].endswith("-cu128")
    config = next(iter(by_kind["ConfigMap"].values()))["data"]
    assert config["TESSERA_ENV"] == "production"
    assert not set(config) & settings_env.secret_setting_variables()


def test_secret_template_lists_every_credential() -> None:
    assert manifests.secret_template_problems(REPO) == []


def test_compose_files_are_valid(compose: list[str]) -> None:
    assert check.compose_problems(REPO, compose) == []


def test_yaml_is_lint_clean() -> None:
    assert check.yamllint_problems(REPO) == []
