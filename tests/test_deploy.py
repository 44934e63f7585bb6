"""Static checks of the deployment files in deploy/ (and the build context's .dockerignore).

No Docker engine, cluster or systemd is needed: the files are parsed and checked against what
they promise operators (non-root, read-only config, no private key in the image, probes on the
admin port, a hardened unit) and against each other (ports, paths, the config they share). The
container config itself is loaded with `load_config` and run through `cohortgate check`.

kubernetes.yaml is parsed with ruamel.yaml, which mitmproxy (a runtime dependency) brings.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from cohortgate.config import Config
from cohortgate.config import load_config
from cohortgate.config import parse_config
from cohortgate.keys import init_keys
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"  # the build context is the repository root
CONTAINER_TOML = DEPLOY / "cohortgate.container.toml"
KUBERNETES = DEPLOY / "kubernetes.yaml"
UNIT = DEPLOY / "cohortgate.service"

CONFIG_PATH = "/etc/cohortgate/cohortgate.toml"
JWKS_PATH = "/etc/cohortgate/keys/jwks.json"
STATE_DIR = "/var/lib/cohortgate"
ANY_ADDRESS = "0.0.0.0"  # noqa: S104 (what the pod's config listens on; nothing binds here)


# --------------------------------------------------------------------------- helpers


def container_config() -> Config:
    return load_config(CONTAINER_TOML)


def effective(cfg: Config) -> Config:
    """A config without the file it came from, to compare two sources of one policy."""
    return dataclasses.replace(cfg, source=None)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = (pending + stripped).strip()
        pending = ""
        name, _, args = whole.partition(" ")
        instructions.append((name.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The instructions split at each FROM (each list starts with its FROM)."""
    result: list[list[tuple[str, str]]] = []
    for name, args in instructions:
        if name == "FROM":
            result.append([])
        assert result, f"{name} before the first FROM"
        result[-1].append((name, args))
    return result


def exec_form(args: str) -> list[str]:
    """The JSON (exec) form of ENTRYPOINT, CMD or HEALTHCHECK CMD."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def copy_sources(args: str) -> list[str]:
    """The sources of a COPY/ADD (flags such as --from and --chown dropped)."""
    words = [w for w in args.split() if not w.startswith("--")]
    if args.lstrip().startswith("["):
        words = exec_form(args)
    return words[:-1]


def dockerignore_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex over slash-separated context paths."""
    pattern = pattern.strip("/")
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def in_build_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker sends `path`: the last matching rule wins; a rule matching a parent
    directory matches everything under it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for exclude, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            included = not exclude
    return included


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        rules.append((exclude, dockerignore_pattern(line.removeprefix("!"))))
    return rules


def kubernetes_documents() -> list[dict[str, Any]]:
    loaded: Any = list(YAML(typ="safe", pure=True).load_all(KUBERNETES.read_text()))
    documents = [d for d in loaded if d is not None]
    assert all(isinstance(d, dict) for d in documents)
    return documents


