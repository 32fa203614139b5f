"""deploy/kubernetes renders, validates offline against the Kubernetes schemas and the vendored
CRDs, and keeps its promises: probes run real commands, workers outlast their drain, pods run
unprivileged on a read-only root file system, no secret value is inlined, the autoscalers
watch the right queues."""

from __future__ import annotations

import copy
import ipaddress
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import typer.main
import yaml

from stepfleet.api.settings import ApiSettings
from stepfleet.broker import Topology
from stepfleet.cli.main import app
from stepfleet.workers.settings import Settings
from tests.unit.test_compose import _dockerfile_stages, _last

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
SCHEMAS = DEPLOY / "schemas"
OVERLAYS = ("example", "example-hpa")
BUILDS = ("base", *(f"overlays/{name}" for name in OVERLAYS))
# Kubernetes releases the built-in kinds are validated against: the oldest still commonly run
# and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
# The API's own settings (STEPFLEET_API_*) live in ApiSettings, not the worker's Settings.
API_VARIABLES = {f"API_{name.upper()}" for name in ApiSettings.model_fields}
API_PROBES = {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}
# What the Secret holds; never a ConfigMap or an inline value.
SECRET_VARIABLES = {
    "STEPFLEET_DATABASE_URL",
    "STEPFLEET_AMQP_URL",
    "STEPFLEET_RABBITMQ_ADMIN_URL",
    "STEPFLEET_SECRET_KEY",
    "STEPFLEET_MODULE_CACHE_KEY",
}
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobjects.yaml",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda.sh_triggerauthentications.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
}
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 (what the pods bind)
# `stepfleet drain` gives up this long after the drain grace (stepfleet/cli/orchestrators.py).
DRAIN_MARGIN_SECONDS = 5


# ----------------------------------------------------------------------------------- helpers


