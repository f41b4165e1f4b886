"""meshctl analyze: offline checks of mesh resources, in-process and as the installed command."""

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
        (["frobnicate"], "meshctl: error: argument command: invalid choice: 'frobnicate' (choose from analyze)"),
    ],
)
def test_bad_flags_exit_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2
    assert out == ""
    # argparse's quoting of choices differs between Python versions
    assert err.replace("'table', 'json', 'yaml'", "table, json, yaml").replace("'analyze'", "analyze") == message + "\n"


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
