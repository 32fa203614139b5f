from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from stepfleet.api.settings import ApiSettings
from stepfleet.workers.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"

ENV_PREFIX = "STEPFLEET_"
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?err}, ${NAME?err}, ${NAME:+alt}
_REFERENCE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}")


# ----------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file, parsed (YAML anchors and merge keys resolved)."""
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services section of the compose file."""
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping, whichever of the two compose forms it uses."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (item.split("=", 1) if "=" in item else (item, "") for item in raw)
        return {key: value for key, value in pairs}
    return {str(key): "" if value is None else str(value) for key, value in raw.items()}


def _interpolate(value: str) -> str:
    """Expand ${NAME:-default} the way compose does when NAME is unset (no .env file)."""
    return _REFERENCE.sub(lambda m: m["arg"] if m["op"] in ("-", ":-") else "", value).replace(
        "$$", "$"
    )


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """A service's dependencies mapped to their condition (short form means service_started)."""
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return dict.fromkeys(raw, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in raw.items()}


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return value.split() if isinstance(value, str) else list(value)


def _seconds(duration: str) -> float:
    """Parse a compose duration such as 40s, 1m30s or 500ms."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(duration))
    assert parts, f"not a duration: {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments), continuations joined."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    stages: list[list[tuple[str, str]]] = []
    for entry in logical:
        instruction, _, arguments = entry.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def _last(stage: list[tuple[str, str]], instruction: str) -> str | None:
    found = [arguments for name, arguments in stage if name == instruction]
    return found[-1] if found else None


# ------------------------------------------------------------------------------------- tests


def test_the_four_services_exist(services: dict[str, dict[str, Any]]) -> None:
    """The compose file defines rabbitmq, postgres, migrate and worker."""
    assert {"rabbitmq", "postgres", "migrate", "worker"} <= services.keys()


def test_compose_file_has_no_version_key(compose: dict[str, Any]) -> None:
    """The file follows the Compose spec, which has no top-level version key."""
    assert "version" not in compose


def test_worker_can_be_scaled(services: dict[str, dict[str, Any]]) -> None:
    """The worker has no fixed container name and publishes no ports, so --scale works."""
    worker = services["worker"]
    assert "container_name" not in worker
    assert not worker.get("ports")
    assert "network_mode" not in worker


def test_worker_starts_after_migrate_completes(services: dict[str, dict[str, Any]]) -> None:
    """Workers start only once the migrate one-shot has exited successfully."""
    assert _depends_on(services["worker"]).get("migrate") == "service_completed_successfully"


def test_migrate_waits_for_healthy_broker_and_database(
    services: dict[str, dict[str, Any]],
) -> None:
    """Migrate starts only once RabbitMQ and PostgreSQL report healthy."""
    depends = _depends_on(services["migrate"])
    assert depends.get("rabbitmq") == "service_healthy"
    assert depends.get("postgres") == "service_healthy"


def test_migrate_is_a_one_shot(services: dict[str, dict[str, Any]]) -> None:
    """Migrate is never restarted, so service_completed_successfully can be reached."""
    assert services["migrate"].get("restart", "no") == "no"


@pytest.mark.parametrize("name", ["rabbitmq", "postgres"])
def test_broker_and_database_have_healthchecks(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    """RabbitMQ and PostgreSQL define an enabled healthcheck with a real test command."""
    check = services[name].get("healthcheck")
    assert check, f"{name} has no healthcheck"
    assert not check.get("disable", False)
    test = _as_list(check["test"])
    assert test
    assert test[0] in ("CMD", "CMD-SHELL")
    assert len(test) > 1


def test_healthchecks_use_the_services_own_tools(services: dict[str, dict[str, Any]]) -> None:
    """RabbitMQ is checked with rabbitmq-diagnostics and PostgreSQL with pg_isready."""
    assert "rabbitmq-diagnostics" in _as_list(services["rabbitmq"]["healthcheck"]["test"])
    assert "pg_isready" in _as_list(services["postgres"]["healthcheck"]["test"])


def test_stepfleet_variables_are_settings_fields(services: dict[str, dict[str, Any]]) -> None:
    """Every STEPFLEET_* variable a service sets names a field of Settings (or, STEPFLEET_API_*,
    of ApiSettings)."""
    fields = {name.upper() for name in Settings.model_fields}
    fields |= {f"API_{name.upper()}" for name in ApiSettings.model_fields}
    seen = 0
    for name, service in services.items():
        for variable in _environment(service):
            if variable.startswith(ENV_PREFIX):
                seen += 1
                field = variable.removeprefix(ENV_PREFIX)
                assert field in fields, f"{name}: {variable} is not a Settings field"
    assert seen, "no service sets any STEPFLEET_* variable"


def test_variables_all_have_defaults() -> None:
    """Every ${VAR} in the compose file has a default, so it runs without a .env file."""
    text = COMPOSE_FILE.read_text()
    for match in _REFERENCE.finditer(text):
        assert match["op"] in ("-", ":-"), f"${{{match['name']}}} has no default"


@pytest.mark.parametrize("name", ["migrate", "worker", "api"])
def test_default_environment_builds_valid_settings(
    services: dict[str, dict[str, Any]], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every variable at its default, the service's environment validates as Settings."""
    for variable in list(Settings.model_fields):
        monkeypatch.delenv(ENV_PREFIX + variable.upper(), raising=False)
    environment = {k: _interpolate(v) for k, v in _environment(services[name]).items()}
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    config = Settings()
    assert config.database_url == environment["STEPFLEET_DATABASE_URL"]
    assert config.amqp_url == environment["STEPFLEET_AMQP_URL"]


