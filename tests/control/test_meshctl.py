"""meshctl analyze (offline checks of mesh resources) and inject (the sidecar, offline), in-process and as commands."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from control.meshctl import analyze, main

DATA = Path(__file__).parent / "data"
DEMO, BROKEN, WARNINGS = str(DATA / "demo.yaml"), str(DATA / "broken.yaml"), str(DATA / "warnings.yaml")
MESHCTL = Path(sys.executable).parent / "meshctl"

BROKEN_PROBLEMS = [
    {
        "severity": "error",
        "resource": "VirtualService default/redirecting",
        "path": "spec.http[0].redirect",
        "message": "redirects are not supported",
        "origin": BROKEN,
    },
    {
        "severity": "error",
        "resource": "VirtualService default/faulty",
        "path": "spec.http[0].fault.abort.grpcStatus",
        "message": "'Unavailable' is not a gRPC error status name (did you mean 'UNAVAILABLE'?) (known: CANCELLED, "
        "UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, "
        "RESOURCE_EXHAUSTED, FAILED_PRECONDITION, ABORTED, OUT_OF_RANGE, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, "
        "DATA_LOSS, UNAUTHENTICATED)",
        "origin": BROKEN,
    },
    {
        "severity": "warning",
        "resource": "VirtualService default/to-nowhere",
        "path": "spec.http[0].route[0].destination",
        "message": "host ghost.local is not a known service (a Kubernetes Service or a ServiceEntry host): "
        "this route answers 503",
        "origin": BROKEN,
    },
    {
        "severity": "warning",
        "resource": "VirtualService default/no-such-subset",
        "path": "spec.http[0].route[0].destination",
        "message": "subset 'v9' of reviews.local is not defined by any DestinationRule: this route answers 503",
        "origin": BROKEN,
    },
    {
        "severity": "warning",
        "resource": "VirtualService default/no-such-subset",
        "path": "",
        "message": "host reviews.local is also routed by VirtualService default/to-nowhere; a sidecar uses the "
        "one closest to it",
        "origin": BROKEN,
    },
]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["analyze", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- table --------------------------------------------------------------------------------------


def test_clean(capsys):
    assert run(capsys, "-f", DEMO) == (0, "3 resources, 0 errors, 0 warnings: OK\n", "")


def test_only_warnings_exit_0(capsys):
    assert run(capsys, "-f", WARNINGS) == (
        0,
        f"WARNING DestinationRule default/reviews ({WARNINGS}): spec.trafficPolicy.outlierDetection.minHealthPercent: "
        "meshproxy has no panic threshold: ignored\n"
        "2 resources, 0 errors, 1 warnings: OK\n",
        "",
    )


def test_errors_exit_1_with_a_line_per_problem(capsys):
    code, out, err = run(capsys, "-f", BROKEN)
    assert (code, err) == (1, "")
    assert out.splitlines() == [
        f"ERROR   VirtualService default/redirecting ({BROKEN}): spec.http[0].redirect: redirects are not supported",
        f"ERROR   VirtualService default/faulty ({BROKEN}): spec.http[0].fault.abort.grpcStatus: 'Unavailable' is "
        "not a gRPC error status name (did you mean 'UNAVAILABLE'?) (known: CANCELLED, UNKNOWN, INVALID_ARGUMENT, "
        "DEADLINE_EXCEEDED, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, RESOURCE_EXHAUSTED, FAILED_PRECONDITION, "
        "ABORTED, OUT_OF_RANGE, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS, UNAUTHENTICATED)",
        f"WARNING VirtualService default/to-nowhere ({BROKEN}): spec.http[0].route[0].destination: host ghost.local "
        "is not a known service (a Kubernetes Service or a ServiceEntry host): this route answers 503",
        f"WARNING VirtualService default/no-such-subset ({BROKEN}): spec.http[0].route[0].destination: subset 'v9' "
        "of reviews.local is not defined by any DestinationRule: this route answers 503",
        f"WARNING VirtualService default/no-such-subset ({BROKEN}): host reviews.local is also routed by "
        "VirtualService default/to-nowhere; a sidecar uses the one closest to it",
        "6 resources, 2 errors, 3 warnings: would be rejected",
    ]


# -- json / yaml --------------------------------------------------------------------------------


def test_json_and_yaml_carry_the_same_problems(capsys):
    code_j, out_j, err_j = run(capsys, "-f", BROKEN, "-o", "json")
    code_y, out_y, err_y = run(capsys, "-f", BROKEN, "--output", "yaml")
    assert (code_j, code_y, err_j, err_y) == (1, 1, "", "")
    expected = {"resources": 6, "errors": 2, "problems": BROKEN_PROBLEMS}
    assert json.loads(out_j) == expected
    assert yaml.safe_load(out_y) == expected
    # and the table says the same
    _, table, _ = run(capsys, "-f", BROKEN)
    assert len(table.splitlines()) == len(BROKEN_PROBLEMS) + 1


def test_json_clean(capsys):
    code, out, _ = run(capsys, "-o", "json", "-f", DEMO)
    assert (code, json.loads(out)) == (0, {"resources": 3, "errors": 0, "problems": []})


def test_analyze_function():
    problems, count = analyze([BROKEN])
    assert (problems, count) == (BROKEN_PROBLEMS, 6)


# -- inputs -------------------------------------------------------------------------------------


def test_stdin(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(Path(WARNINGS).read_text()))
    code, out, err = run(capsys, "-f", "-")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "WARNING DestinationRule default/reviews (<stdin>): spec.trafficPolicy.outlierDetection.minHealthPercent: "
        "meshproxy has no panic threshold: ignored",
        "2 resources, 0 errors, 1 warnings: OK",
    ]


def test_directory_and_several_files(capsys, tmp_path):
    shutil.copy(DEMO, tmp_path / "demo.yaml")
    (tmp_path / ".hidden.yaml").write_text("not: [valid")
    (tmp_path / "notes.txt").write_text("not: [valid")
    (tmp_path / "nested.yaml").mkdir()  # only the top level's files, as the control plane reads it
    (tmp_path / "nested.yaml" / "more.yaml").write_text("not: [valid")
    # a directory: every YAML file in it (hidden and other files skipped)
    assert run(capsys, "-f", str(tmp_path)) == (0, "3 resources, 0 errors, 0 warnings: OK\n", "")
    # the directory and another file: their resources together (warnings.yaml's ServiceEntry and
    # DestinationRule are the demo's: defined twice)
    code, out, err = run(capsys, "-f", str(tmp_path), "-f", WARNINGS)
    demo = str(tmp_path / "demo.yaml")
    assert (code, err) == (1, "")
    assert out.splitlines() == [
        f"ERROR   DestinationRule default/reviews ({WARNINGS}): metadata.name: DestinationRule default/reviews "
        f"is already defined in {demo}: this one is ignored",
        f"ERROR   ServiceEntry default/reviews ({WARNINGS}): metadata.name: ServiceEntry default/reviews "
        f"is already defined in {demo}: this one is ignored",
        "5 resources, 2 errors, 0 warnings: would be rejected",
    ]


def test_several_files_that_fit_together(capsys, tmp_path):
    se = tmp_path / "se.yaml"
    vs = tmp_path / "vs.yaml"
    docs = Path(DEMO).read_text().split("\n---\n")
    se.write_text("\n---\n".join(docs[:2]))
    vs.write_text(docs[2])
    assert run(capsys, "-f", str(se), "-f", str(vs)) == (0, "3 resources, 0 errors, 0 warnings: OK\n", "")
    # the VirtualService alone: its host is unknown (warnings: it answers 503 until the host appears)
    code, out, _ = run(capsys, "-f", str(vs))
    assert code == 0
    assert out.splitlines()[-1] == "1 resources, 0 errors, 3 warnings: OK"
    assert "spec.hosts[0]: reviews.local is not a known service (yet): no sidecar routes by it" in out


def test_file_problems_are_errors(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [\n")
    nameless = tmp_path / "nameless.yaml"
    nameless.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {}\n")
    code, out, err = run(capsys, "-f", str(bad), "-f", str(nameless), "-o", "json")
    assert (code, err) == (1, "")
    report = json.loads(out)
    assert report["resources"] == 0
    assert report["errors"] == 2
    assert report["problems"][0]["resource"] == str(bad)
    assert report["problems"][0]["message"].startswith("YAML syntax error at line 2, column 1: ")
    assert report["problems"][1] == {
        "severity": "error",
        "resource": str(nameless),
        "path": "",
        "message": "document 1: metadata.name is missing",
    }


# -- bad arguments ------------------------------------------------------------------------------


def test_missing_path_exit_2(capsys, tmp_path):
    missing = str(tmp_path / "nope.yaml")
    assert run(capsys, "-f", DEMO, "-f", missing) == (2, "", f"meshctl: error: {missing}: no such file or directory\n")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["analyze", "-f", DEMO, "--bogus"], "meshctl: error: unrecognized arguments: --bogus"),
        (["analyze"], "meshctl analyze: error: the following arguments are required: -f/--filename"),
        (
            ["analyze", "-f", DEMO, "-o", "xml"],
            "meshctl analyze: error: argument -o/--output: invalid choice: 'xml' (choose from table, json, yaml)",
        ),
        ([], "meshctl: error: the following arguments are required: command"),
        (
            ["frobnicate"],
            "meshctl: error: argument command: invalid choice: 'frobnicate' "
            "(choose from proxy-status, proxy-config, stats, top, analyze, inject)",
        ),
    ],
)
def test_bad_flags_exit_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2
    assert out == ""
    # argparse's quoting of choices differs between Python versions
    commands = "proxy-status, proxy-config, stats, top, analyze, inject"
    err = err.replace("'table', 'json', 'yaml'", "table, json, yaml")
    err = err.replace(", ".join(f"'{c}'" for c in commands.split(", ")), commands)
    assert err == message + "\n"


# -- the installed command -----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_installed_command():
    proc = subprocess.run(
        [str(MESHCTL), "analyze", "-f", BROKEN, "-o", "json"], capture_output=True, text=True, timeout=30
    )
    assert (proc.returncode, proc.stderr) == (1, "")
    assert json.loads(proc.stdout) == {"resources": 6, "errors": 2, "problems": BROKEN_PROBLEMS}

    proc = subprocess.run(
        [str(MESHCTL), "analyze", "-f", "-"], input=Path(DEMO).read_text(), capture_output=True, text=True, timeout=30
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "3 resources, 0 errors, 0 warnings: OK\n", "")

    proc = subprocess.run([str(MESHCTL), "analyze", "-f", "/nonexistent/x"], capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        2,
        "",
        "meshctl: error: /nonexistent/x: no such file or directory\n",
    )

    proc = subprocess.run([str(MESHCTL), "analyze", "--bogus"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("meshctl")
    assert "Traceback" not in proc.stderr


# -- inject ----------------------------------------------------------------------------------------


APP = Path(__file__).parents[2] / "examples" / "k8s" / "app.yaml"
MIXED = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  when: 2024-01-01
---
---
apiVersion: v1
kind: Pod
metadata:
  name: debug
  labels: {app: debug}
spec:
  containers:
  - name: shell
    image: busybox:1.36
    readinessProbe:
      httpGet: {path: /ready, port: 8080}
---
apiVersion: batch/v1
kind: CronJob
metadata:
  name: nightly
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        metadata:
          annotations: {sidecar.meshproxy.io/nativeSidecar: "false"}
        spec:
          restartPolicy: OnFailure
          containers:
          - {name: report, image: example/report:1}
---
apiVersion: v1
kind: List
items:
- apiVersion: apps/v1
  kind: DaemonSet
  metadata: {name: agent}
  spec:
    selector: {matchLabels: {app: agent}}
    template:
      metadata: {labels: {app: agent}}
      spec:
        containers: [{name: agent, image: example/agent:1}]
- apiVersion: v1
  kind: Service
  metadata: {name: agent}
  spec:
    ports: [{port: 80}]
"""


