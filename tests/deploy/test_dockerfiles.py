"""deploy/docker/*.Dockerfile and .dockerignore, read as Docker reads them (no image is built here: base images
cannot be pulled on these machines).

The invariants: multi-stage with the compiler left in the build stage, pinned base images, a numeric non-root
USER (1337 for the sidecar, which iptables exempts; 10001 for the control plane), iptables in the sidecar's
image, entrypoints that are console scripts of the package, and a build context that holds what
``pip install .`` needs and none of this machine's build output.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field

import pytest
import setuptools

from tests.deploy.conftest import DEPLOY, REPO


@dataclass
class Stage:
    image: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [args for ins, args in self.instructions if ins == instruction]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(the ARGs before the first FROM, the stages). Lines continue after a trailing backslash; comment lines
    are dropped, inside a continuation too, as BuildKit drops them."""
    logical, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "the file ends inside a continued line"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            words = rest.split()
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(image, name))
        elif not stages:
            assert instruction == "ARG", f"{instruction} before the first FROM"
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            stages[-1].instructions.append((instruction, rest))
    return args, stages


def scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]


def apt_installs(stage: Stage) -> set[str]:
    packages = set()
    for run in stage.all("RUN"):
        for command in run.split("&&"):
            words = shlex.split(command)
            if "apt-get" in words and "install" in words:
                packages |= {w for w in words[words.index("install") + 1 :] if not w.startswith("-")}
    return packages


def uses_stage(stage: Stage, other: Stage) -> bool:
    copies = [a for a in stage.all("COPY") if f"--from={other.name}" in a.split()]
    mounts = [a for a in stage.all("RUN") if re.search(rf"--mount=\S*\bfrom={re.escape(other.name)}\b", a)]
    return bool(copies or mounts)


@pytest.fixture(params=["proxy", "control"])
def dockerfile(request):
    path = DEPLOY / "docker" / f"{request.param}.Dockerfile"
    return request.param, *parse_dockerfile(path.read_text(encoding="utf-8"))


def test_multi_stage_with_the_compiler_left_behind(dockerfile):
    _, _, stages = dockerfile
    assert len(stages) >= 2
    build, runtime = stages[0], stages[-1]
    assert build.name != runtime.name
    assert uses_stage(runtime, build), "the runtime stage takes nothing from the build stage"
    assert "gcc" in apt_installs(build)  # the Cython extensions are compiled, not left to the pure-Python twins
    assert "gcc" not in apt_installs(runtime)
    assert any(re.search(r"\bpip (wheel|install)\b", run) for run in build.all("RUN"))


def test_base_images_are_pinned_python_311_slim(dockerfile):
    _, _, stages = dockerfile
    for stage in stages:
        repository, sep, tag = stage.image.partition(":")
        assert sep and tag and tag != "latest" and "@" not in repository, stage.image
        assert repository == "python" and tag.startswith("3.11-slim"), stage.image


def test_runs_as_a_numeric_non_root_user(dockerfile):
    which, _, stages = dockerfile
    users = stages[-1].all("USER")
    assert users, "the runtime stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    # numeric, so that the kubelet can check runAsNonRoot
    assert uid.isdigit() and int(uid) != 0 and (not gid or (gid.isdigit() and int(gid) != 0))
    expected = {"proxy": "1337", "control": "10001"}[which]
    assert uid == expected
    if which == "proxy":
        assert gid == "1337"  # iptables exempts the proxy by uid and gid 1337


def test_entrypoint_is_a_console_script(dockerfile):
    which, _, stages = dockerfile
    (entrypoint,) = stages[-1].all("ENTRYPOINT")
    argv = json.loads(entrypoint)  # exec form: signals reach the process, not a shell
    assert argv == [{"proxy": "meshproxy", "control": "meshproxy-control"}[which]]
    assert argv[0] in scripts()


