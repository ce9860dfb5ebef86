"""Dockerfile, docker-compose.yml and the Docker commands of docs/deploy.md, checked without Docker.

Images are not built in CI. Instead every container command is parsed by the parser that would run it
(movierec's argparse parser, mlflow's click command), and volumes, ports, build arguments and the install
step are checked for consistency.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from movierec.cli import build_parser
from movierec.data.registry import RELEASES

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCS = ROOT / "docs" / "deploy.md"
SERVICES = {"mlflow", "prepare", "train", "serve"}

VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^${}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}` (nested), with `env` as the environment."""

    def one(match: re.Match) -> str:
        name, op, default = match.groups()
        if op is None:
            assert name in env, f"${{{name}}} has no default in the compose file"
            return env[name]
        if op == ":-":
            return env.get(name) or default
        return env.get(name, default)

    while VARIABLE.search(text):
        text = VARIABLE.sub(one, text)
    assert "$" not in text, f"uninterpolated {text!r}"
    return text


def resolve(value, env: dict[str, str]):
    if isinstance(value, str):
        return interpolate(value, env)
    if isinstance(value, list):
        return [resolve(v, env) for v in value]
    if isinstance(value, dict):
        return {k: resolve(v, env) for k, v in value.items()}
    return value


def load_compose(*files: Path, env: dict[str, str] | None = None) -> dict:
    """The compose files merged as `docker compose -f a -f b` does (services deep-merged), interpolated."""
    merged: dict = {}
    for file in files:
        merged = _merge(merged, yaml.safe_load(file.read_text()))
    return resolve(merged, env or {})


def _merge(base, override):
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = _merge(base[key], value) if key in base else value
        return out
    return override


def option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def check_mlflow_command(argv: list[str]) -> dict:
    """Parse `mlflow <sub> ...` with mlflow's own click command; returns the parsed options."""
    from mlflow.cli import cli

    assert argv[0] == "mlflow"
    sub = cli.get_command(None, argv[1])
    assert sub is not None, f"mlflow has no command {argv[1]!r}"
    return sub.make_context(argv[1], list(argv[2:])).params


def check_movierec_command(argv: list[str]):
    assert argv[0] == "movierec", argv
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse exits on an invalid command line
        pytest.fail(f"not a valid movierec command: {shlex.join(argv)} (exit {exc.code})")


def volume_mounts(service: dict) -> dict[str, str]:
    """container path -> named volume."""
    mounts = {}
    for spec in service.get("volumes", []):
        source, target, *_ = spec.split(":")
        mounts[target] = source
    return mounts


def volume_of(service: dict, path: str) -> str | None:
    for target, source in volume_mounts(service).items():
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return source
    return None


ENVIRONMENTS = [{}, {"DATASET": "ml-20m", "RUN_NAME": "ml-20m-sasrec", "TRAIN_CONFIG": "configs/ml-1m-sasrec.yaml"}]


@pytest.fixture(params=range(len(ENVIRONMENTS)), ids=["defaults", "overridden"])
def compose(request) -> dict:
    return load_compose(COMPOSE, env=ENVIRONMENTS[request.param])


# --------------------------------------------------------------------------- docker-compose.yml