def inject_run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["inject", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def pod_spec(doc: dict) -> dict:
    if doc["kind"] == "Pod":
        return doc["spec"]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def container_names(spec: dict) -> list[str]:
    return [c["name"] for c in spec.get("initContainers", []) + spec["containers"]]


def test_inject_the_sample_app_validates(capsys):
    from tests.injector.validation import validate

    code, out, err = inject_run(capsys, "-f", str(APP))
    assert (code, err) == (0, "")
    docs = list(yaml.safe_load_all(out))
    originals = list(yaml.safe_load_all(APP.read_text()))
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [(d["kind"], d["metadata"]["name"]) for d in originals]
    injected = 0
    for doc, original in zip(docs, originals, strict=True):
        if doc["kind"] == "Deployment":
            validate(doc)
            assert container_names(pod_spec(doc))[:2] == ["meshproxy-init", "meshproxy-proxy"]
            injected += 1
        else:
            assert doc == original
    assert injected == 3


def test_inject_is_idempotent(capsys, tmp_path, monkeypatch):
    first = tmp_path / "first.yaml"
    assert inject_run(capsys, "-f", str(APP), "-o", str(first)) == (0, "", "")
    monkeypatch.setattr("sys.stdin", io.StringIO(first.read_text()))
    code, out, err = inject_run(capsys, "-f", "-")
    assert (code, err) == (0, "")
    assert list(yaml.safe_load_all(out)) == list(yaml.safe_load_all(first.read_text()))


def test_inject_mixed_documents_from_stdin(capsys, monkeypatch):
    from tests.injector.validation import validate

    monkeypatch.setattr("sys.stdin", io.StringIO(MIXED))
    code, out, err = inject_run(
        capsys,
        "-f",
        "-",
        "--classic",
        "--rewrite-probes",
        "--sidecar-image",
        "registry.local/proxy:dev",
        "--control-plane",
        "cp.mesh.svc:15010",
    )
    assert (code, err) == (0, "")
    configmap, pod, cronjob, lst = yaml.safe_load_all(out)  # the empty document is dropped
    assert configmap == next(yaml.safe_load_all(MIXED))
    for doc in (pod, cronjob, lst["items"][0]):
        validate(doc)
    assert lst["items"][1] == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "agent"},
        "spec": {"ports": [{"port": 80}]},
    }
    # --classic: a proxy container first
    assert [c["name"] for c in pod["spec"]["containers"]] == ["meshproxy-proxy", "shell"]
    proxy = pod["spec"]["containers"][0]
    assert proxy["image"] == "registry.local/proxy:dev"
    assert proxy["args"][proxy["args"].index("--control-plane") + 1] == "cp.mesh.svc:15010"
    # --rewrite-probes
    assert pod["spec"]["containers"][1]["readinessProbe"]["httpGet"]["port"] == 15021
    # the CronJob says classic itself; the DaemonSet follows --classic
    assert pod_spec(cronjob)["containers"][0]["name"] == "meshproxy-proxy"
    assert pod_spec(lst["items"][0])["containers"][0]["name"] == "meshproxy-proxy"
    args = pod_spec(cronjob)["containers"][0]["args"]
    assert args[args.index("--workload") + 1] == "nightly"