def test_the_proxy_image_has_iptables_and_the_package():
    _, stages = parse_dockerfile((DEPLOY / "docker" / "proxy.Dockerfile").read_text(encoding="utf-8"))
    runtime = stages[-1]
    assert "iptables" in apt_installs(runtime)
    assert any("pip install" in run and re.search(r"\bmeshproxy\b", run) for run in runtime.all("RUN"))


def test_the_control_image_installs_the_control_extra():
    _, stages = parse_dockerfile((DEPLOY / "docker" / "control.Dockerfile").read_text(encoding="utf-8"))
    assert any(re.search(r"pip install .*[\"']?\.\[control\][\"']?", run) for run in stages[0].all("RUN"))
    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert "control" in extras


def test_the_parser_reads_continuations_and_stages():
    args, stages = parse_dockerfile(
        "# syntax=docker/dockerfile:1\nARG IMG=python:3.11-slim\nFROM ${IMG} AS build\n"
        "RUN apt-get update \\\n# a comment inside\n && apt-get install -y --no-install-recommends gcc\n"
        "FROM $IMG\nCOPY --from=build /x /x\nUSER 1:1\n"
    )
    assert args == {"IMG": "python:3.11-slim"}
    assert [(s.image, s.name) for s in stages] == [("python:3.11-slim", "build"), ("python:3.11-slim", "1")]
    assert apt_installs(stages[0]) == {"gcc"}
    assert uses_stage(stages[1], stages[0])


# -- the build context ----------------------------------------------------------------------------------


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(is an exception, regex) per line of .dockerignore, in Docker's syntax: Go's filepath.Match plus
    ``**`` for any number of directories, a leading ``!`` for an exception, paths relative to the root."""
    out = []
    for raw in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        pattern = pattern.strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        out.append((negate, re.compile(regex)))
    return out


def excluded(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path, or one of its parent directories, decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negate, regex in patterns:
        if any(regex.fullmatch(c) for c in candidates):
            result = not negate
    return result


def test_the_context_holds_what_pip_install_builds_from():
    patterns = dockerignore_patterns()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    needed = ["pyproject.toml", "setup.py", pyproject["project"]["readme"]]
    # The packages pip builds: setuptools' find with pyproject's include patterns.
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = setuptools.find_packages(where=str(REPO), include=include)
    assert "meshproxy._fast" in packages and "meshproxy.admin.v1" in packages
    for package in packages:
        directory = package.replace(".", "/") + "/"
        files = [f for f in listed if f.startswith(directory) and "/" not in f[len(directory) :]]
        sources = [f for f in files if f.endswith((".py", ".pyx", ".pxd", ".pyi"))] + [
            f for f in files if f.endswith("py.typed")
        ]
        assert any(f.endswith("__init__.py") for f in sources), package
        needed += sources
    kept_out = [f for f in needed if excluded(f, patterns)]
    assert not kept_out, f".dockerignore excludes files the image is built from: {kept_out}"


def test_the_context_leaves_out_local_build_output():
    patterns = dockerignore_patterns()
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "build/lib/meshproxy/__init__.py",
        "meshproxy.egg-info/PKG-INFO",
        "meshproxy/_fast/frames.c",
        "meshproxy/_fast/frames.cpython-311-x86_64-linux-gnu.so",
        "meshproxy/__pycache__/cli.cpython-311.pyc",
        "control/sources/__pycache__/kube.cpython-311.pyc",
        "tests/deploy/test_dockerfiles.py",
    ):
        assert excluded(path, patterns), path
    assert not excluded("meshproxy/_fast/frames.pyx", patterns)


def test_the_dockerignore_matcher():
    patterns = [
        (False, re.compile(r"(.*/)?__pycache__")),
        (False, re.compile(r"docs")),
        (True, re.compile(r"docs/keep")),
    ]
    assert excluded("a/b/__pycache__/x.pyc", patterns)
    assert excluded("docs/other.md", patterns)
    assert not excluded("docs/keep", patterns)
    assert not excluded("src/docs.py", patterns)