def test_services_share_broker_and_database_settings(
    services: dict[str, dict[str, Any]],
) -> None:
    """Migrate and worker agree on the URLs, prefix and delivery limit that shape the topology."""
    migrate, worker = _environment(services["migrate"]), _environment(services["worker"])
    for variable in ("DATABASE_URL", "AMQP_URL", "PREFIX", "DELIVERY_LIMIT"):
        assert migrate.get(ENV_PREFIX + variable) == worker.get(ENV_PREFIX + variable), variable


def test_database_url_points_at_the_postgres_service(
    services: dict[str, dict[str, Any]],
) -> None:
    """The database URL uses the psycopg driver and the postgres service's password and db."""
    postgres = _environment(services["postgres"])
    for name in ("migrate", "worker"):
        raw = _environment(services[name])["STEPFLEET_DATABASE_URL"]
        assert raw.startswith("postgresql+psycopg://"), raw
        url = urlsplit(_interpolate(raw))
        assert url.hostname == "postgres"
        assert (url.port or 5432) == 5432
        assert url.username == postgres.get("POSTGRES_USER", "postgres")
        # Compare the unexpanded text, so an overridden POSTGRES_PASSWORD still matches.
        assert f":{postgres['POSTGRES_PASSWORD']}@" in raw
        assert url.path.lstrip("/") == postgres.get("POSTGRES_DB", url.username)


def test_amqp_url_uses_the_brokers_own_user(services: dict[str, dict[str, Any]]) -> None:
    """The AMQP URL reaches the rabbitmq service with its defined user, never guest."""
    rabbitmq = _environment(services["rabbitmq"])
    user, password = rabbitmq["RABBITMQ_DEFAULT_USER"], rabbitmq["RABBITMQ_DEFAULT_PASS"]
    for name in ("migrate", "worker"):
        raw = _environment(services[name])["STEPFLEET_AMQP_URL"]
        assert raw.startswith("amqp://"), raw
        assert f"//{user}:{password}@" in raw
        url = urlsplit(_interpolate(raw))
        assert url.hostname == "rabbitmq"
        assert (url.port or 5672) == 5672
        assert url.username != "guest"