def test_every_service_command_parses_with_the_real_parser(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        command = service["command"]
        assert isinstance(command, list) and "entrypoint" not in service, name
        if command[0] == "movierec":
            args = check_movierec_command(command)
            assert args.command == name, f"service {name} runs `movierec {args.command}`"
        else:
            assert name == "mlflow" and command[:2] == ["mlflow", "server"]
            check_mlflow_command(command)
    # the one image, built from this Dockerfile
    assert {s["image"] for s in services.values()} == {"movierec:cpu"}
    assert all(s["build"]["context"] == "." for s in services.values())


def test_prepare_writes_what_train_reads_and_train_writes_what_serve_reads(compose):
    services = compose["services"]
    prepare = check_movierec_command(services["prepare"]["command"])
    train = check_movierec_command(services["train"]["command"])
    serve = check_movierec_command(services["serve"]["command"])
    assert prepare.dataset in RELEASES, f"{prepare.dataset} is not a MovieLens release `prepare` can download"
    assert Path(train.data) == prepare.out / prepare.dataset  # prepare writes OUT/NAME/{training,...}
    assert volume_of(services["prepare"], str(prepare.out)) == volume_of(services["train"], train.data) == "data"
    assert volume_of(services["prepare"], str(prepare.data_home)) == "data"  # the download cache persists
    assert (ROOT / train.config).is_file()
    assert volume_of(services["train"], train.run_dir) == "runs"
    assert serve.model == train.run_dir and volume_of(services["serve"], serve.model) == "runs"
    # the serving model reads its dataset (titles, histories) at the path training recorded
    assert volume_of(services["serve"], train.data) == "data"


def test_volumes_are_named_and_declared(compose):
    declared = set(compose["volumes"])
    used = set()
    for name, service in compose["services"].items():
        for target, source in volume_mounts(service).items():
            assert not source.startswith((".", "/", "~")), f"{name}: bind mount {source}; use a named volume"
            assert target.startswith("/"), f"{name}: {target}"
            used.add(source)
    assert used == declared == {"mlflow", "data", "runs"}


def test_ports_are_published_on_localhost_and_match_the_commands(compose):
    services = compose["services"]
    published = {}
    for name, service in services.items():
        for spec in service.get("ports", []):
            host_ip, host_port, container_port = str(spec).split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {spec} beyond localhost"
            published[name] = (int(host_port), int(container_port))
    assert set(published) == {"mlflow", "serve"}
    mlflow = check_mlflow_command(services["mlflow"]["command"])
    assert published["mlflow"][1] == mlflow["port"] and mlflow["host"] == "0.0.0.0"
    serve = check_movierec_command(services["serve"]["command"])
    assert published["serve"][1] == serve.port and serve.host == "0.0.0.0"


def test_train_and_serve_track_against_the_mlflow_service(compose):
    from mlflow.server.security_utils import is_allowed_host_header

    services = compose["services"]
    mlflow = check_mlflow_command(services["mlflow"]["command"])
    allowed = [h.strip() for h in mlflow["allowed_hosts"].split(",")]
    for name in ("train", "serve"):
        uri = urlparse(services[name]["environment"]["MLFLOW_TRACKING_URI"])
        assert (uri.scheme, uri.hostname, uri.port) == ("http", "mlflow", mlflow["port"]), name
        assert is_allowed_host_header(allowed, uri.netloc), f"the server would refuse Host {uri.netloc}"
        assert services[name]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert is_allowed_host_header(allowed, f"127.0.0.1:{mlflow['port']}")  # the browser on the host
    # the backend store and the artifacts live in the mlflow volume
    backend = mlflow["backend_store_uri"]
    assert backend.startswith("sqlite:////")
    assert volume_of(services["mlflow"], backend.removeprefix("sqlite:///")) == "mlflow"
    assert volume_of(services["mlflow"], mlflow["artifacts_destination"]) == "mlflow"
    assert mlflow["serve_artifacts"]  # train uploads and serve downloads artifacts through the server
    health = services["mlflow"]["healthcheck"]["test"]
    assert f"localhost:{mlflow['port']}/health" in " ".join(health)
    # only the server starts with a bare `docker compose up`; the jobs and serve run when asked for
    assert "profiles" not in services["mlflow"]
    assert all(services[name].get("profiles") for name in ("prepare", "train", "serve"))


def test_gpu_override_reserves_a_gpu_for_train_with_a_cuda_image():
    override = yaml.safe_load(COMPOSE_GPU.read_text())
    assert set(override["services"]) == {"train", "train-ddp"}
    merged = load_compose(COMPOSE, COMPOSE_GPU)
    train = merged["services"]["train"]
    devices = train["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert train["build"]["args"]["BASE_IMAGE"].startswith("nvidia/cuda:")
    assert train["image"] != "movierec:cpu"
    check_movierec_command(train["command"])  # unchanged command, same checks as above
    assert merged["services"]["mlflow"]["image"] == "movierec:cpu"


def test_gpu_override_has_a_torchrun_service_on_every_gpu():
    from torch.distributed.run import get_args_parser

    merged = load_compose(COMPOSE, COMPOSE_GPU)
    service = merged["services"]["train-ddp"]
    command = service["command"]
    assert command[0] == "torchrun"
    launcher = get_args_parser().parse_args(command[1:])  # torchrun's own parser
    assert launcher.standalone and launcher.nproc_per_node == "gpu" and launcher.module
    assert launcher.training_script == "movierec"
    train = check_movierec_command(["movierec", *launcher.training_script_args])
    assert train.command == "train"
    assert volume_of(service, train.data) == "data" and volume_of(service, train.run_dir) == "runs"
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "all"
    assert (
        service["environment"]["MLFLOW_TRACKING_URI"]
        == merged["services"]["train"]["environment"]["MLFLOW_TRACKING_URI"]
    )


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    assert not current, "a continuation line runs off the end of the Dockerfile"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerfile_args() -> dict[str, str]:
    args = {}
    for instruction, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if instruction == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args


def test_dockerfile_base_image_is_a_build_argument_and_cmd_prints_help():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    froms = [rest for instruction, rest in instructions if instruction == "FROM"]
    assert froms == ["${BASE_IMAGE}"]
    first_from = [i for i, _ in instructions].index("FROM")
    assert ("ARG", "BASE_IMAGE=python:3.11-slim") in instructions[:first_from]  # CPU by default
    cmd = [rest for instruction, rest in instructions if instruction == "CMD"]
    assert len(cmd) == 1 and json.loads(cmd[0]) == ["movierec", "--help"]
    assert not any(instruction == "ENTRYPOINT" for instruction, _ in instructions)
    # every build argument the compose files pass is declared
    declared = dockerfile_args()
    for file in (COMPOSE, COMPOSE_GPU):
        for service in load_compose(file)["services"].values():
            assert set(service.get("build", {}).get("args", {})) <= set(declared), file.name
    # and the default command works
    result = subprocess.run([sys.executable, "-m", "movierec.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "export" in result.stdout and "train" in result.stdout


def test_dockerfile_installs_with_the_readme_and_makefile_command():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    workdir = [rest for instruction, rest in instructions if instruction == "WORKDIR"][-1]
    runs = [rest for instruction, rest in instructions if instruction == "RUN"]
    makefile = (ROOT / "Makefile").read_text()
    venv = re.search(r"^VENV\s*:?=\s*(\S+)", makefile, re.M).group(1)
    bin_dir = re.search(r"^BIN\s*:?=\s*(\S+)", makefile, re.M).group(1).replace("$(VENV)", venv)
    target = f"{bin_dir}/movierec"
    # the Makefile target that `make run` and `make test` depend on, and its install command
    recipe = re.search(r"^\$\(BIN\)/movierec:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe and "pip install" in recipe.group(1) and "-e '.[dev]'" in recipe.group(1)
    assert re.search(r"^run: \$\(BIN\)/movierec", makefile, re.M) and re.search(
        r"^test: \$\(BIN\)/movierec", makefile, re.M
    )
    assert any(re.search(rf"\bmake {re.escape(target)}\b", run) for run in runs), f"no RUN with `make {target}`"
    assert "make run" in (ROOT / "README.md").read_text()  # the README installs through the same target
    env = " ".join(rest for instruction, rest in instructions if instruction == "ENV")
    assert f"PATH={workdir}/{bin_dir}:$PATH" in env
    copies = [rest for instruction, rest in instructions if instruction == "COPY"]
    assert copies == [". ."]


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's matching, simplified: patterns are relative to the context root; `**` spans folders."""

    def regex(pattern: str) -> re.Pattern:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    return any(regex(p.strip("/")).match(prefix) for p in patterns for prefix in prefixes)


def test_dockerignore_keeps_local_state_out_and_the_source_in():
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and line[0] != "#"
    ]
    assert not any(p.startswith("!") for p in patterns)
    for local in (".venv", "data", "runs", "mlflow.db", "mlartifacts", ".venv/bin/python", "runs/quickstart/run"):
        assert dockerignored(local, patterns), f"{local} would be copied into the image"
    needed = ["pyproject.toml", "README.md", "Makefile", "configs/ml-1m-sse-pt.yaml", "configs/ml-1m-sasrec.yaml"]
    needed += [str(p.relative_to(ROOT)) for p in (ROOT / "src").rglob("*.py")]
    assert "src/movierec/data/prepare.py" in needed
    for path in needed:
        assert not dockerignored(path, patterns), f"{path} is needed by the build but .dockerignore drops it"


# --------------------------------------------------------------------------- docs/deploy.md


def documented_commands() -> list[str]:
    text = DOCS.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def split_env(tokens: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while tokens and re.fullmatch(r"[A-Z_]+=.*", tokens[0]):
        name, _, value = tokens.pop(0).partition("=")
        env[name] = value
    return env, tokens


def test_docs_say_images_are_not_built_in_ci():
    assert "not built in CI" in DOCS.read_text()


def test_documented_docker_commands_name_real_services_and_build_args():
    compose_text = COMPOSE.read_text()
    docker = [c for c in documented_commands() if "docker" in c.split()[:4]]
    assert len(docker) >= 8
    for line in documented_commands():
        env, tokens = split_env(shlex.split(line))
        assert tokens[0] in ("docker", "movierec", "mlflow"), f"docs/deploy.md: unchecked command {line!r}"
        if tokens[0] == "movierec":
            check_movierec_command(tokens)
            continue
        if tokens[0] == "mlflow":
            check_mlflow_command(tokens)
            continue
        for name in env:
            assert f"${{{name}" in compose_text, f"{name} is not a variable of docker-compose.yml"
        if tokens[1] == "build":
            args = [tokens[i + 1] for i, t in enumerate(tokens) if t == "--build-arg"]
            assert {a.partition("=")[0] for a in args} <= set(dockerfile_args())
            assert tokens[-1] == "." and "-t" in tokens
            continue
        if tokens[1] == "run":
            assert tokens[2] == "--rm" and tokens[3] == "movierec:cpu" and len(tokens) == 4  # the default CMD
            continue
        assert tokens[1] == "compose", line
        rest, files = tokens[2:], []
        while rest[0] == "-f":
            files.append(ROOT / rest[1])
            rest = rest[2:]
        merged = load_compose(*(files or [COMPOSE]), env=env)
        sub, *rest = rest
        assert sub in ("build", "up", "run"), line
        while rest and rest[0].startswith("-"):
            assert rest.pop(0) in ("-d", "--rm"), line
        if sub == "run":
            service, *command = rest
            assert service in merged["services"], line
            if command:
                check_movierec_command(command)
        else:
            assert set(rest) <= set(merged["services"]), line
        # with this line's environment the services' commands are still valid
        for service in merged["services"].values():
            if service["command"][0] == "movierec":
                check_movierec_command(service["command"])
