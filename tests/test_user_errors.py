"""Every mistake gets one short line: the five tools report the user's errors as
``<prog>: error: <message>`` plus at most one ``hint:`` line and exit 2, never a traceback or a
list of state-dict keys; ``SPIKEFORMERS_DEBUG=1`` / ``--debug`` bring the traceback back
(docs/errors.md lists every case)."""

import os
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from spikeformers.models.factory import build_model
from spikeformers.train.cli import compose_config
from spikeformers.train.data import DataInfo

REPO = Path(__file__).resolve().parents[1]
PACKAGED = REPO / "models" / "weights" / "sdt_tiny.digits.safetensors"
DIGITS = DataInfo("digits", 10, 1, 32)
SMALL = "model.args={embed_dim: 16}"


def one_line(err: str, prog: str, *fragments: str) -> None:
    """``err`` is the tool's error line, at most one hint line, and holds every fragment."""
    lines = [line for line in err.splitlines() if line.strip() and "CUDA_HOME" not in line and "Warning" not in line]
    assert 1 <= len(lines) <= 2, err
    assert lines[0].startswith(f"{prog}: error: "), err
    assert len(lines) == 1 or lines[1].startswith("hint: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def run_main(module: str, argv: list[str], capsys) -> tuple[int, str]:
    main = import_module(f"spikeformers.train.{module}").main
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def training_checkpoint_file(path: Path, model_name: str, data: list[str] = ()) -> Path:
    """A spikeformers-train checkpoint (what train/main.py's checkpoint_state records)."""
    cfg = compose_config("train", [f"model.name={model_name}", SMALL, *data])
    with open_dict(cfg):
        cfg.output_dir = str(path.parent / "run")
    model = build_model(cfg.model, DIGITS)
    torch.save({"config": OmegaConf.to_container(cfg, resolve=True), "model": model.state_dict(), "ema": None,
                "num_classes": 10, "model_name": model_name}, path)
    return path


@pytest.fixture
def bad_files(tmp_path):
    """Files that are not checkpoints: empty, truncated, text, a folder."""
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, good)
    files = {"empty": tmp_path / "empty.pt", "truncated": tmp_path / "truncated.pt", "text": tmp_path / "notes.pt",
             "folder": tmp_path / "folder"}
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["text"].write_text("not a checkpoint\n")
    files["folder"].mkdir()
    return files


# --- the mechanism -------------------------------------------------------------------------------


def test_user_error_lives_in_the_model_library_with_a_hint():
    from spikeformers.models.errors import UserError
    from spikeformers.train.cli import error_lines

    err = UserError("T must be a positive integer, got 0", hint="use T=4")
    assert isinstance(err, ValueError) and err.hint == "use T=4"
    assert error_lines("prog", err) == ["prog: error: T must be a positive integer, got 0", "hint: use T=4"]


def test_hydra_errors_become_one_line_and_a_hint():
    from spikeformers.train.cli import error_lines

    with pytest.raises(Exception) as info:
        compose_config("train", ["nosuch=1"])
    assert error_lines("p", info.value) == ["p: error: Could not override 'nosuch': Key 'nosuch' is not in struct",
                                            "hint: To append to your config use +nosuch=1"]
    with pytest.raises(Exception) as info:
        compose_config("train", ["model=nosuch"])
    message, hint = error_lines("p", info.value)
    assert "Could not find 'model/nosuch'" in message and hint.startswith("hint: Available options in 'model': ann, ")


def test_long_and_multi_line_messages_are_cut_with_a_debug_hint():
    from spikeformers.train.cli import error_lines

    lines = error_lines("p", ValueError("first\n" + "x" * 1000))
    assert lines == ["p: error: first", "hint: set SPIKEFORMERS_DEBUG=1 for the full message and traceback"]
    assert len(error_lines("p", ValueError("y" * 5000))[0]) < 450


