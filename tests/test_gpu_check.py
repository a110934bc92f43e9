"""benchmarks/gpu_check.py without a GPU: its CPU dry run produces every part, the report's
numbers are finite and the device is named, a part that fails or runs over its limit is
recorded without stopping the others, and no CUDA test in tests/ is left out of its list."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, "-P", str(SCRIPT), "--dry-run", "--out", str(out), "--budget-s", "900"],
                          capture_output=True, text=True, timeout=1200)
    report = json.loads((out / "gpu_check.json").read_text())
    return SimpleNamespace(proc=proc, out=out, report=report, md=(out / "gpu_check.md").read_text())


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


@pytest.mark.slow  # the dry run: a few minutes on a loaded 2-core machine
def test_dry_run_passes_every_part(dry_run):
    parts = dry_run.report["parts"]
    assert list(parts) == list(gpu_check.PARTS)
    assert {p: parts[p]["status"] for p in parts} == {p: "passed" for p in gpu_check.PARTS}, dry_run.proc.stderr[-3000:]
    assert dry_run.proc.returncode == 0
    assert sorted(f.name for f in dry_run.out.iterdir()) == sorted(
        ["gpu_check.json", "gpu_check.md"] + [f"log_{p}.txt" for p in gpu_check.PARTS])
    for part in parts.values():
        assert 0 < part["wall_s"] <= part["limit_s"] + 5


@pytest.mark.slow
def test_report_names_the_device(dry_run):
    device = dry_run.report["device"]
    assert device["dry_run"] is True and device["cuda_available"] is False and device["gpus"] == 0
    assert device["name"].startswith("CPU (") and device["name"].endswith(", dry run")
    assert dry_run.md.startswith(f"# GPU check: {device['name']}\n")
    assert f"torch {device['torch']}" in dry_run.md


@pytest.mark.slow
def test_tests_part_runs_the_cuda_tests_on_the_cpu(dry_run):
    tests = dry_run.report["parts"]["tests"]
    outcomes = {t["id"]: t["outcome"] for t in tests["tests"]}
    assert tests["counts"]["failed"] == tests["counts"]["error"] == 0
    # the device-independent CUDA tests run on the CPU in the dry run; the CuPy ones skip
    assert outcomes["tests/test_cuda.py::test_amp_train_steps_have_finite_decreasing_loss[bfloat16]"] == "passed"
    assert outcomes["tests/test_cuda.py::test_lif_hand_computed_spike_train[cupy-dtype0]"] == "skipped"
    assert outcomes["tests/test_kernels.py::test_cupy_sdsa_matches_torch_sdsa_on_gpu[dtype0]"] == "skipped"
    assert tests["counts"]["passed"] >= 20
    assert f"{tests['counts']['passed']} passed, 0 failed, 0 errors" in dry_run.md


@pytest.mark.slow
def test_lif_and_sdsa_rows(dry_run):
    for part, cases in (("lif", [("float32", T) for T in gpu_check.LIF_T] + [("bfloat16", 4)]),
                        ("sdsa", [("float32", 4), ("bfloat16", 4)])):
        rows = dry_run.report["parts"][part]["rows"]
        (copy,) = [r for r in rows if r["section"] == "copy"]
        assert _finite(copy["gb_per_s"]) and copy["gb_per_s"] > 0
        got = {(r["backend"], r["dtype"], r["T"]): r for r in rows if r["section"] == part}
        assert set(got) == {(b, d, T) for d, T in cases for b in gpu_check.LIF_BACKENDS}
        for (backend, _, _), row in got.items():
            if backend == "cupy":
                assert row["status"] == "skipped" and row["reason"] == "CuPy kernels need CUDA"
                continue
            assert row["status"] == "ok", row
            assert _finite(row["ms"], row["gb_per_s"], row["of_copy"]) and row["ms"] > 0 and row["gb_per_s"] > 0
            # the bandwidth is the minimal traffic over the time: bytes per element × elements / ms
            per_element = (gpu_check.LIF_BYTES[row["dtype"]] if part == "lif"
                           else gpu_check.SDSA_TENSORS * (4 if row["dtype"] == "float32" else 2))
            assert row["gb_per_s"] == pytest.approx(per_element * math.prod(row["shape"]) / row["ms"] / 1e6, rel=0.01)
            assert row["of_copy"] == pytest.approx(row["gb_per_s"] / copy["gb_per_s"], rel=0.01, abs=1e-3)
    assert "## LIF forward + backward" in dry_run.md and "## SDSA forward + backward" in dry_run.md


@pytest.mark.slow
def test_train_rows(dry_run):
    rows = [r for r in dry_run.report["parts"]["train"]["rows"] if r["section"] == "train"]
    expected = {(m, b, mem) for m in gpu_check.DRY_TRAIN_MODELS for b, mem in
                [("cupy", "plain"), ("spikingjelly", "plain"), ("torch", "plain"), ("torch", "checkpoint"), ("torch", "packed")]}
    assert {(r["model"], r["backend"], r["memory"]) for r in rows} == expected
    for row in rows:
        if row["backend"] == "cupy":
            assert row["status"] == "skipped"
            continue
        assert row["status"] == "ok", row
        assert _finite(row["ms"], row["images_per_s"], row["peak_mb"], row["loss"]) and row["peak_mb"] > 0
        assert row["images_per_s"] == pytest.approx(1000 * row["batch"] / row["ms"], rel=0.01)
        assert row["img_size"] == 32 and 0 < row["loss"] < 10
    assert "| sdt_tiny | torch | packed | 2 | 32 |" in dry_run.md


@pytest.mark.slow
def test_ddp_rows(dry_run):
    rows = {r["step"]: r for r in dry_run.report["parts"]["ddp"]["rows"]}
    assert set(rows) == {"train", "resume", "nccl_ddp_step"}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["train"]["epochs_in_metrics"] == 1 and rows["resume"]["epochs_in_metrics"] == 2
    nccl = rows["nccl_ddp_step"]
    assert nccl["backend"] == "gloo" and nccl["world"] == 1 and nccl["all_reduce"] == 1.0 and _finite(*nccl["losses"])
    assert "resumed from" in (dry_run.out / "log_ddp.txt").read_text()


@pytest.mark.slow
def test_a_rerun_of_one_part_keeps_the_others(dry_run, tmp_path):
    out = tmp_path / "rerun"
    proc = subprocess.run([sys.executable, "-P", str(SCRIPT), "--dry-run", "--out", str(out), "--parts", "sdsa",
                           "--merge", str(dry_run.out / "gpu_check.json"), "--budget-s", "300"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rerun = json.loads((out / "gpu_check.json").read_text())["parts"]
    assert list(rerun) == list(gpu_check.PARTS)
    for part in gpu_check.PARTS:
        assert (rerun[part] == dry_run.report["parts"][part]) == (part != "sdsa"), part
    assert sorted(f.name for f in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "log_sdsa.txt"]


@pytest.mark.slow
def test_markdown_has_no_missing_numbers(dry_run):
    for token in ("nan", "inf", "None"):
        assert f" {token} " not in dry_run.md.replace("|", " ")


# --- the driver's own rules ------------------------------------------------------------------------


def test_every_test_that_needs_cuda_is_in_the_list():
    listed = set(gpu_check.CUDA_TESTS)
    needs_cuda = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        rel = f"tests/{path.name}"
        marks = [n for n in tree.body if isinstance(n, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in n.targets)]
        if any("cuda" in ast.unparse(m.value) for m in marks):
            needs_cuda.append(rel)
            continue
        for fn in tree.body:
            if isinstance(fn, ast.FunctionDef) and any("cuda.is_available" in ast.unparse(d) for d in fn.decorator_list):
                needs_cuda.append(f"{rel}::{fn.name}")
    assert "tests/test_cuda.py" in needs_cuda and len(needs_cuda) >= 3
    assert [n for n in needs_cuda if n not in listed and n.split("::")[0] not in listed] == []


def test_part_limits_share_what_is_left():
    parts = list(gpu_check.PARTS)
    assert sum(gpu_check.PARTS.values()) == pytest.approx(1.0)
    assert gpu_check.part_limits(parts, 480, 0) == pytest.approx(480 * gpu_check.PARTS["tests"])
    # the tests part took 44 s: the other 436 are shared among the four parts left, in proportion
    left = parts[1:]
    share = gpu_check.PARTS["lif"] / sum(gpu_check.PARTS[p] for p in left)
    assert gpu_check.part_limits(left, 480, 44) == pytest.approx(436 * share)


def test_parse_pytest_reads_outcomes_and_messages():
    output = "\n".join([
        "tests/test_cuda.py::test_a[cupy-dtype0] PASSED                     [ 10%]",
        "tests/test_cuda.py::test_b SKIPPED (the CuPy kernels need CUDA)    [ 20%]",
        "tests/test_kernels.py::test_c[dtype1] FAILED                       [ 30%]",
        "=========================== short test summary info ============================",
        "FAILED tests/test_kernels.py::test_c[dtype1] - AssertionError: spikes differ",
    ])
    assert gpu_check.parse_pytest(output) == [
        {"id": "tests/test_cuda.py::test_a[cupy-dtype0]", "outcome": "passed"},
        {"id": "tests/test_cuda.py::test_b", "outcome": "skipped"},
        {"id": "tests/test_kernels.py::test_c[dtype1]", "outcome": "failed", "message": "AssertionError: spikes differ"},
    ]


def test_a_part_over_its_limit_is_killed_with_its_children(tmp_path):
    pids = tmp_path / "pids"
    started = time.time()
    rc, wall = gpu_check.run_limited(["bash", "-c", f"sleep 60 & echo $! > {pids}; sleep 61 & echo $! >> {pids}; wait"],
                                     tmp_path / "log.txt", 2.0, dict(os.environ))
    assert rc == "timeout" and wall < 10 and time.time() - started < 10
    children = [int(p) for p in pids.read_text().split()]
    assert len(children) == 2
    def alive(pid: int) -> bool:  # a zombie waiting to be reaped counts as gone
        try:
            return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False

    deadline = time.time() + 10  # SIGKILL is sent; a loaded machine may take a moment to deliver it
    while any(map(alive, children)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, children))


def test_a_failing_part_is_recorded_and_the_report_still_written(tmp_path):
    args = SimpleNamespace(out=str(tmp_path), dry_run=True, batch=-1)  # the worker refuses batch -1
    result = gpu_check.run_part("sdsa", args, 60, dict(os.environ), tmp_path)
    assert result["status"] == "failed" and result["rc"] == 2 and result["rows"] == []
    assert "--batch must be >= 1, got -1" in result["reason"]
    report = {"device": {"name": "CPU (test)", "torch": "x", "cuda": None, "cupy": None, "spikingjelly": "x",
                         "triton": None, "timm": "x"}, "budget_s": 60, "wall_s": 1.0, "parts": {"sdsa": result}}
    md = gpu_check.markdown(report)
    assert "| sdsa | failed |" in md and "## SDSA forward + backward" in md


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    for argv, message in ((["--out", str(tmp_path), "--parts", "tests,bogus"], "unknown part(s) bogus"),
                          (["--out", str(tmp_path), "--budget-s", "10"], "--budget-s must be at least 30"),
                          (["--dry-run"], "--out DIR is required"),
                          (["--out", str(tmp_path), "--merge", str(SCRIPT)], "--merge " + str(SCRIPT) + ": needs --parts"),
                          (["--out", str(tmp_path), "--parts", "lif", "--merge", str(tmp_path / "x.json")], "no such file")):
        with pytest.raises(SystemExit) as exit_info:
            gpu_check.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_checkout_that_is_not_installed_imports_through_a_link(tmp_path):
    # A GPU machine gets the checkout, not an installed package: hide the installed one and the
    # script still imports the package (and hands the path to its subprocesses).
    code = f"""
import importlib.util, os, sys
sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", "")]
sys.path[:] = [p for p in sys.path if not p.endswith("site-packages") or "torch" in os.listdir(p)]
try:
    import spikeformers
    sys.exit("the installed package is still visible: the test proves nothing")
except ImportError:
    pass
spec = importlib.util.spec_from_file_location("gpu_check", {str(SCRIPT)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(module.ensure_package())
import spikeformers.kernels.cupy_lif as kernels
print(os.environ["PYTHONPATH"].split(os.pathsep)[0], "__global__" in kernels.kernel_source("lif.cu"))
"""
    proc = subprocess.run([sys.executable, "-P", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found, (link_folder, source_ok) = proc.stdout.splitlines()[0], proc.stdout.splitlines()[1].split()
    assert Path(found) == ROOT and source_ok == "True"
    assert (Path(link_folder) / "spikeformers").resolve() == ROOT