def one(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in documents
             if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def containers(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    pod = one(documents, "Deployment")["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["containers"]}


def gate_container(documents: list[dict[str, Any]]) -> dict[str, Any]:
    found = [c for c in containers(documents).values() if c.get("args", [])[:1] == ["serve"]]
    assert len(found) == 1, "exactly one container runs `cohortgate serve`"
    return found[0]


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port, named or numbered, as a number."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert port in named, f"port {port!r} is not declared by {container['name']}"
    number: int = named[port]
    return number


def unit_entries() -> dict[str, list[tuple[str, str]]]:
    """systemd's format: [Section] headers, Key=Value lines (keys may repeat), # comments."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None, f"{line!r} before any section"
        key, eq, value = line.partition("=")
        assert eq, f"not Key=Value: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(section: str, key: str) -> list[str]:
    return [v for k, v in unit_entries().get(section, []) if k == key]


def unit_value(section: str, key: str) -> str:
    values = unit_values(section, key)
    assert len(values) == 1, f"[{section}] {key}= appears {len(values)} times"
    return values[0]


@pytest.fixture
def pointed_at_tmp(tmp_path: Path) -> Path:
    """A copy of the container config with its paths moved under tmp_path, and a fresh
    trust store there; every other line of the file is unchanged."""
    _, jwks = init_keys(tmp_path / "keys")
    text = CONTAINER_TOML.read_text()
    jwks_value, state_prefix = f'"{JWKS_PATH}"', f'"{STATE_DIR}/'
    assert text.count(jwks_value) == 1 and text.count(state_prefix) == 1
    text = text.replace(jwks_value, f'"{jwks}"').replace(state_prefix, f'"{tmp_path}/state/')
    moved = tmp_path / "cohortgate.toml"
    moved.write_text(text)
    return moved


# --------------------------------------------------------------------------- the config


def test_container_config_is_valid_and_laid_out_for_the_image() -> None:
    cfg = container_config()  # every key known and valid, or ConfigError
    assert cfg.upstream == "http://127.0.0.1:8000"
    assert cfg.listen == (ANY_ADDRESS, 8080)
    assert cfg.admin_listen == (ANY_ADDRESS, 9090)
    assert cfg.authority.jwks == JWKS_PATH
    assert cfg.revocation.file.parent == Path(STATE_DIR)
    assert cfg.log.decisions is None  # "-": standard output, for the log collector
    assert cfg.tls_cert is None and cfg.tls_key is None


def test_container_config_uses_absolute_paths_only() -> None:
    data = tomllib.loads(CONTAINER_TOML.read_text())
    assert Path(data["authority"]["jwks"]).is_absolute()
    assert Path(data["revocation"]["file"]).is_absolute()
    assert data["log"]["decisions"] == "-"


def test_cohortgate_check_passes_on_the_container_config(pointed_at_tmp: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "cohortgate.cli", "check", "--config",
                           str(pointed_at_tmp)], capture_output=True, text=True, timeout=120,
                          check=False, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "trust store: 1 key(s)" in done.stdout
    assert "decisions     - (standard output)" in done.stdout


def test_cohortgate_check_fails_without_a_trust_store(
        pointed_at_tmp: Path, tmp_path: Path) -> None:
    """The control for the test above: the same config with the keys gone is refused."""
    (tmp_path / "keys" / "jwks.json").unlink()
    done = subprocess.run([sys.executable, "-m", "cohortgate.cli", "check", "--config",
                           str(pointed_at_tmp)], capture_output=True, text=True, timeout=120,
                          check=False, cwd=REPO)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "jwks.json" in done.stderr


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_bases_are_python_312_slim_pinned_by_tag() -> None:
    named: set[str] = set()
    for stage in stages(dockerfile_instructions(DOCKERFILE.read_text())):
        words = stage[0][1].split()
        image = words[0]
        if len(words) >= 3 and words[1].upper() == "AS":
            named.add(words[2])
        if image in named:
            continue
        pinned = r"python:3\.12(\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]{64})?"
        assert re.fullmatch(pinned, image), image


def test_dockerfile_runs_as_a_fixed_non_root_uid() -> None:
    final = stages(dockerfile_instructions(DOCKERFILE.read_text()))[-1]
    users = [args for name, args in final if name == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) != 0, f"USER {users[-1]}: want a fixed, non-zero UID"
    assert not group or (group.isdigit() and int(group) != 0)
    # nothing after USER switches back
    names = [name for name, _ in final]
    assert "USER" not in names[names.index("USER") + 1 :]


def test_dockerfile_runs_cohortgate_serve_with_the_mounted_config() -> None:
    final = dict(stages(dockerfile_instructions(DOCKERFILE.read_text()))[-1])
    assert exec_form(final["ENTRYPOINT"]) == ["cohortgate"]
    assert exec_form(final["CMD"]) == ["serve", "--config", CONFIG_PATH]


def test_dockerfile_copies_no_private_key_material() -> None:
    for name, args in dockerfile_instructions(DOCKERFILE.read_text()):
        assert name != "ADD", "use COPY: ADD fetches URLs and unpacks archives"
        if name != "COPY" or "--from=" in args:
            continue
        for source in copy_sources(args):
            assert source not in (".", "./", "*"), "COPY of the whole context"
            assert not re.search(r"(^|/)keys(/|$)|\.pem$|\.key$|private", source), source


def test_dockerfile_installs_the_project_without_test_extras() -> None:
    runs = " ".join(args for name, args in dockerfile_instructions(DOCKERFILE.read_text())
                    if name == "RUN")
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", runs), runs
    assert "[test]" not in runs


def test_dockerfile_environment_ports_and_healthcheck_match_the_config() -> None:
    cfg = container_config()
    final = stages(dockerfile_instructions(DOCKERFILE.read_text()))[-1]
    env = " ".join(args for name, args in final if name == "ENV")
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", env)
    assert re.search(r"\bTMPDIR=/tmp\b", env)
    exposed = {int(p.split("/")[0]) for name, args in final if name == "EXPOSE"
               for p in args.split()}
    assert exposed == {cfg.listen[1], cfg.admin_listen[1]}
    healthchecks = [args for name, args in final if name == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    command = healthchecks[0].split(" CMD ", 1)[1]
    assert exec_form(command)[0].endswith("python")  # no curl in the slim image
    assert f"http://127.0.0.1:{cfg.admin_listen[1]}/healthz" in env  # the URL it reads
    volumes = " ".join(args for name, args in final if name == "VOLUME")
    assert str(cfg.revocation.file.parent) in volumes


def test_the_build_context_holds_what_the_build_copies_and_no_keys() -> None:
    rules = dockerignore_rules()
    assert rules[0] == (True, dockerignore_pattern("*")), ".dockerignore is an allowlist"
    for name, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if name == "COPY" and "--from=" not in args:
            for source in copy_sources(args):
                assert in_build_context(source.rstrip("/"), rules), f"{source} is ignored"
    for path in ("pyproject.toml", "README.md", "addons/cohortgate/cli.py",
                 "addons/cohortgate/limiter/bucket.lua"):
        assert in_build_context(path, rules), path
    for path in ("keys/office.pem", "keys/jwks.json", "keys/private/k.pem", "addons/x.pem",
                 "addons/cohortgate/__pycache__/cli.cpython-312.pyc", "logs/decisions.jsonl",
                 "config/revocations.json", ".git/config", ".venv/bin/python", "demo-run/a",
                 "tests/test_gate.py", "tls.key"):
        assert not in_build_context(path, rules), path


# --------------------------------------------------------------------------- Kubernetes


def test_kubernetes_manifest_parses_into_the_expected_objects() -> None:
    documents = kubernetes_documents()
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in documents)
    assert [k for k, _ in kinds] == ["ConfigMap", "ConfigMap", "Deployment", "Service"]
    for document in documents:
        assert document["apiVersion"] in ("v1", "apps/v1")
    text = KUBERNETES.read_text()
    assert "PRIVATE KEY" not in text
    assert not any(d["kind"] == "Secret" for d in documents)


def test_kubernetes_configmap_holds_the_container_policy() -> None:
    documents = kubernetes_documents()
    toml = one(documents, "ConfigMap", "cohortgate-config")["data"]["cohortgate.toml"]
    embedded = parse_config(tomllib.loads(toml), file="kubernetes.yaml")
    assert effective(embedded) == effective(container_config())


def test_kubernetes_trust_store_configmap_holds_public_keys_only() -> None:
    jwks = json.loads(one(kubernetes_documents(), "ConfigMap", "cohortgate-jwks")
                      ["data"]["jwks.json"])
    assert isinstance(jwks["keys"], list)
    for key in jwks["keys"]:
        assert not {"d", "p", "q", "dp", "dq", "qi", "k"} & set(key), "private JWK members"


def test_kubernetes_gate_container_is_locked_down() -> None:
    gate = gate_container(kubernetes_documents())
    sc = gate["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    resources = gate["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]


def test_kubernetes_gate_mounts_config_read_only_and_tmp_and_state_writable() -> None:
    documents = kubernetes_documents()
    cfg = container_config()
    gate = gate_container(documents)
    assert gate["args"] == ["serve", "--config", CONFIG_PATH]
    volumes = {v["name"]: v for v in
               one(documents, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in gate["volumeMounts"]}
    assert all("subPath" not in m for m in mounts.values()), "subPath mounts never update"

    etc = mounts["/etc/cohortgate"]
    assert etc["readOnly"] is True
    projected = {(s["configMap"]["name"], item["key"]): item["path"]
                 for s in volumes[etc["name"]]["projected"]["sources"]
                 for item in s["configMap"]["items"]}
    assert "/etc/cohortgate/" + projected[("cohortgate-config", "cohortgate.toml")] == CONFIG_PATH
    assert "/etc/cohortgate/" + projected[("cohortgate-jwks", "jwks.json")] == cfg.authority.jwks

    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    state = mounts[str(cfg.revocation.file.parent)]
    assert not state.get("readOnly", False)
    assert "emptyDir" in volumes[state["name"]]


def test_kubernetes_probes_use_the_admin_port() -> None:
    documents = kubernetes_documents()
    cfg = container_config()
    gate = gate_container(documents)
    readiness, liveness = gate["readinessProbe"]["httpGet"], gate["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz"
    assert liveness["path"] == "/healthz"
    for probe in (readiness, liveness):
        assert port_number(gate, probe["port"]) == cfg.admin_listen[1]
    for container in containers(documents).values():
        assert "readinessProbe" in container and "livenessProbe" in container, container["name"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_kubernetes_model_server_is_only_reachable_inside_the_pod() -> None:
    documents = kubernetes_documents()
    cfg = container_config()
    gate = gate_container(documents)
    others = [c for c in containers(documents).values() if c is not gate]
    assert len(others) == 1
    model = others[0]
    assert model["image"].startswith("vllm/vllm-openai")
    assert "ports" not in model
    args = " ".join(model["args"])
    upstream_port = int(cfg.upstream.rsplit(":", 1)[1])
    assert "--host=127.0.0.1" in args and f"--port={upstream_port}" in args


def test_kubernetes_service_exposes_only_the_proxy_port() -> None:
    documents = kubernetes_documents()
    cfg = container_config()
    gate = gate_container(documents)
    service = one(documents, "Service")
    pod_labels = one(documents, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    targets = [port_number(gate, p.get("targetPort", p["port"]))
               for p in service["spec"]["ports"]]
    assert targets == [cfg.listen[1]]


# --------------------------------------------------------------------------- systemd


def test_systemd_unit_runs_serve_as_a_dedicated_user() -> None:
    user = unit_value("Service", "User")
    assert user and user not in ("root", "0")
    exec_start = unit_value("Service", "ExecStart").split()
    assert exec_start[0].startswith("/") and exec_start[0].endswith("/bin/cohortgate")
    assert exec_start[1:] == ["serve", "--config", CONFIG_PATH]
    assert unit_value("Service", "Restart") == "on-failure"
    assert not unit_values("Service", "ExecReload"), "files hot-reload: no reload command"
    assert unit_value("Install", "WantedBy") == "multi-user.target"


def test_systemd_unit_is_hardened() -> None:
    assert unit_value("Service", "NoNewPrivileges") == "yes"
    assert unit_value("Service", "ProtectSystem") == "strict"
    assert unit_value("Service", "ProtectHome") == "yes"
    assert unit_value("Service", "PrivateTmp") == "yes"
    assert unit_value("Service", "CapabilityBoundingSet") == ""
    assert unit_value("Service", "AmbientCapabilities") == ""
    writable = unit_value("Service", "ReadWritePaths").split()
    assert str(container_config().revocation.file.parent) in writable
    assert "/var/log/cohortgate" in writable
