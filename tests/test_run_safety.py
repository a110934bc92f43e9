"""Nothing is lost or silently replaced: run folders are claimed (refused when they hold another
run, locked while a training writes them), every kill instant is repaired by a resume, stop
signals (Ctrl-C, SIGTERM, SIGUSR1/2) checkpoint and exit with a documented status, and DDP ranks
save and evaluate one consistent model with every rank's loss sums."""

import csv
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

import spikeformers.train.main as train_main
from spikeformers.train.checkpoint import RunFolderError, recorded_best_epoch
from spikeformers.train.main import train

ROOT = Path(__file__).resolve().parents[1]
# Two epochs of one step: the smallest run that has a history, a best epoch and a resume.
TINY = ["model.args={embed_dim: 16}", "trainer.max_steps_per_epoch=1", "trainer.epochs=2", "data.eval_batch_size=360"]
ENV = dict(os.environ, SPIKEFORMERS_LIF_COMPILE="0", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
RUN_FILES = ("last.pt", "best.pt", "metrics.csv", "curves.png")
TIMING_COLUMNS = ("epoch_seconds", "train_seconds")


def config(out_dir: Path, *overrides: str):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="spikeformers.configs", version_base="1.3"):
            cfg = compose(config_name="train", overrides=[*TINY, *overrides])
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.output_dir = str(out_dir)
    return cfg


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted TINY run: what every interrupted-and-resumed run must end as."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(config(out))
    return out


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(open(run / "metrics.csv"))]


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def snapshot(run: Path) -> dict:
    return {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name in RUN_FILES}


# --- the run folder: never taken over without being told -----------------------------------------