def test_inject_native_is_the_default_and_annotations_win(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(MIXED))
    code, out, _ = inject_run(capsys, "-f", "-")
    _, pod, cronjob, _ = yaml.safe_load_all(out)
    assert code == 0
    assert container_names(pod["spec"]) == ["meshproxy-init", "meshproxy-proxy", "shell"]
    assert pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] == 8080  # no rewrite unless asked
    assert pod_spec(cronjob)["containers"][0]["name"] == "meshproxy-proxy"  # its annotation: classic


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [1,\n", "meshctl: error: <stdin>: YAML syntax error at line 2, column 1: "),
        (
            "kind: Pod\napiVersion: v1\n"
            "metadata: {name: p, annotations: {traffic.meshproxy.io/excludeOutboundPorts: x}}\n"
            "spec: {containers: [{name: a, image: b}]}\n",
            "meshctl: error: <stdin>: document 1: Pod p: annotation traffic.meshproxy.io/excludeOutboundPorts: 'x' is "
            "not a port number (1-65535)",
        ),
        (
            "kind: ConfigMap\napiVersion: v1\n---\n"
            "kind: Deployment\napiVersion: apps/v1\nmetadata: {name: d}\nspec: {}\n",
            "meshctl: error: <stdin>: document 2: Deployment d: spec.template: expected a mapping, got missing",
        ),
    ],
    ids=["yaml", "annotation", "no-template"],
)
def test_inject_bad_input_is_one_line_exit_1_and_no_output(capsys, monkeypatch, tmp_path, text, message):
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    out_file = tmp_path / "out.yaml"
    code, out, err = inject_run(capsys, "-f", "-", "-o", str(out_file))
    assert (code, out) == (1, "")
    assert err.startswith(message) and err.count("\n") == 1
    assert not out_file.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inject", "-f", "/nonexistent/x.yaml"], "meshctl: error: /nonexistent/x.yaml: no such file or directory"),
        (["inject"], "meshctl inject: error: the following arguments are required: -f/--filename"),
        (
            ["inject", "-f", "-", "--native", "--classic"],
            "meshctl inject: error: argument --classic: not allowed with argument --native",
        ),
        (
            ["inject", "-f", "-", "--control-plane", "nope"],
            "meshctl inject: error: argument --control-plane: 'nope': no port: expected host:port, "
            "such as 127.0.0.1:15001",
        ),
    ],
)
def test_inject_bad_arguments_exit_2(capsys, argv, message):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err == message + "\n"


@pytest.mark.timeout(60)
def test_inject_as_a_command(tmp_path):
    """The module as a process (the installed meshctl gains the injector once the package lists it)."""
    proc = subprocess.run(
        [sys.executable, "-m", "control.meshctl", "inject", "-f", "-"],
        input=APP.read_text(),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).parents[2],
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert sum(d["kind"] == "Deployment" for d in yaml.safe_load_all(proc.stdout)) == 3
    proc = subprocess.run(
        [sys.executable, "-m", "control.meshctl", "inject", "-f", "-"],
        input="{{{",
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