def kubectl() -> str:
    """The kubectl `./dev` put into the virtualenv, else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("no kubectl: `./dev check` installs one into .venv/bin")
    return found


@cache
def render(build: str) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize deploy/kubernetes/<build>`, parsed."""
    done = subprocess.run(
        [kubectl(), "kustomize", str(DEPLOY / build)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def of_kind(objects: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_specs(objects: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    """Every workload's pod template spec, by workload name."""
    return {
        o["metadata"]["name"]: o["spec"]["template"]["spec"]
        for o in objects
        if o["kind"] in ("Deployment", "Job")
    }


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(objects: tuple[dict[str, Any], ...], workload: str, name: str) -> dict[str, Any]:
    spec = pod_specs(objects)[workload]
    (found,) = [c for c in containers(spec) if c["name"] == name]
    return found


def environment(objects: tuple[dict[str, Any], ...], box: dict[str, Any]) -> dict[str, str]:
    """A container's environment as Kubernetes builds it: envFrom sources, then env."""
    result: dict[str, str] = {}
    for source in box.get("envFrom", []):
        if "configMapRef" in source:
            data = named(objects, "ConfigMap", source["configMapRef"]["name"]).get("data", {})
        else:
            secrets = [
                s for s in of_kind(objects, "Secret") if s["metadata"]["name"] == source["secretRef"]["name"]
            ]  # fmt: skip
            data = {k: "<secret>" for k in (secrets[0].get("data", {}) if secrets else {})}
        result.update(data)
    for variable in box.get("env", []):
        result[variable["name"]] = variable.get("value", "<from elsewhere>")
    return result


def cli_command(name: str) -> Any:
    """The CLI's command `name` (typer's click command), or None."""
    return typer.main.get_command(app).commands.get(name)  # type: ignore[attr-defined]


def assert_runs_stepfleet(argv: list[str]) -> None:
    """`argv` is `stepfleet <command> [options]` and this CLI parses it."""
    assert argv[0] == "stepfleet", argv
    command = cli_command(argv[1])
    assert command is not None, f"`stepfleet {argv[1]}` is not a command of the CLI"
    command.make_context(f"stepfleet {argv[1]}", list(argv[2:]))  # raises on an unknown option


def strict(schema: Any) -> Any:
    """A CRD's schema as the API server's strict field validation applies it: objects with
    declared properties take no others (unless they preserve unknown fields)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@cache
def crd_schema(file: str) -> dict[str, Any]:
    crd = yaml.safe_load((SCHEMAS / file).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    schema = strict(version["schema"]["openAPIV3Schema"])
    # metadata is the API server's (ObjectMeta), checked with the built-in kinds' schemas.
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def validate_custom(resource: dict[str, Any]) -> None:
    file = CUSTOM_KINDS[(resource["apiVersion"], resource["kind"])]
    jsonschema.Draft7Validator(crd_schema(file)).validate(resource)


def uid(user: str) -> int:
    return int(user.split(":")[0])


# ------------------------------------------------------------------------ rendering, schemas


@pytest.mark.parametrize("build", BUILDS)
def test_every_kustomization_renders(build: str) -> None:
    """`kubectl kustomize` renders the base and each example overlay."""
    kinds = {o["kind"] for o in render(build)}
    assert {"Deployment", "Job", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy"} <= kinds


def test_every_folder_with_a_kustomization_is_rendered_by_the_tests() -> None:
    """Each kustomization is rendered here, and each component is used by an example."""
    found = {p.parent.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("kustomization.yaml")}
    components = {f for f in found if f.startswith("components/")}
    assert found - components - {"overlays/example-common"} == set(BUILDS)
    used = set()
    for overlay in OVERLAYS:
        text = yaml.safe_load((DEPLOY / "overlays" / overlay / "kustomization.yaml").read_text())
        used |= {Path(c).name for c in text.get("components", [])}
    assert {Path(c).name for c in components} == used


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("build", BUILDS)
def test_built_in_kinds_validate_against_the_kubernetes_schemas(build: str, version: str) -> None:
    """Every built-in object passes kubernetes-validate, strict (no unknown fields)."""
    for resource in render(build):
        if (resource["apiVersion"], resource["kind"]) in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(resource, version, strict=True)


@pytest.mark.parametrize("build", BUILDS)
def test_custom_resources_validate_against_the_vendored_crds(build: str) -> None:
    """ScaledObject, TriggerAuthentication and PodMonitor pass their projects' CRD schemas."""
    for resource in render(build):
        if (resource["apiVersion"], resource["kind"]) in CUSTOM_KINDS:
            validate_custom(resource)


def test_the_validators_refuse_broken_objects() -> None:
    """A misspelt field, a wrong type or a missing required field is refused by both
    validators."""
    worker = copy.deepcopy(named(render("base"), "Deployment", "stepfleet-worker"))
    worker["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 50
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, KUBERNETES_VERSIONS[0], strict=True)
    scaled = named(render("overlays/example"), "ScaledObject", "stepfleet-worker")
    for field, value in (("minReplicaCount", "two"), ("pollingIntervall", 15)):
        broken = copy.deepcopy(scaled)
        broken["spec"][field] = value
        with pytest.raises(jsonschema.ValidationError):
            validate_custom(broken)
    broken = copy.deepcopy(scaled)
    del broken["spec"]["scaleTargetRef"]["name"]
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(broken)


def test_vendored_crds_say_where_they_come_from() -> None:
    """Each vendored CRD is listed with its project, tag and commit, and defines its kind."""
    record = (SCHEMAS / "README.md").read_text()
    for (api_version, kind), file in CUSTOM_KINDS.items():
        row = next(line for line in record.splitlines() if f"`{file}`" in line)
        assert re.search(r"\| v\d+\.\d+\.\d+ \| [0-9a-f]{40} \|", row), row
        crd = yaml.safe_load((SCHEMAS / file).read_text())
        assert crd["kind"] == "CustomResourceDefinition"
        assert crd["spec"]["names"]["kind"] == kind
        group, version = api_version.split("/")
        assert crd["spec"]["group"] == group
        assert version in {v["name"] for v in crd["spec"]["versions"]}


# --------------------------------------------------------------------- images and commands


@pytest.mark.parametrize("build", BUILDS)
def test_containers_keep_the_images_entrypoint_and_run_its_commands(build: str) -> None:
    """No container replaces the image's ENTRYPOINT (`stepfleet`); each runs one of its
    commands, and every stepfleet container runs the same image."""
    runtime = _dockerfile_stages()[-1]
    assert _last(runtime, "ENTRYPOINT") == '["stepfleet"]'
    images = set()
    for spec in pod_specs(render(build)).values():
        for box in containers(spec):
            assert "command" not in box, box["name"]
            args = box["args"]
            assert cli_command(args[0]) is not None, args
            if cli_command(args[0]) is not None:
                assert_runs_stepfleet(["stepfleet", *args])
            images.add(box["image"])
    assert len(images) == 1, images
    if build != "base":
        assert images == {"registry.example.com/platform/stepfleet:0.1.0"}


def test_migration_job_runs_migrate_then_declare() -> None:
    """The Job migrates in an init container and declares after it, so a failed migrate
    stops there; failed pods are kept for their logs and retried a bounded number of times."""
    job = named(render("overlays/example"), "Job", "stepfleet-migrate")
    spec = job["spec"]["template"]["spec"]
    assert [c["args"] for c in spec["initContainers"]] == [["migrate"]]
    assert [c["args"] for c in spec["containers"]] == [["declare"]]
    assert spec["restartPolicy"] == "Never"
    assert 0 < job["spec"]["backoffLimit"] <= 10
    assert job["spec"]["activeDeadlineSeconds"] > 0


@pytest.mark.parametrize("workload", ["stepfleet-worker", "stepfleet-api"])
def test_new_pods_wait_for_the_migration(workload: str) -> None:
    """Workers and the API start only once the schema is at their release's head."""
    spec = pod_specs(render("overlays/example"))[workload]
    (init,) = spec["initContainers"]
    assert init["args"][0] == "wait-schema"
    assert_runs_stepfleet(["stepfleet", *init["args"]])


# ----------------------------------------------------------------- probes, drain, rollouts


def test_worker_probes_run_stepfleet_health() -> None:
    """Readiness asks `stepfleet health` (ready, services reached); liveness and startup ask
    `stepfleet health --live`, which a worker without PostgreSQL still passes."""
    worker = container(render("overlays/example"), "stepfleet-worker", "worker")
    readiness = worker["readinessProbe"]["exec"]["command"]
    assert readiness[:2] == ["stepfleet", "health"]
    assert "--live" not in readiness
    for probe in ("livenessProbe", "startupProbe"):
        command = worker[probe]["exec"]["command"]
        assert command[:2] == ["stepfleet", "health"]
        assert "--live" in command
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert_runs_stepfleet(worker[probe]["exec"]["command"])
        # `stepfleet` imports everything before it answers: about 2.5 s on a busy core.
        assert worker[probe]["timeoutSeconds"] >= 5


def test_api_probes_and_port_follow_the_api_contract() -> None:
    """The API listens on 0.0.0.0:8080 and is probed on /readyz (readiness) and /healthz."""
    objects = render("overlays/example")
    api = container(objects, "stepfleet-api", "api")
    env = environment(objects, api)
    assert env["STEPFLEET_API_HOST"] == ALL_INTERFACES
    (port,) = api["ports"]
    assert port["containerPort"] == int(env["STEPFLEET_API_PORT"])
    for probe, path in API_PROBES.items():
        assert api[probe]["httpGet"] == {"path": path, "port": port["name"]}
    service = named(objects, "Service", "stepfleet-api")
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert (
        service["spec"]["selector"]
        == named(objects, "Deployment", "stepfleet-api")["spec"]["selector"]["matchLabels"]
    )


def test_worker_grace_period_outlasts_its_drain() -> None:
    """terminationGracePeriodSeconds exceeds the drain grace plus the pre-stop hook's own
    margin, and the pre-stop hook is `stepfleet drain`, which waits for the drain."""
    objects = render("overlays/example")
    spec = pod_specs(objects)["stepfleet-worker"]
    worker = container(objects, "stepfleet-worker", "worker")
    drain = float(
        environment(objects, worker).get(
            "STEPFLEET_SHUTDOWN_GRACE_SECONDS",
            Settings.model_fields["shutdown_grace_seconds"].default,
        )
    )
    hook = worker["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:2] == ["stepfleet", "drain"]
    assert "--timeout" not in hook  # the default: the drain grace plus the margin
    assert_runs_stepfleet(hook)
    assert spec["terminationGracePeriodSeconds"] > drain + DRAIN_MARGIN_SECONDS


def test_rollouts_never_drop_below_the_desired_count() -> None:
    """Deployments roll with maxUnavailable 0: new pods are ready before old ones drain."""
    for deployment in of_kind(render("overlays/example"), "Deployment"):
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("workload", ["stepfleet-worker", "stepfleet-api"])
def test_disruption_budgets_cover_the_deployments(workload: str) -> None:
    """Each Deployment has a PodDisruptionBudget that selects exactly its pods."""
    objects = render("overlays/example")
    deployment = named(objects, "Deployment", workload)
    budget = named(objects, "PodDisruptionBudget", workload)
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]
    assert budget["spec"].get("maxUnavailable") == 1


# ---------------------------------------------------------------------- security, resources


@pytest.mark.parametrize("build", BUILDS)
def test_pods_run_unprivileged_on_a_read_only_root(build: str) -> None:
    """Every pod runs as the image's non-root user with no token, no privilege escalation, no
    capabilities, the runtime's seccomp profile and a read-only root file system."""
    image_user = uid(_last(_dockerfile_stages()[-1], "USER") or "0")
    assert image_user != 0
    for name, spec in pod_specs(render(build)).items():
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True, name
        assert context["runAsUser"] == image_user, name
        assert context["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        for box in containers(spec):
            own = box["securityContext"]
            assert own["readOnlyRootFilesystem"] is True, box["name"]
            assert own["allowPrivilegeEscalation"] is False, box["name"]
            assert own["capabilities"]["drop"] == ["ALL"], box["name"]
            mounts = {m["mountPath"] for m in box.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{name}/{box['name']} has no writable /tmp"


def _quantity(value: str | int) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "": 1.0}
    number, unit = re.fullmatch(r"([0-9.]+)(m|Ki|Mi|Gi|)", str(value)).groups()  # type: ignore[union-attr]
    return float(number) * units[unit]


def test_worker_writes_only_to_its_volumes() -> None:
    """The module cache and the health file lie on emptyDir volumes (the root is read-only),
    and the cache's volume holds STEPFLEET_MODULE_CACHE_BYTES."""
    objects = render("overlays/example")
    spec = pod_specs(objects)["stepfleet-worker"]
    worker = container(objects, "stepfleet-worker", "worker")
    env = environment(objects, worker)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in worker["volumeMounts"]}

    def volume_of(path: str) -> dict[str, Any]:
        holders = [m for m in mounts if Path(path).is_relative_to(m) and Path(path) != Path(m)]
        assert holders, f"{path} is on the read-only root"
        return mounts[max(holders, key=len)]

    cache_volume = volume_of(env["STEPFLEET_MODULE_CACHE_DIR"])
    assert "emptyDir" in cache_volume
    limit = _quantity(cache_volume["emptyDir"]["sizeLimit"])
    assert limit > int(env["STEPFLEET_MODULE_CACHE_BYTES"])
    assert "emptyDir" in volume_of(env["STEPFLEET_HEALTH_FILE"])


@pytest.mark.parametrize("build", BUILDS)
def test_every_container_has_requests_and_limits(build: str) -> None:
    """CPU and memory requests and limits are set everywhere, limits at least the requests."""
    for spec in pod_specs(render(build)).values():
        for box in containers(spec):
            resources = box["resources"]
            for kind in ("cpu", "memory"):
                request = _quantity(resources["requests"][kind])
                assert 0 < request <= _quantity(resources["limits"][kind]), box["name"]


def test_worker_resources_follow_the_benchmarks() -> None:
    """A worker asks for one core (a busy worker keeps about one busy) and may use a second
    for its guest thread and compiler; its memory limit leaves room for a compiler process."""
    objects = render("overlays/example")
    resources = container(objects, "stepfleet-worker", "worker")["resources"]
    assert _quantity(resources["requests"]["cpu"]) == 1
    assert _quantity(resources["limits"]["cpu"]) >= 1
    compiler = Settings.model_fields["compile_memory_bytes"].default
    assert _quantity(resources["limits"]["memory"]) > compiler


# ------------------------------------------------------------------------- secrets, settings


@pytest.mark.parametrize("build", BUILDS)
def test_no_secret_value_is_inlined(build: str) -> None:
    """Secret settings come only from the Secret: no ConfigMap or env value holds one, and no
    URL with a password appears outside it."""
    objects = render(build)
    password_in_url = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
    for config in of_kind(objects, "ConfigMap"):
        data = config.get("data", {})
        assert not SECRET_VARIABLES & data.keys()
        assert not any(password_in_url.search(v) for v in data.values())
    for spec in pod_specs(objects).values():
        for box in containers(spec):
            for variable in box.get("env", []):
                assert variable["name"] not in SECRET_VARIABLES, variable
                assert not password_in_url.search(variable.get("value", ""))
            assert any("secretRef" in source for source in box["envFrom"]), box["name"]
    for resource in objects:
        if resource["kind"] != "Secret":
            assert not password_in_url.search(yaml.safe_dump(resource)), resource["kind"]


def test_the_base_has_no_secret_and_the_example_only_placeholders() -> None:
    """The base defines no Secret; the examples' Secret holds placeholders, never a password."""
    assert of_kind(render("base"), "Secret") == []
    import base64

    for overlay in OVERLAYS:
        (secret,) = of_kind(render(f"overlays/{overlay}"), "Secret")
        data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        assert {"STEPFLEET_DATABASE_URL", "STEPFLEET_AMQP_URL"} <= data.keys() <= SECRET_VARIABLES
        for value in data.values():
            assert "CHANGE-ME" in value, value


@pytest.mark.parametrize("build", BUILDS)
def test_stepfleet_variables_are_settings(build: str) -> None:
    """Every STEPFLEET_* variable set names a setting of the workers or of the API."""
    fields = {name.upper() for name in Settings.model_fields} | API_VARIABLES
    objects = render(build)
    names: set[str] = set()
    for config in of_kind(objects, "ConfigMap") + of_kind(objects, "Secret"):
        names |= set(config.get("data", {}))
    for spec in pod_specs(objects).values():
        for box in containers(spec):
            names |= {v["name"] for v in box.get("env", [])}
    assert names
    for name in names:
        assert name.startswith("STEPFLEET_"), name
        assert name.removeprefix("STEPFLEET_") in fields, name


def test_the_example_settings_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's environment in the example, Secret included, builds valid Settings."""
    import base64

    objects = render("overlays/example")
    worker = container(objects, "stepfleet-worker", "worker")
    env = {k: v for k, v in environment(objects, worker).items() if v != "<secret>"}
    (secret,) = of_kind(objects, "Secret")
    env |= {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    for variable in Settings.model_fields:
        monkeypatch.delenv("STEPFLEET_" + variable.upper(), raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    config = Settings()
    assert config.database_url.startswith("postgresql+psycopg://")
    assert config.module_cache_dir == Path(env["STEPFLEET_MODULE_CACHE_DIR"])


@pytest.mark.parametrize("build", BUILDS)
def test_every_workload_shares_the_topology_settings(build: str) -> None:
    """Migration, workers and API read one ConfigMap and one Secret (prefix, lanes, URLs)."""
    objects = render(build)
    sources = set()
    for spec in pod_specs(objects).values():
        for box in containers(spec):
            sources.add(tuple(sorted(str(s) for s in box["envFrom"])))
    assert len(sources) == 1, sources


# ------------------------------------------------------------------------------ network


def _selects(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    wanted = policy["spec"]["podSelector"].get("matchLabels", {})
    return all(labels.get(k) == v for k, v in wanted.items())


def _egress_ports(objects: tuple[dict[str, Any], ...], labels: dict[str, str]) -> set[Any]:
    ports: set[Any] = set()
    for policy in of_kind(objects, "NetworkPolicy"):
        if _selects(policy, labels):
            for rule in policy["spec"].get("egress", []):
                ports |= {p["port"] for p in rule.get("ports", [])}
    return ports


def test_network_policies_deny_by_default() -> None:
    """A policy selects every stepfleet pod for both directions with no rule of its own."""
    objects = render("overlays/example")
    denying = [
        p
        for p in of_kind(objects, "NetworkPolicy")
        if set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert denying
    for spec_owner in of_kind(objects, "Deployment") + of_kind(objects, "Job"):
        labels = spec_owner["spec"]["template"]["metadata"]["labels"]
        assert any(_selects(p, labels) for p in denying), spec_owner["metadata"]["name"]


def test_only_workers_reach_the_egress_targets() -> None:
    """Workers may open HTTPS and HTTP to public addresses (not private, link-local or the
    metadata service); the API and the migration only reach DNS, PostgreSQL and RabbitMQ."""
    objects = render("overlays/example")
    workloads = {
        o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
        for o in objects
        if o["kind"] in ("Deployment", "Job")
    }
    for name, labels in workloads.items():
        ports = _egress_ports(objects, labels)
        assert {53, 5432, 5672, 15672} <= ports, name
        if name == "stepfleet-worker":
            assert {443, 80} <= ports
        else:
            assert not {443, 80} & ports, name
    worker_labels = workloads["stepfleet-worker"]
    for policy in of_kind(objects, "NetworkPolicy"):
        if not _selects(policy, worker_labels):
            continue
        for rule in policy["spec"].get("egress", []):
            for peer in rule.get("to", []):
                block = peer["ipBlock"]
                network = ipaddress.ip_network(block["cidr"])
                closed = [ipaddress.ip_network(c) for c in block.get("except", [])]
                metadata = ipaddress.ip_address(
                    "169.254.169.254" if network.version == 4 else "fe80::1"
                )
                assert any(metadata in c for c in closed), block
                private = ipaddress.ip_address("10.1.2.3" if network.version == 4 else "fd00::1")
                assert any(private in c for c in closed), block


def test_metrics_and_api_ports_are_the_only_ways_in() -> None:
    """Ingress is allowed to the workers' metrics port and the API's HTTP port only."""
    objects = render("overlays/example")
    opened = set()
    for policy in of_kind(objects, "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            component = policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
            opened |= {(component, p["port"]) for p in rule["ports"]}
    assert opened == {("worker", "metrics"), ("api", "http")}


# ------------------------------------------------------------------ autoscaling, scraping


def _topology(objects: tuple[dict[str, Any], ...]) -> Topology:
    worker = container(objects, "stepfleet-worker", "worker")
    env = environment(objects, worker)
    return Topology(prefix=env["STEPFLEET_PREFIX"], lanes=int(env["STEPFLEET_LANES"]))


def test_keda_scales_workers_on_the_lanes_length() -> None:
    """The ScaledObject sums the messages of exactly the lanes the workers consume (not the
    dead-letter queue), through the management API, with a floor of workers above zero."""
    objects = render("overlays/example")
    scaled = named(objects, "ScaledObject", "stepfleet-worker")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "stepfleet-worker"
    named(objects, "Deployment", spec["scaleTargetRef"]["name"])
    # Workers alone fire the timers kept in PostgreSQL: never zero.
    assert spec["minReplicaCount"] >= 2
    assert spec["maxReplicaCount"] > spec["minReplicaCount"]
    assert spec["cooldownPeriod"] > 0
    assert (
        spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
            "stabilizationWindowSeconds"
        ]
        >= 60
    )
    (rabbit,) = [t for t in spec["triggers"] if t["type"] == "rabbitmq"]
    meta = rabbit["metadata"]
    assert meta["mode"] == "QueueLength"
    assert int(meta["value"]) > 0
    assert meta["useRegex"] == "true"
    assert meta["protocol"] == "http"  # regular expressions need the management API
    assert meta["operation"] == "sum"
    topology = _topology(objects)
    pattern = re.compile(meta["queueName"])
    for lane in topology.work_queues + topology.side_queues:
        assert pattern.fullmatch(lane), lane
    for other in (
        topology.dead_letter_queue,
        f"{topology.prefix}.side",
        f"{topology.prefix}.work.x",
        f"other{topology.prefix}.work.0",
        f"{topology.prefix}.work.0.extra",
    ):
        # KEDA hands the expression to the management API, which searches with it.
        assert not pattern.search(other), other


def test_keda_reads_rabbitmq_through_the_secret() -> None:
    """The trigger's host comes from the Secret's management URL, by reference."""
    objects = render("overlays/example")
    scaled = named(objects, "ScaledObject", "stepfleet-worker")
    (rabbit,) = [t for t in scaled["spec"]["triggers"] if t["type"] == "rabbitmq"]
    assert "host" not in rabbit["metadata"]
    auth = named(objects, "TriggerAuthentication", rabbit["authenticationRef"]["name"])
    (reference,) = auth["spec"]["secretTargetRef"]
    assert reference["parameter"] == "host"
    (secret,) = of_kind(objects, "Secret")
    assert reference["name"] == secret["metadata"]["name"]
    assert reference["key"] == "STEPFLEET_RABBITMQ_ADMIN_URL"
    assert reference["key"] in secret["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_autoscaler_owns_the_worker_count(overlay: str) -> None:
    """Each example has exactly one autoscaler for the workers, and leaves their replica
    count to it; the base, with none, fixes it."""
    objects = render(f"overlays/{overlay}")
    scalers = of_kind(objects, "ScaledObject") + of_kind(objects, "HorizontalPodAutoscaler")
    assert len(scalers) == 1
    assert "replicas" not in named(objects, "Deployment", "stepfleet-worker")["spec"]
    assert named(render("base"), "Deployment", "stepfleet-worker")["spec"]["replicas"] >= 2


def test_the_hpa_alternative_scales_workers_on_cpu() -> None:
    """Without KEDA, a HorizontalPodAutoscaler scales the workers on CPU, never below two."""
    objects = render("overlays/example-hpa")
    hpa = named(objects, "HorizontalPodAutoscaler", "stepfleet-worker")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "stepfleet-worker"
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100


@pytest.mark.parametrize("build", BUILDS)
def test_worker_metrics_are_scraped(build: str) -> None:
    """Worker pods carry the prometheus.io annotations for their metrics port, which is the
    port STEPFLEET_METRICS_PORT opens; the PodMonitor scrapes the same port."""
    objects = render(build)
    worker = named(objects, "Deployment", "stepfleet-worker")
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    box = container(objects, "stepfleet-worker", "worker")
    (port,) = [p for p in box["ports"] if p["name"] == "metrics"]
    env = environment(objects, box)
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == port["containerPort"]
    assert int(env["STEPFLEET_METRICS_PORT"]) == port["containerPort"]
    assert env["STEPFLEET_METRICS_HOST"] == ALL_INTERFACES
    for monitor in of_kind(objects, "PodMonitor"):
        assert (
            monitor["spec"]["selector"]["matchLabels"] == worker["spec"]["selector"]["matchLabels"]
        )
        assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_the_images_default_module_cache_is_where_the_manifests_mount_it() -> None:
    """The image's XDG_CACHE_HOME puts the default cache where the worker's volume is."""
    runtime = _dockerfile_stages()[-1]
    env = " ".join(arguments for name, arguments in runtime if name == "ENV")
    (cache_home,) = re.findall(r"\bXDG_CACHE_HOME=(\S+)", env)
    objects = render("overlays/example")
    configured = environment(objects, container(objects, "stepfleet-worker", "worker"))
    assert Path(cache_home) / "stepfleet" / "modules" == Path(
        configured["STEPFLEET_MODULE_CACHE_DIR"]
    )