def test_debug_switch_brings_the_traceback_back(monkeypatch):
    from spikeformers.models.errors import UserError
    from spikeformers.train.cli import user_errors

    with pytest.raises(UserError):
        with user_errors("p", debug=True):
            raise UserError("shown with its traceback")
    monkeypatch.setenv("SPIKEFORMERS_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        with user_errors("p"):
            raise FileNotFoundError("x.pt")
    monkeypatch.setenv("SPIKEFORMERS_DEBUG", "0")
    with pytest.raises(SystemExit):
        with user_errors("p"):
            raise FileNotFoundError("x.pt")


def test_bugs_keep_their_traceback():
    from spikeformers.train.cli import user_errors

    for bug in (RuntimeError("internal"), KeyError("model"), OSError("no filename")):
        with pytest.raises(type(bug)):
            with user_errors("p"):
                raise bug


@pytest.mark.parametrize("module, prog, argv", [
    ("evaluate", "spikeformers-eval", ["--no-such-flag"]),
    ("energy", "spikeformers-energy", ["--no-such-flag"]),
    ("convert", "spikeformers-convert", ["qcfs", "--no-such-flag"]),
    ("hub_cli", "spikeformers-hub", ["no-such-command"]),
])
def test_usage_errors_are_one_line_without_the_usage_block(module, prog, argv, capsys):
    code, err = run_main(module, argv, capsys)
    assert code == 2
    one_line(err, prog, f"{prog} --help")


# --- spikeformers-train ---------------------------------------------------------------------------


@pytest.mark.parametrize("override, fragment", [
    ("trainer.epochs=abc", "trainer.epochs must be a positive integer, got 'abc'"),
    ("trainer.epochs=2.5", "trainer.epochs must be a positive integer"),
    ("model.T=0", "model.T must be a positive integer or null, got 0"),
    ("model.T=-1", "model.T must be a positive integer"),
    ("model.T=2.5", "model.T must be a positive integer"),
    ("optim.lr=fast", "optim.lr must be a positive number"),
    ("data.batch_size=0", "data.batch_size must be a positive integer"),
    ("trainer.memory=tiny", "trainer.memory must be one of plain, checkpoint, packed"),
    ("trainer.threads=0", "trainer.threads must be a positive integer or null, got 0"),
    ("trainer.threads=two", "trainer.threads must be a positive integer or null, got 'two'"),
    ("nosuch=1", "Could not override 'nosuch'"),
    ("model=nosuch", "Could not find 'model/nosuch'"),
    ("model.T=[1", "no viable alternative"),
    ("experiment=atsnn_digits_finetune", "finetune_from is required"),
])
def test_train_rejects_bad_overrides_before_making_a_run_folder(override, fragment, tmp_path, monkeypatch, capsys):
    from spikeformers.train.main import main

    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["spikeformers-train", override, f"hydra.run.dir={run_dir}"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    one_line(capsys.readouterr().err, "spikeformers-train", fragment)
    assert not run_dir.exists()


def test_typed_fields_name_the_field_and_accept_good_values():
    from spikeformers.models.errors import UserError
    from spikeformers.train.cli import TRAIN_FIELDS, check_fields

    check_fields(compose_config("train", ["model.T=8", "optim.lr=1e-3", "trainer.grad_clip=null"]), TRAIN_FIELDS)
    with pytest.raises(UserError, match=r"trainer\.ema\.decay must be a number between 0 and 1"):
        check_fields(compose_config("train", ["trainer.ema.decay=2"]), TRAIN_FIELDS)
    with pytest.raises(UserError, match="model.pretrained must be true or false"):
        check_fields(compose_config("train", ["model.pretrained=yes please"]), TRAIN_FIELDS)


def _train(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-m", "spikeformers.train.main", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


def test_train_resume_from_another_model_is_one_line_inside_the_job(tmp_path):
    other = training_checkpoint_file(tmp_path / "spikformer.pt", "spikformer_tiny")
    out = _train([f"resume={other}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    one_line(out.stderr, "spikeformers-train", "holds a spikformer_tiny model, not the sdt_tiny asked for")
    assert "Error executing job" not in out.stderr

    debug = _train(["trainer.epochs=abc", f"hydra.run.dir={tmp_path / 'run2'}"], tmp_path, SPIKEFORMERS_DEBUG="1")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "trainer.epochs" in debug.stderr


# --- checkpoints and weights files --------------------------------------------------------------


@pytest.mark.parametrize("kind, fragment", [
    ("empty", "is empty (0 bytes)"), ("truncated", "truncated or corrupt"), ("text", "not a PyTorch or safetensors file"),
    ("folder", "is a folder, not a file"),
])
def test_eval_of_a_file_that_is_not_a_checkpoint(kind, fragment, bad_files, capsys):
    code, err = run_main("evaluate", ["--checkpoint", str(bad_files[kind])], capsys)
    assert code == 2
    one_line(err, "spikeformers-eval", str(bad_files[kind]), fragment, "hint: expected")


def test_read_checkpoint_names_what_was_expected(bad_files):
    from spikeformers.models.errors import UserError
    from spikeformers.models.factory import read_checkpoint

    for path in bad_files.values():
        with pytest.raises(UserError) as info:
            read_checkpoint(path, "resume checkpoint")
        assert str(info.value).startswith(f"resume checkpoint {path}") and "spikeformers-train" in info.value.hint


def test_eval_loads_a_safetensors_weights_file(capsys, tmp_path):
    from spikeformers.train.evaluate import main

    out = tmp_path / "eval.json"
    assert main(["--checkpoint", str(PACKAGED), "batch_size=360", "--json", str(out)]) == 0
    assert '"model": "sdt_tiny"' in out.read_text() and '"top1": 9' in out.read_text()  # the packaged 99.2%

    code, err = run_main("evaluate", ["--checkpoint", str(PACKAGED), "model.name=spikformer_tiny"], capsys)
    assert code == 2
    one_line(err, "spikeformers-eval", "holds a sdt_tiny model, not the spikformer_tiny asked for")


def test_weights_of_another_model_are_one_line_not_a_key_list(tmp_path):
    from spikeformers.models.errors import UserError
    from spikeformers.models.factory import load_model_weights

    other = training_checkpoint_file(tmp_path / "spikformer.pt", "spikformer_tiny")
    cfg = compose_config("train", ["model.name=sdt_tiny", SMALL, f"model.checkpoint={other}"])
    with pytest.raises(UserError) as info:
        build_model(cfg.model, DIGITS)
    assert "holds a spikformer_tiny model, not the sdt_tiny asked for" in str(info.value)

    wider = training_checkpoint_file(tmp_path / "wider.pt", "sdt_tiny")  # embed_dim 16; asked for depth 1
    cfg = compose_config("train", ["model.args={embed_dim: 16, depth: 1}", f"model.checkpoint={wider}"])
    with pytest.raises(UserError, match=r"does not fit sdt_tiny: \d+ unexpected \(first: block\.1\.") as info:
        build_model(cfg.model, DIGITS)
    assert "model.args" in info.value.hint and "\n" not in str(info.value)

    model = build_model(compose_config("train", [SMALL]).model, DIGITS)
    state = build_model(compose_config("train", ["model.args={embed_dim: 32}"]).model, DIGITS).state_dict()
    with pytest.raises(UserError) as info:
        load_model_weights(model, state, "x.pt", "sdt_tiny")
    message = str(info.value)
    assert message.startswith("x.pt does not fit sdt_tiny: ") and "shape mismatches (first: " in message
    assert "\n" not in message and len(message) < 400


def test_energy_and_convert_refuse_a_checkpoint_that_is_not_one(bad_files, capsys):
    code, err = run_main("energy", ["--checkpoint", str(bad_files["empty"])], capsys)
    assert code == 2
    one_line(err, "spikeformers-energy", "is empty (0 bytes)")
    code, err = run_main("convert", ["qcfs", "--checkpoint", str(bad_files["truncated"])], capsys)
    assert code == 2
    one_line(err, "spikeformers-convert", "truncated or corrupt")


def test_energy_names_both_models_when_the_checkpoint_holds_another(tmp_path, capsys):
    ckpt = training_checkpoint_file(tmp_path / "sdt.pt", "sdt_tiny")
    code, err = run_main("energy", ["spikformer_tiny", "--checkpoint", str(ckpt)], capsys)
    assert code == 2
    one_line(err, "spikeformers-energy", "holds a sdt_tiny model, not the spikformer_tiny asked for")


# --- names, T and options that cannot apply ------------------------------------------------------


def test_unknown_names_suggest_the_nearest(capsys):
    code, err = run_main("evaluate", ["model.name=sdt_tny", "model.pretrained=true"], capsys)
    assert code == 2
    one_line(err, "spikeformers-eval", "unknown model 'sdt_tny'", "did you mean sdt_tiny")
    code, err = run_main("evaluate", ["model.name=sdt_tiny.nosuch", "model.pretrained=true"], capsys)
    assert code == 2
    one_line(err, "spikeformers-eval", "sdt_tiny has no pretrained tag 'nosuch'", "digits")


def test_eval_without_weights_refuses_to_report_a_random_network(capsys):
    code, err = run_main("evaluate", [], capsys)
    assert code == 2
    one_line(err, "spikeformers-eval", "nothing to evaluate", "--checkpoint")


def test_eval_refuses_model_overrides_of_a_checkpoint(tmp_path, capsys):
    ckpt = training_checkpoint_file(tmp_path / "sdt.pt", "sdt_tiny")
    code, err = run_main("evaluate", ["--checkpoint", str(ckpt), "model.T=8"], capsys)
    assert code == 2
    one_line(err, "spikeformers-eval", "model.T cannot apply to checkpoint", "sdt_tiny")


def test_eval_data_field_override_keeps_the_checkpoint_data_set(tmp_path, capsys):
    ckpt = training_checkpoint_file(tmp_path / "cifar.pt", "sdt_tiny", ["data=cifar10", f"data.root={tmp_path / 'a'}"])
    code, err = run_main("evaluate", ["--checkpoint", str(ckpt), f"data.root={tmp_path / 'b'}"], capsys)
    assert code == 2
    one_line(err, "spikeformers-eval", "cifar10 not found", str(tmp_path / "b"))


@pytest.mark.parametrize("value", ["0", "-1", "2.5", "four"])
def test_energy_T_must_be_a_positive_integer(value, capsys):
    code, err = run_main("energy", ["--T", value, "--n", "1"], capsys)
    assert code == 2
    one_line(err, "spikeformers-energy", "--T", "must be a positive integer")


def test_energy_data_root_without_data_is_refused(tmp_path, capsys):
    code, err = run_main("energy", ["--data-root", str(tmp_path), "--n", "1"], capsys)
    assert code == 2
    one_line(err, "spikeformers-energy", "--data-root needs --data")


def test_convert_rejects_bad_model_args_in_one_line(capsys):
    code, err = run_main("convert", ["ecmt", "--model", "vit_tiny_patch16_224", "--data", "digits", "--model-args", "{oops"],
                         capsys)
    assert code == 2
    one_line(err, "spikeformers-convert", "--model-args must be a JSON object")


def test_finetune_from_the_other_backbone_names_the_preset_that_pairs_with_it(tmp_path):
    from spikeformers.models.errors import UserError

    sdt = training_checkpoint_file(tmp_path / "sdt.pt", "sdt_tiny")
    cfg = compose_config("train", ["experiment=atsnn_digits_finetune", f"finetune_from={sdt}"])
    with pytest.raises(UserError) as info:
        build_model(cfg.model, DIGITS)
    assert "holds a sdt_tiny model, not the atsnn_spikformer_tiny asked for" in str(info.value)
    assert "model.name=atsnn_sdt_tiny (experiment=atsnn_sdt_digits_finetune)" in info.value.hint


def test_energy_of_an_ann_checkpoint_points_to_the_converted_snn(tmp_path, capsys):
    ckpt = tmp_path / "qcfs.pt"
    cfg = compose_config("train", ["model=qcfs", "model.name=qcfs_vgg_tiny"])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run")
    torch.save({"config": OmegaConf.to_container(cfg, resolve=True), "model": build_model(cfg.model, DIGITS).state_dict(),
                "ema": None, "num_classes": 10, "model_name": "qcfs_vgg_tiny"}, ckpt)
    code, err = run_main("energy", ["--checkpoint", str(ckpt), "--n", "8"], capsys)
    assert code == 2
    one_line(err, "spikeformers-energy", "qcfs_vgg_tiny is an ANN", f"spikeformers-convert qcfs --checkpoint {ckpt} --energy")


def test_energy_warns_when_the_network_never_fires(tmp_path, capsys):
    from spikeformers.train.energy import main

    silent = training_checkpoint_file(tmp_path / "silent.pt", "sdt_tiny")  # untrained: no spike gets past the stem
    assert main(["--checkpoint", str(silent), "--n", "8"]) == 0
    assert "never fires is not a result" in capsys.readouterr().err
    assert main(["--n", "8"]) == 0  # the trained sdt_tiny.digits fires
    assert "never fires" not in capsys.readouterr().err


@pytest.mark.parametrize("module, prog, argv, fragment", [
    ("evaluate", "spikeformers-eval", ["model.name=sdt_tiny.digits", "model.pretrained=true", "convert_T=16"],
     "convert_T cannot apply without convert"),
    ("evaluate", "spikeformers-eval", ["model.name=sdt_tiny.digits", "model.pretrained=true", "use_ema=false"],
     "use_ema applies only to a spikeformers-train checkpoint"),
    ("energy", "spikeformers-energy", ["--no-ema", "--n", "1"], "--no-ema applies only with --checkpoint"),
])
def test_options_that_cannot_apply_are_refused(module, prog, argv, fragment, capsys):
    code, err = run_main(module, argv, capsys)
    assert code == 2
    one_line(err, prog, fragment)