def test_broker_keeps_its_data_in_a_named_volume(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    """RabbitMQ and PostgreSQL store their data in named volumes declared at top level."""
    declared = compose.get("volumes") or {}
    for name, target in (
        ("rabbitmq", "/var/lib/rabbitmq"),
        ("postgres", "/var/lib/postgresql/data"),
    ):
        mounts = [str(v).split(":") for v in services[name].get("volumes", [])]
        sources = [m[0] for m in mounts if len(m) >= 2 and m[1] == target]
        assert sources, f"{name} has no volume at {target}"
        assert sources[0] in declared, f"{name}: {sources[0]} is not a named volume"


def test_worker_outlasts_its_shutdown_grace(services: dict[str, dict[str, Any]]) -> None:
    """The worker's stop_grace_period is longer than the drain it performs on SIGTERM."""
    worker = services["worker"]
    environment = {k: _interpolate(v) for k, v in _environment(worker).items()}
    drain = float(
        environment.get(
            "STEPFLEET_SHUTDOWN_GRACE_SECONDS",
            Settings.model_fields["shutdown_grace_seconds"].default,
        )
    )
    assert _seconds(worker.get("stop_grace_period", "10s")) > drain


def test_worker_and_migrate_use_the_same_image(services: dict[str, dict[str, Any]]) -> None:
    """Worker and migrate run the same image, built from this repository's Dockerfile."""
    worker, migrate = services["worker"], services["migrate"]
    assert worker.get("image") == migrate.get("image")
    assert worker.get("build") == migrate.get("build")
    build = worker["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (ROOT / context / dockerfile).resolve() == DOCKERFILE


def test_migrate_runs_migrate_then_declare(services: dict[str, dict[str, Any]]) -> None:
    """The migrate one-shot runs `stepfleet migrate` and then, only if it worked, `declare`."""
    migrate = services["migrate"]
    entrypoint = _as_list(migrate.get("entrypoint")) or ["stepfleet"]
    line = " ".join(entrypoint + _as_list(migrate.get("command")))
    first = line.find("stepfleet migrate")
    second = line.find("stepfleet declare")
    assert first != -1, line
    assert second > first, line
    assert "&&" in line[first:second], "declare must not run after a failed migrate"


def test_worker_runs_the_worker_command(services: dict[str, dict[str, Any]]) -> None:
    """The worker service keeps the image's entrypoint and runs `worker`."""
    worker = services["worker"]
    assert "entrypoint" not in worker
    assert _as_list(worker.get("command")) in ([], ["worker"])


def test_dockerfile_entrypoint_is_the_console_script() -> None:
    """The image's ENTRYPOINT is `stepfleet`, a console script pyproject declares."""
    runtime = _dockerfile_stages()[-1]
    entrypoint = _last(runtime, "ENTRYPOINT")
    assert entrypoint is not None
    assert json.loads(entrypoint) == ["stepfleet"]
    cmd = _last(runtime, "CMD")
    assert cmd is not None
    assert json.loads(cmd) == ["worker"]
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    assert scripts.get("stepfleet") == "stepfleet.cli.main:main"


def test_runtime_image_is_unprivileged_and_unbuffered() -> None:
    """The runtime stage runs as a non-root user with PYTHONUNBUFFERED=1."""
    stages = _dockerfile_stages()
    assert len(stages) >= 2, "the Dockerfile should be multi-stage"
    runtime = stages[-1]
    user = _last(runtime, "USER")
    assert user is not None
    assert user.split(":")[0] not in ("root", "0")
    env = " ".join(arguments for name, arguments in runtime if name == "ENV")
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", env)


def test_dockerfile_bakes_in_no_stepfleet_settings() -> None:
    """No STEPFLEET_* setting (URLs with passwords in particular) is baked into the image."""
    for stage in _dockerfile_stages():
        for name, arguments in stage:
            if name in ("ENV", "ARG"):
                assert ENV_PREFIX not in arguments, arguments


def test_builder_copies_everything_the_wheel_build_reads() -> None:
    """The builder stage copies every path the hatchling build reads, none of them ignored."""
    project = tomllib.loads(PYPROJECT.read_text())
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= set(wheel.get("packages", []))
    needed |= set(wheel.get("force-include", {}))
    builder = _dockerfile_stages()[0]
    copied: set[str] = set()
    for name, arguments in builder:
        if name == "COPY":
            sources = [a for a in arguments.split() if not a.startswith("--")][:-1]
            copied |= {s.rstrip("/").removeprefix("./") for s in sources}
    assert needed <= copied, f"not copied: {sorted(needed - copied)}"
    ignored = {
        line.strip().rstrip("/").removeprefix("./")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    assert not needed & ignored, f".dockerignore excludes {sorted(needed & ignored)}"


def _ignored_by_dockerignore(path: str) -> bool:
    """Whether a context path (or a folder above it) matches a .dockerignore pattern."""
    patterns = [
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "!"))
    ]
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.removeprefix("**/"))
        for pattern in patterns
        for prefix in prefixes
    )


def test_every_copied_path_is_in_the_build_context() -> None:
    """Each path a COPY takes from the build context exists and is not dockerignored."""
    seen = 0
    for stage in _dockerfile_stages():
        for name, arguments in stage:
            if name != "COPY" or "--from=" in arguments:
                continue
            for source in [a for a in arguments.split() if not a.startswith("--")][:-1]:
                seen += 1
                relative = source.removeprefix("./").rstrip("/")
                assert (ROOT / relative).exists(), f"COPY {source}: missing"
                assert not _ignored_by_dockerignore(relative), f"COPY {source}: dockerignored"
    assert seen


def test_dockerignore_keeps_heavy_and_secret_paths_out() -> None:
    """The build context leaves out the virtualenv, git, caches, node_modules, bench results, .env."""
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip()}
    for pattern in (".venv", ".git", "**/node_modules", "bench/results", "**/__pycache__", ".env"):
        assert pattern in ignored, pattern