def test_a_new_run_into_a_used_folder_is_refused_with_one_line(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = snapshot(run)
    with pytest.raises(RunFolderError) as refused:
        train(config(run))
    message = str(refused.value)
    assert "\n" not in message and str(run) in message and "resume=auto" in message and "overwrite=true" in message
    assert isinstance(refused.value, ValueError)  # a user error: one line on the command line
    assert snapshot(run) == before, "nothing of the earlier run may change"


def test_resume_from_another_runs_checkpoint_and_overwrite_with_resume_are_refused(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    elsewhere = tmp_path / "elsewhere.pt"
    shutil.copy(reference / "checkpoints" / "last.pt", elsewhere)
    with pytest.raises(RunFolderError, match=r"resume=.*elsewhere.pt is not one of its checkpoints"):
        train(config(run, f"resume={elsewhere}"))
    with pytest.raises(RunFolderError, match="overwrite=true .* cannot go with resume=auto"):
        train(config(run, "resume=auto", "overwrite=true"))
    assert (run / "checkpoints" / "last.pt").exists()


def run_folder_commands() -> list[str]:
    """The commands of docs/training.md's "Run folders" section, as written."""
    text = (ROOT / "docs" / "training.md").read_text()
    section = text.split("### Run folders", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    # `... || echo "refused ..."`: the block runs as a script (tests/test_docs_commands.py) and goes on
    return [line.split("#")[0].split("||")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.slow  # four documented trainings: ~30 s
def test_documented_run_folder_commands(tmp_path):
    commands = run_folder_commands()
    assert len(commands) == 4 and all(c.startswith("spikeformers-train ") for c in commands)
    exe = shutil.which("spikeformers-train", path=str(Path(sys.executable).parent))
    outcomes = [subprocess.run([exe, *shlex.split(c)[1:]], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                               timeout=600) for c in commands]
    first, refused, resumed, replaced = outcomes
    assert first.returncode == 0, first.stderr[-2000:]
    (line,) = [line for line in refused.stderr.splitlines() if "already holds a run" in line]
    assert refused.returncode == 2 and line.startswith("spikeformers-train: error: "), refused.stderr[-2000:]
    assert "outputs/first" in line and "resume=auto" in line and "overwrite=true" in line and "Traceback" not in refused.stderr
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
    assert replaced.returncode == 0 and "overwrite=true: removed the earlier run's checkpoints/" in replaced.stdout, \
        replaced.stderr[-2000:]


# --- one training per run folder ---------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from pathlib import Path
from spikeformers.train.checkpoint import RunFolderLock
with RunFolderLock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_training_into_a_busy_folder_stops_at_once_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-P", "-c", HOLD_LOCK, str(run)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.time()
        with pytest.raises(RunFolderError, match=rf"{re.escape(str(run))} is in use by another training \(pid {holder.pid}\)"):
            train(config(run))
        assert time.time() - started < 10, "it must stop before building anything"
        assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    train(config(run, "trainer.epochs=1"))  # the lock dies with its holder (kill -9 included)
    assert not (run / ".train.pid").exists()


# --- kill -9 between the files of an epoch ---------------------------------------------------------


class Killed(BaseException):
    """Stands for kill -9: raised right after a file landed, nothing else runs (no handler
    catches a BaseException that is not an Exception)."""


# Each epoch writes last.pt, best.pt (when top-1 improved), metrics.csv and curves.png; the kill
# lands after the first 1, 2, 5 or 6 of these writes of the run (epoch 0: 1-4, epoch 1: 5-).
@pytest.mark.parametrize("after_writes", [1, 2, 5, 6])
def test_a_kill_between_the_files_of_an_epoch_is_repaired_by_resume(reference, tmp_path, monkeypatch, after_writes):
    run, real_replace, landed = tmp_path / "run", os.replace, []

    def replace_then_die(src, dst):
        real_replace(src, dst)
        if Path(dst).name in RUN_FILES:
            landed.append(Path(dst).name)
            if len(landed) == after_writes:
                raise Killed

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(Killed):
        train(config(run))
    monkeypatch.setattr(os, "replace", real_replace)
    resumed = time.time()
    train(config(run, "resume=auto"))
    assert metrics(run) == metrics(reference)
    best = run / "checkpoints" / "best.pt"
    assert recorded_best_epoch(best) == recorded_best_epoch(reference / "checkpoints" / "best.pt")
    assert same_weights(best, reference / "checkpoints" / "best.pt")
    assert same_weights(run / "checkpoints" / "last.pt", reference / "checkpoints" / "last.pt")
    assert (run / "curves.png").stat().st_mtime >= resumed, "the curves are drawn from the whole history"


# --- stop signals --------------------------------------------------------------------------------


def test_a_stop_signal_during_evaluation_stops_it_and_resume_redoes_it(reference, tmp_path, monkeypatch):
    evaluations = []

    def signalled_evaluate(*args, **kwargs):
        if not evaluations:  # the first evaluation: the signal arrives as it starts
            os.kill(os.getpid(), signal.SIGTERM)
        evaluations.append(1)
        return real_evaluate(*args, **kwargs)

    real_evaluate = train_main.evaluate
    monkeypatch.setattr(train_main, "evaluate", signalled_evaluate)
    run = tmp_path / "run"
    result = train(config(run))
    assert result == {"preempted": True, "epoch": 0, "signal": "SIGTERM"}
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (state["epoch"], state["batch_in_epoch"], state["history"]) == (0, 1, [])  # no partial evaluation kept
    assert not (run / "metrics.csv").exists()
    train(config(run, "resume=auto"))
    assert metrics(run) == metrics(reference)
    assert same_weights(run / "checkpoints" / "last.pt", reference / "checkpoints" / "last.pt")


@pytest.mark.parametrize("sig, status, said", [(signal.SIGINT, 130, "interrupted: saved"),
                                               (signal.SIGUSR2, 75, "preempted: saved")], ids=["ctrl-c", "sigusr2"])
def test_a_stop_signal_checkpoints_and_exits_with_its_status(tmp_path, sig, status, said):
    """Ctrl-C: 130, as shells report it; a scheduler's signal: 75 (EX_TEMPFAIL: retry), never 0 (done)
    nor 1 (a crash); and the run folder's status line says which, where the checkpoint is."""
    run = tmp_path / "run"
    args = ["spikeformers.train.main", "model.args={embed_dim: 16}", "trainer.epochs=50", "trainer.save_every_steps=1",
            "data.num_workers=1", f"hydra.run.dir={run}"]
    # its own process group, as a terminal's foreground job: Ctrl-C reaches the loader worker too
    proc = subprocess.Popen([sys.executable, "-P", "-m", *args], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    last = run / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == status, output[-3000:]
    lines = [line for line in output.splitlines() if said in line]
    assert len(lines) == 1 and str(last) in lines[0] and "Traceback" not in output, output[-3000:]
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 0 and state["batch_in_epoch"] > 0
    (line,) = (run / "status").read_text().splitlines()
    assert line == (f"{said.split(':')[0]}: {sig.name} at epoch 0, step {state['batch_in_epoch']}; checkpoint {last}; "
                    "resume=auto continues")


def test_a_preemption_signal_goes_on_to_the_handler_it_replaced_and_a_second_ctrl_c_stops_at_once():
    from spikeformers.train.distributed import PreemptionFlag

    received = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: received.append(signum))  # as submitit's
    flag = PreemptionFlag()
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flag.requested and flag.signal == signal.SIGUSR2 and not received  # the checkpoint comes first
        flag.pass_on()
        assert received == [signal.SIGUSR2]  # then submitit requeues the job
    finally:
        flag.restore()
        signal.signal(signal.SIGUSR2, previous)
    flag = PreemptionFlag()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.interrupted
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        flag.restore()


# --- DDP: every rank's loss sums, one model --------------------------------------------------------


def test_a_checkpoint_restores_every_ranks_own_loss_sums():
    from types import SimpleNamespace

    state = {"partial_loss": [1.0, 2], "partial_loss_by_rank": [[1.0, 2.0], [5.0, 2.0]]}
    own = train_main._own_partial_loss
    assert own(state, SimpleNamespace(world=2, rank=1, primary=False)) == (5.0, 2)
    assert own(state, SimpleNamespace(world=1, rank=0, primary=True)) == (6.0, 4)  # fewer processes: rank 0 sums
    assert own(state, SimpleNamespace(world=4, rank=3, primary=False)) == (0.0, 0)


def torchrun(run: Path, *overrides: str, cwd: Path, **kwargs):
    args = [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "-m", "spikeformers.train.main", "model.args={embed_dim: 16}", "trainer.max_steps_per_epoch=30",
            "trainer.epochs=1", "data.batch_size=32", "trainer.save_every_steps=1", f"hydra.run.dir={run}", *overrides]
    return subprocess.Popen(args, cwd=cwd, env=dict(ENV, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs)


@pytest.mark.slow  # two torchrun trainings and a resume: ~30 s
def test_ddp_resume_keeps_every_ranks_loss_and_ranks_evaluate_one_model(tmp_path):
    ref = tmp_path / "ref"
    done = torchrun(ref, cwd=tmp_path)
    output, _ = done.communicate(timeout=600)
    assert done.returncode == 0, output[-3000:]
    assert "parameters identical on 2 ranks, buffers (BatchNorm statistics) too" in output

    # the evaluation in metrics.csv is that of the model best.pt holds (rank 0's BatchNorm statistics)
    evaluated = subprocess.run([sys.executable, "-P", "-m", "spikeformers.train.evaluate", "--checkpoint",
                                str(ref / "checkpoints" / "best.pt"), "--json", str(tmp_path / "eval.json")],
                               cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    import json

    (row,) = list(csv.DictReader(open(ref / "metrics.csv")))
    assert json.loads((tmp_path / "eval.json").read_text())["loss"] == pytest.approx(float(row["test_loss"]), abs=2e-6)

    killed = tmp_path / "killed"
    proc = torchrun(killed, cwd=tmp_path)
    last, deadline = killed / "checkpoints" / "last.pt", time.time() + 300
    while time.time() < deadline:  # mid-epoch, then kill -9 every process
        state = _readable(last)
        if state and state["batch_in_epoch"] >= 2:
            break
        time.sleep(0.01)
    kill_tree(proc.pid)
    proc.communicate()
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 0 and 2 <= state["batch_in_epoch"] < 30 and len(state["partial_loss_by_rank"]) == 2
    resumed = torchrun(killed, "resume=auto", cwd=tmp_path)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output[-3000:]
    assert metrics(killed) == metrics(ref)  # train_loss of the interrupted epoch included
    assert same_weights(killed / "checkpoints" / "last.pt", ref / "checkpoints" / "last.pt")


def kill_tree(pid: int) -> None:
    """kill -9 a process and all its descendants (torchrun starts its workers in their own sessions)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _readable(path: Path) -> dict | None:
    try:
        return torch.load(path, weights_only=True)
    except Exception:
        return None
