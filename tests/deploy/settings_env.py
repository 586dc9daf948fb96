"""The environment variables the deployment files set are exactly the settings the code reads.

The list of settings comes from `Settings.model_fields`, so a setting added to
shared/tessera/config.py is checked at once: .env.example must list it, docker-compose.yml
must pass it, and a `TESSERA_*` name that is not a setting (a typo) fails wherever it appears.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tessera.config import Settings
from tessera.worker_metrics import MULTIPROC_ENV

ENV_EXAMPLE = ".env.example"
# Variables of docker-compose.yml itself, listed in .env.example but not Tessera settings.
COMPOSE_VARIABLES = frozenset({"POSTGRES_PASSWORD", "TORCH_VARIANT"})
# Not settings but read from the environment by the code: the workers' metrics folder.
LIBRARY_VARIABLES = frozenset({MULTIPROC_ENV})
# Settings whose values are credentials (besides SecretStr fields): only ever in a Secret.
CREDENTIAL_URL_SETTINGS = frozenset({"database_url", "redis_url"})

SETTING_NAME = re.compile(r"\bTESSERA_[A-Z0-9_]*[A-Z0-9]\b")
ENV_LINE = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=")
COMPOSE_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


def setting_variables() -> set[str]:
    """Every `TESSERA_*` variable that Settings reads."""
    return {f"TESSERA_{name.upper()}" for name in Settings.model_fields}


def secret_setting_variables() -> set[str]:
    """Settings that hold credentials: SecretStr fields and URLs that carry passwords."""
    names = {
        name
        for name, field in Settings.model_fields.items()
        if "SecretStr" in str(field.annotation) or name in CREDENTIAL_URL_SETTINGS
    }
    return {f"TESSERA_{name.upper()}" for name in names}


def is_tessera_image(image: str) -> bool:
    """Whether an image reference names a Tessera image (any registry, any tag)."""
    repository = image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]
    return repository.startswith("tessera")


def load_yaml_documents(path: Path) -> list[Any]:
    with path.open() as stream:
        return [document for document in yaml.safe_load_all(stream) if document is not None]


def deployment_text_files(root: Path) -> list[Path]:
    """Files that name settings: compose, .env.example, Dockerfile, k8s/, the operator guide."""
    files = [root / ENV_EXAMPLE, root / "Dockerfile", root / "docs" / "deploy.md"]
    files += sorted(root.glob("docker-compose*.yml"))
    files += sorted((root / "k8s").rglob("*.yaml"))
    return [path for path in files if path.is_file()]


def unknown_setting_mentions(root: Path) -> list[str]:
    """`TESSERA_*` names in the deployment files that are not settings, as file:line."""
    known = setting_variables()
    problems = []
    for path in deployment_text_files(root):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for name in SETTING_NAME.findall(line):
                if name not in known:
                    where = f"{path.relative_to(root)}:{number}"
                    problems.append(f"{where}: {name} is not a setting of tessera.config.Settings")
    return problems


def env_example_variables(root: Path) -> dict[str, int]:
    """Variables .env.example lists (set or commented out), with their line numbers."""
    lines = (root / ENV_EXAMPLE).read_text().splitlines()
    return {
        match.group(2): number
        for number, line in enumerate(lines, start=1)
        if (match := ENV_LINE.match(line))
    }


def env_example_problems(root: Path) -> list[str]:
    """.env.example lists every setting, each under a comment, and nothing unexplained."""
    lines = (root / ENV_EXAMPLE).read_text().splitlines()
    listed = env_example_variables(root)
    problems = []
    for name, number in listed.items():
        above = lines[number - 2] if number > 1 else ""
        if not above.startswith("#") or ENV_LINE.match(above) or above.startswith("# ---"):
            problems.append(f"{ENV_EXAMPLE}:{number}: {name} has no comment line of its own")
    settings = setting_variables()
    for name in sorted(settings - listed.keys()):
        problems.append(
            f"{ENV_EXAMPLE}: setting {name} is not listed; add it under a comment "
            f"(commented out, with its default, if it is optional)"
        )
    for name, number in sorted(listed.items()):
        if name not in settings and name not in COMPOSE_VARIABLES:
            problems.append(
                f"{ENV_EXAMPLE}:{number}: {name} is neither a setting nor a variable of "
                f"docker-compose.yml ({', '.join(sorted(COMPOSE_VARIABLES))})"
            )
    return problems


def compose_environment_problems(root: Path) -> list[str]:
    """Every Tessera service in compose gets each setting and only settings."""
    settings = setting_variables()
    listed = env_example_variables(root)
    problems = []
    for path in sorted(root.glob("docker-compose*.yml")):
        for name in sorted(set(COMPOSE_REFERENCE.findall(path.read_text())) - listed.keys()):
            problems.append(f"{path.name}: ${{{name}}} is used but {ENV_EXAMPLE} does not list it")
        (document,) = load_yaml_documents(path)
        for service, spec in (document.get("services") or {}).items():
            environment = spec.get("environment")
            if not is_tessera_image(str(spec.get("image", ""))) or environment is None:
                continue
            names = set(_compose_env_names(environment))
            for name in sorted(names - settings - LIBRARY_VARIABLES):
                problems.append(f"{path.name}: service {service} sets {name}, not a setting")
            if path.name != "docker-compose.yml":
                continue  # override files add to the main file's environment
            for name in sorted(settings - names):
                problems.append(
                    f"{path.name}: service {service} does not pass {name}; add `{name}:` "
                    f"to x-tessera-environment (empty: passed through from .env when set)"
                )
    return problems


def _compose_env_names(environment: dict[str, Any] | list[str]) -> Iterator[str]:
    if isinstance(environment, dict):
        yield from environment
    else:
        for entry in environment:
            yield entry.split("=", 1)[0]


def rendered_environment_problems(objects: list[dict[str, Any]]) -> Iterator[str]:
    """Rendered Kubernetes objects: Tessera containers get settings only, credentials only
    from Secrets."""
    settings = setting_variables()
    credentials = secret_setting_variables()
    by_name = {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}
    for obj in objects:
        if obj["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        for container in obj["spec"]["template"]["spec"]["containers"]:
            if not is_tessera_image(container.get("image", "")):
                continue
            where = f"{obj['kind']}/{obj['metadata']['name']} container {container['name']}"
            for variable in container.get("env") or []:
                if variable["name"] not in settings | LIBRARY_VARIABLES:
                    yield f"{where}: env {variable['name']} is not a setting"
            for source in container.get("envFrom") or []:
                for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if key not in source:
                        continue
                    name = source[key]["name"]
                    referenced = by_name.get((kind, name)) or {}
                    keys = set(referenced.get("data") or {}) | set(
                        referenced.get("stringData") or {}
                    )
                    for unknown in sorted(keys - settings):
                        yield f"{kind}/{name} (read by {where}): {unknown} is not a setting"
                    if kind == "ConfigMap":
                        for secret in sorted(keys & credentials):
                            yield f"ConfigMap/{name}: {secret} is a credential: put it in a Secret"


def secret_template_keys_problems(secret: dict[str, Any], *, where: str) -> list[str]:
    """The Secret template holds settings only, and every credential setting."""
    keys = set(secret.get("stringData") or {}) | set(secret.get("data") or {})
    problems = [f"{where}: {key} is not a setting" for key in sorted(keys - setting_variables())]
    problems += [
        f"{where}: credential setting {key} is missing"
        for key in sorted(secret_setting_variables() - keys)
    ]
    return problems