def test_rabbitmq_enables_the_plugins_the_fleet_needs(services):
    """The lanes exchange type and the management API (tenant users) are enabled."""
    mounts = [str(v) for v in services["rabbitmq"]["volumes"]]
    plugin_mount = next(m for m in mounts if m.endswith(":/etc/rabbitmq/enabled_plugins:ro"))
    source = ROOT / plugin_mount.split(":")[0]
    plugins = source.read_text()
    assert "rabbitmq_consistent_hash_exchange" in plugins
    assert "rabbitmq_management" in plugins
    assert plugins.strip().endswith("].")


def test_worker_healthcheck_is_stepfleet_health(services):
    """The worker is healthy when `stepfleet health` says so (ready, services reached)."""
    test = _as_list(services["worker"]["healthcheck"]["test"])
    assert test[:3] == ["CMD", "stepfleet", "health"]


# ------------------------------------------------------------------ the API and observability

DEPLOY = ROOT / "deploy"
METRICS = {
    "stepfleet_deliveries_total",
    "stepfleet_steps_total",
    "stepfleet_step_phase_seconds",
    "stepfleet_batch_size",
    "stepfleet_dead_letters_total",
    "stepfleet_outbox_waiting",
    "stepfleet_timer_lateness_seconds",
    "stepfleet_http_calls_in_flight",
}


def test_api_serves_on_all_addresses_of_its_container(services, monkeypatch):
    """The api service runs `stepfleet api` on the image, listening on 0.0.0.0:8080, published
    on the host's loopback only, after migrate, with the fleet's own settings."""
    api = services["api"]
    assert _as_list(api.get("command")) == ["api"]
    assert api.get("image") == services["worker"].get("image")
    assert _depends_on(api).get("migrate") == "service_completed_successfully"
    environment = {k: _interpolate(v) for k, v in _environment(api).items()}
    for variable in list(ApiSettings.model_fields):
        monkeypatch.delenv("STEPFLEET_API_" + variable.upper(), raising=False)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    settings = ApiSettings()
    assert settings.host == "0.0.0.0"  # noqa: S104 (inside its container)
    assert settings.port == 8080
    ports = [_interpolate(str(p)) for p in api.get("ports", [])]
    assert ports == ["127.0.0.1:8080:8080"]
    worker = _environment(services["worker"])
    for variable in ("DATABASE_URL", "AMQP_URL", "PREFIX", "DELIVERY_LIMIT"):
        assert environment[ENV_PREFIX + variable] == _interpolate(worker[ENV_PREFIX + variable])


def test_api_healthcheck_asks_healthz(services):
    """The api container is healthy while GET /healthz on its own port answers."""
    check = services["api"]["healthcheck"]
    test = _as_list(check["test"])
    assert test[0] == "CMD"
    assert "http://127.0.0.1:8080/healthz" in " ".join(test)


def test_observability_is_an_optional_profile(services):
    """Prometheus and Grafana start only with --profile observability; nothing else needs them."""
    for name in ("prometheus", "grafana"):
        assert services[name].get("profiles") == ["observability"], name
    for name, service in services.items():
        if name not in ("prometheus", "grafana"):
            assert not service.get("profiles"), name
            assert not {"prometheus", "grafana"} & set(_depends_on(service)), name


def _mounted(service: dict[str, Any], target: str) -> Path:
    for volume in service.get("volumes", []):
        source, _, rest = str(volume).partition(":")
        if rest.split(":")[0] == target:
            return (ROOT / source).resolve()
    raise AssertionError(f"nothing is mounted at {target}")


def test_prometheus_scrapes_every_worker(services):
    """Prometheus's configuration is mounted from deploy/ and finds the workers by the compose
    service name, so every replica is scraped."""
    config_file = _mounted(services["prometheus"], "/etc/prometheus/prometheus.yml")
    assert config_file.is_relative_to(DEPLOY)
    config = yaml.safe_load(config_file.read_text())
    [job] = config["scrape_configs"]
    [sd] = job["dns_sd_configs"]
    assert sd["names"] == ["worker"]
    assert isinstance(sd["port"], int)


def test_grafana_is_provisioned_with_the_dashboard(services):
    """Grafana gets its Prometheus data source and the stepfleet dashboard from deploy/grafana,
    and the dashboard charts every metric the workers export."""
    grafana = services["grafana"]
    provisioning = _mounted(grafana, "/etc/grafana/provisioning")
    dashboards = _mounted(grafana, "/var/lib/grafana/dashboards")
    assert provisioning == (DEPLOY / "grafana" / "provisioning").resolve()
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "stepfleet.yml").read_text())[
        "providers"
    ]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((dashboards / "stepfleet.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = set(re.findall(r"stepfleet_[a-z_]+", " ".join(expressions)))
    used = {re.sub(r"_(bucket|count|sum)$", "", name) for name in used}
    assert used == METRICS
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
