"""Training: configs, data formats, the loop's outputs, exact resume, preemption, errors, eval,
DDP (gloo, 2 processes), SLURM launcher composition, wandb offline."""

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict
from PIL import Image

from spikeformers.train.data import DatasetError, Digits, EpochSeeded, build_datasets
from spikeformers.train.main import build_model, train

# A few-second model: the default sdt_tiny at D=16, two steps per epoch.
SMALL = ["model.args={embed_dim: 16}", "trainer.max_steps_per_epoch=2", "trainer.epochs=2", "data.eval_batch_size=360"]
ENV = dict(os.environ, SPIKEFORMERS_LIF_COMPILE="0", WANDB_SILENT="true", PYTHONUNBUFFERED="1")


@pytest.fixture
def make_cfg(tmp_path):
    def _make(*overrides, config_name="train"):
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="spikeformers.configs", version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
        with open_dict(cfg):
            cfg.output_dir = str(tmp_path / "run")
        return cfg

    yield _make
    GlobalHydra.instance().clear()


def run_cli(*args, cwd, timeout=300, **kwargs):
    return subprocess.run([sys.executable, "-P", "-m", *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


# --- configs -----------------------------------------------------------------------------------


def test_default_config_is_the_digits_job(make_cfg):
    cfg = make_cfg()
    assert cfg.model.name == "sdt_tiny" and cfg.data.name == "digits" and cfg.model.T == 4
    assert cfg.optim.name == "adamw" and cfg.sched.name == "cosine"


def test_unknown_key_is_a_hydra_error(make_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        make_cfg("trainer.epohcs=3")
    with pytest.raises(ConfigCompositionException):
        make_cfg("data=svhn")


def test_slurm_launcher_composes_job_parameters():
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="spikeformers.configs", version_base="1.3"):
        cfg = compose("train", overrides=["launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.partition=gpu",
                                          "hydra.launcher.timeout_min=600"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 8, 8)
    assert launcher.partition == "gpu" and launcher.timeout_min == 600 and launcher.max_num_timeout > 0
    assert cfg.resume == "auto" and cfg.trainer.device == "cuda"


# --- data --------------------------------------------------------------------------------------


def test_digits_split_and_shapes():
    train_set, test_set = Digits(True), Digits(False)
    assert (len(train_set), len(test_set)) == (1437, 360)
    image, label = test_set[0]
    assert image.shape == (1, 32, 32) and 0 <= label <= 9
    assert torch.equal(Digits(False).images, test_set.images), "the split is fixed"
    assert sorted(set(test_set.labels.tolist())) == list(range(10))


def test_epoch_seeded_augmentation_is_reproducible():
    ds = EpochSeeded(Digits(True), seed=3)
    indices = range(10)
    ds.set_epoch(1)
    epoch1 = [ds[i][0] for i in indices]
    ds.set_epoch(2)
    epoch2 = [ds[i][0] for i in indices]
    ds.set_epoch(1)
    assert all(torch.equal(x, ds[i][0]) for x, i in zip(epoch1, indices)), "same (epoch, index), same sample"
    assert any(not torch.equal(x, y) for x, y in zip(epoch1, epoch2)), "another epoch, other shifts"


def _write_cifar(root: Path, name: str, n: int = 6):
    folder, files, key = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"),
        "cifar100": ("cifar-100-python", ["train", "test"], b"fine_labels"),
    }[name]
    (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for file in files:
        labels = [i % (10 if name == "cifar10" else 100) for i in range(n)]
        entry = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: labels, b"batch_label": b"x"}
        with open(root / folder / file, "wb") as f:
            pickle.dump(entry, f)


@pytest.mark.parametrize("name,classes,train_n", [("cifar10", 10, 30), ("cifar100", 100, 6)])
def test_cifar_pickle_layout(make_cfg, tmp_path, name, classes, train_n):
    _write_cifar(tmp_path / "data", name)
    cfg = make_cfg(f"data={name}", f"data.root={tmp_path / 'data'}")
    train_set, test_set, info = build_datasets(cfg.data)
    assert (len(train_set), len(test_set), info.num_classes) == (train_n, 6, classes)
    image, label = train_set[0]
    assert image.shape == (3, 32, 32) and label == 0


def test_missing_and_malformed_cifar(make_cfg, tmp_path):
    cfg = make_cfg("data=cifar10", f"data.root={tmp_path}")
    with pytest.raises(DatasetError, match=r"cifar10 not found: expected .*cifar-10-batches-py/\{data_batch_1,.*test_batch\}") as err:
        build_datasets(cfg.data)
    assert "\n" not in str(err.value)
    _write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"nodata": 1}))
    with pytest.raises(DatasetError, match="is not a CIFAR pickle batch"):
        build_datasets(cfg.data)


def test_tinyimagenet_layout(make_cfg, tmp_path):
    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819"]
    (base).mkdir()
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for k, wnid in enumerate(wnids):
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (64, 64), (k * 100, i * 50, 0)).save(folder / f"{wnid}_{i}.JPEG")
    (base / "val" / "images").mkdir(parents=True)
    lines = []
    for i, wnid in enumerate(["n01629819", "n01443537"]):
        Image.new("RGB", (64, 64)).save(base / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    cfg = make_cfg("data=tinyimagenet", f"data.root={tmp_path}")
    train_set, test_set, info = build_datasets(cfg.data)
    assert (len(train_set), len(test_set), info.num_classes) == (6, 2, 2)
    assert [y for _, y in test_set.samples] == [1, 0]
    assert train_set[0][0].shape == (3, 64, 64)


def test_imagenet_folder_layout(make_cfg, tmp_path):
    for split in ("train", "val"):
        for wnid in ("n1", "n2", "n3"):
            (tmp_path / split / wnid).mkdir(parents=True)
            Image.new("RGB", (40, 30)).save(tmp_path / split / wnid / "a.JPEG")
    cfg = make_cfg("data=imagenet", f"data.root={tmp_path}", "data.img_size=32")
    train_set, test_set, info = build_datasets(cfg.data)
    assert (len(train_set), len(test_set), info.num_classes) == (3, 3, 3)
    assert train_set[0][0].shape == (3, 32, 32)
    with pytest.raises(DatasetError, match=r"imagenet not found: expected .*\{train,val\}/<wnid>/\*\.JPEG"):
        build_datasets(make_cfg("data=imagenet", f"data.root={tmp_path / 'nope'}").data)


# --- the loop ----------------------------------------------------------------------------------


def test_short_run_writes_every_output(make_cfg, tmp_path):
    cfg = make_cfg(*SMALL)
    result = train(cfg)
    out = Path(cfg.output_dir)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 2
    assert {"epoch", "lr", "train_loss", "test_loss", "test_top1", "test_top5", "epoch_seconds"} <= set(rows[0])
    assert all(0 <= float(r["test_top1"]) <= 100 for r in rows)
    assert OmegaConf.load(out / "config.yaml").model.name == "sdt_tiny"
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "ema", "scaler", "epoch", "rng", "config"} <= set(state)
    assert state["epoch"] == 2 and state["global_step"] == 4
    assert (out / "checkpoints" / "best.pt").exists()
    assert result["best_top1"] == pytest.approx(max(float(r["test_top1"]) for r in rows), abs=1e-3)  # csv: 4 decimals
    assert not list(out.rglob("*.tmp")), "no temporary files left behind"
    best = max(rows, key=lambda r: float(r["test_top1"]))
    assert (out / "status").read_text() == (f"finished: best top-1 {float(best['test_top1']):.2f}% (epoch "
                                            f"{int(best['epoch']) + 1}), final {float(rows[-1]['test_top1']):.2f}%; 2 epochs\n")


def _final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.mark.slow  # three trainings, one killed: ~26 s
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    args = ["spikeformers.train.main", "model.args={embed_dim: 16}", "trainer.max_steps_per_epoch=6", "trainer.epochs=3",
            "trainer.save_every_steps=1", "data.eval_batch_size=360"]
    ref = tmp_path / "ref"
    done = run_cli(*args, f"hydra.run.dir={ref}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-P", "-m", *args, f"hydra.run.dir={killed}"], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until the run is mid-way through epoch 1, then SIGKILL
        if last.exists():
            try:
                state = torch.load(last, weights_only=True)
            except Exception:
                state = None
            if state and (state["epoch"], state["batch_in_epoch"]) >= (1, 2):
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(last, weights_only=True)
    assert state["global_step"] < 18, "the run must be interrupted before it finished"
    resumed = run_cli(*args, f"hydra.run.dir={killed}", f"resume={last}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _final_weights(ref), _final_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_a = list(csv.DictReader(open(ref / "metrics.csv")))
    rows_b = list(csv.DictReader(open(killed / "metrics.csv")))
    assert [r["test_top1"] for r in rows_a] == [r["test_top1"] for r in rows_b]
    assert [r["train_loss"] for r in rows_a] == [r["train_loss"] for r in rows_b]  # incl. the interrupted epoch


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    args = ["spikeformers.train.main", "model.args={embed_dim: 16}", "trainer.epochs=50", "trainer.save_every_steps=1",
            f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen([sys.executable, "-P", "-m", *args], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline:
        time.sleep(0.05)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75, output[-2000:]  # EX_TEMPFAIL: preempted after the checkpoint, resume continues
    assert time.time() - t0 < 20
    assert "preempted: saved" in output
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 0 and state["batch_in_epoch"] > 0


def test_nonfinite_loss_stops_with_a_clear_error(make_cfg):
    cfg = make_cfg(*SMALL, "optim.lr=1e30", "sched.warmup_epochs=0", "trainer.max_steps_per_epoch=20")
    with pytest.raises(FloatingPointError, match=r"non-finite training loss .* at epoch \d+, step \d+"):
        train(cfg)
    assert (Path(cfg.output_dir) / "status").read_text().startswith("failed: FloatingPointError: non-finite training loss")


def test_incompatible_model_and_data(make_cfg):
    with pytest.raises(ValueError, match="built for event-frame .* but data=digits provides static images"):
        train(make_cfg("model=sdt_cifar10dvs_2_256"))


def test_eval_cli_writes_json(make_cfg, tmp_path):
    cfg = make_cfg(*SMALL)
    train(cfg)
    ckpt = Path(cfg.output_dir) / "checkpoints" / "best.pt"
    out = run_cli("spikeformers.train.evaluate", "--checkpoint", str(ckpt), "--json", str(tmp_path / "eval.json"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result) == {"model", "checkpoint", "dataset", "top1", "top5", "loss", "firing_rate", "n_samples"}
    assert result["dataset"] == "digits" and result["n_samples"] == 360 and result["model"] == "sdt_tiny"
    best = max(float(r["test_top1"]) for r in csv.DictReader(open(Path(cfg.output_dir) / "metrics.csv")))
    assert abs(result["top1"] - best) < 1e-3  # metrics.csv rounds to 4 decimals
    assert "top1" in out.stdout


def test_ddp_two_processes_gloo_keep_identical_parameters(tmp_path):
    run = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "spikeformers.train.main", "model.args={embed_dim: 16}", "trainer.max_steps_per_epoch=3",
         "trainer.epochs=1", "data.batch_size=32", f"hydra.run.dir={run}"],
        cwd=tmp_path, env=dict(ENV, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parameters identical on 2 ranks" in proc.stdout + proc.stderr
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 1


def test_wandb_offline_run_files(make_cfg):
    cfg = make_cfg(*SMALL, "logger=wandb", "logger.mode=offline")
    train(cfg)
    runs = list((Path(cfg.output_dir) / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


# --- experiment presets ------------------------------------------------------------------------

EXPERIMENTS = sorted(
    p.name[:-5] for p in __import__("importlib.resources").resources.files("spikeformers.configs").joinpath("experiment").iterdir()
    if p.name.endswith(".yaml")
)


def test_every_paper_recipe_has_a_preset():
    assert {"spikformer_cifar10", "spikformer_cifar100", "spikformer_imagenet_8_512", "spikformer_cifar10dvs",
            "sdt_cifar10", "sdt_cifar100", "sdt_cifar10_tet", "sdt_cifar10dvs", "sdt_gesture_t10", "sdt_gesture_t16",
            "sdt_imagenet_8_384", "sdt_imagenet_6_512", "sdt_imagenet_8_512", "sdt_imagenet_10_512",
            "sdt_imagenet_8_768"} <= set(EXPERIMENTS)


TIMM_SCRIPT_RECIPES = ("spikformer_", "sdt_", "spikingformer_", "qkformer_cifar", "qkformer_gesture")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_presets_compose(make_cfg, name):
    import timm

    cfg = make_cfg(f"experiment={name}")
    assert timm.is_model(cfg.model.name)
    assert cfg.data.smoothing == 0.1
    # Recipes of the timm train script (Spikformer, SDT v1, Spikingformer, QKFormer CIFAR/DVS): per-epoch
    # LR, epochs + 10 cooldown. MAE-style (SDT v2, QKFormer ImageNet), QCFS and digits presets differ.
    if name.startswith(TIMM_SCRIPT_RECIPES) and not name.endswith("_digits"):
        assert cfg.sched.step_on_epochs and cfg.sched.cooldown_epochs == 10


def test_recipe_values_follow_the_spec(make_cfg):
    # the official recipes of Spikformer and SDT v1
    sf = make_cfg("experiment=spikformer_cifar10")
    assert (sf.optim.name, sf.optim.lr, sf.optim.weight_decay, sf.data.batch_size) == ("adamw", 5e-4, 6e-2, 128)
    assert (sf.data.mixup.mixup, sf.data.mixup.off_epoch, sf.data.aug.re_prob) == (0.5, 200, 0.25)
    big = make_cfg("experiment=sdt_imagenet_8_768")
    assert (big.optim.name, big.optim.lr, big.sched.min_lr, big.data.mixup.prob) == ("lamb", 1e-3, 2e-5, 1.0)
    assert big.data.aug.auto_augment == "rand-m7-mstd0.5-inc1" and list(big.data.aug.scale) == [0.08, 1.0]
    dvs = make_cfg("experiment=sdt_cifar10dvs")
    assert (dvs.model.T, dvs.data.frames, dvs.data.frame_size, dvs.trainer.tet.enable) == (10, 10, 64, True)


@pytest.mark.parametrize("name", ["spikformer_cifar10", "sdt_cifar10_tet"])
def test_cifar_recipe_runs_one_step(make_cfg, tmp_path, name):
    # RandAugment, mixup, random erasing, bf16 autocast (spikformer) and TET (sdt) on tiny CIFAR pickles.
    _write_cifar(tmp_path / "data", "cifar10", n=16)
    cfg = make_cfg(f"experiment={name}", f"data.root={tmp_path / 'data'}", "model.args={embed_dim: 16, depth: 1, num_heads: 2}",
                   "trainer.epochs=1", "trainer.max_steps_per_epoch=2", "data.batch_size=8", "data.num_workers=0",
                   "sched.warmup_epochs=0", "sched.cooldown_epochs=0", "data.eval_batch_size=16")
    result = train(cfg)
    rows = list(csv.DictReader(open(Path(cfg.output_dir) / "metrics.csv")))
    assert len(rows) == 1 and float(rows[0]["train_loss"]) > 0
    assert result["best_epoch"] == 0


# --- event-camera data (SpikingJelly layouts, events_np/ written here) -------------------------

CIFAR10DVS_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _events(rng, n=300, size=128):
    return dict(t=np.sort(rng.integers(0, 10_000, n)).astype(np.int64), x=rng.integers(0, size, n).astype(np.uint16),
                y=rng.integers(0, size, n).astype(np.uint16), p=rng.integers(0, 2, n).astype(np.uint8))


def _write_cifar10dvs(root: Path, per_class: int = 10):
    rng = np.random.default_rng(0)
    for cls in CIFAR10DVS_CLASSES:
        (root / "events_np" / cls).mkdir(parents=True)
        for i in range(per_class):
            np.savez(root / "events_np" / cls / f"cifar10_{cls}_{i}.npz", **_events(rng))


def test_cifar10dvs_frames_split_and_resize(make_cfg, tmp_path):
    _write_cifar10dvs(tmp_path / "c10dvs")
    cfg = make_cfg("model=sdt_cifar10dvs_2_256", "model.T=4", "data=cifar10dvs", f"data.root={tmp_path / 'c10dvs'}",
                   "data.frame_size=64")
    train_set, test_set, info = build_datasets(cfg.data)
    assert (len(train_set), len(test_set)) == (90, 10)  # first 90% of every class trains
    assert info.sequence and info.frames == 4 and info.in_chans == 2 and info.img_size == 64
    frames, label = test_set[0]
    assert frames.shape == (4, 2, 64, 64) and frames.dtype == torch.float32 and label == 0
    assert sorted({y for _, y in (train_set[i] for i in range(0, 90, 9))}) == list(range(10))


def test_gesture_frames(make_cfg, tmp_path):
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for cls in range(11):
            folder = tmp_path / "gesture" / "events_np" / split / str(cls)
            folder.mkdir(parents=True)
            np.savez(folder / "user01_fluorescent.npz", **_events(rng))
    cfg = make_cfg("model=sdt_gesture_2_256", "model.T=3", "data=gesture", f"data.root={tmp_path / 'gesture'}")
    train_set, test_set, info = build_datasets(cfg.data)
    assert (len(train_set), len(test_set), info.num_classes) == (11, 11, 11)
    assert train_set[0][0].shape == (3, 2, 128, 128)


def test_dvs_run_one_step_and_missing_root(make_cfg, tmp_path):
    _write_cifar10dvs(tmp_path / "c10dvs")
    cfg = make_cfg("experiment=sdt_cifar10dvs", "model.T=2", f"data.root={tmp_path / 'c10dvs'}",
                   "model.args={embed_dim: 16, depth: 1, num_heads: 2}", "trainer.epochs=1", "trainer.max_steps_per_epoch=1",
                   "data.batch_size=4", "data.num_workers=0", "sched.warmup_epochs=0", "sched.cooldown_epochs=0")
    result = train(cfg)  # frames arrive [B, T, ...] and are fed time-first; TET loss on per-step logits
    assert result["best_epoch"] == 0
    missing = make_cfg("experiment=sdt_cifar10dvs", f"data.root={tmp_path / 'nowhere'}")
    with pytest.raises(DatasetError, match="cifar10dvs not found: expected a SpikingJelly data set root"):
        build_datasets(missing.data)


def test_channels_last_and_bf16_autocast_options(make_cfg):
    cfg = make_cfg("model.args={embed_dim: 16}", "trainer.epochs=1", "trainer.max_steps_per_epoch=1",
                   "trainer.channels_last=true", "trainer.amp=true", "trainer.grad_clip=1.0", "sched.warmup_epochs=0")
    result = train(cfg)
    assert result["best_epoch"] == 0 and result["final_top1"] is not None


# --- fine-tuning -------------------------------------------------------------------------------


def _write_learnable_cifar(root: Path, n_train: int = 160, n_test: int = 40):
    """CIFAR-10 pickles whose class is the image's dominant colour channel and brightness."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n):
        labels = [i % 10 for i in range(n)]
        images = rng.integers(0, 40, (n, 3, 32, 32))
        for i, y in enumerate(labels):
            images[i, y % 3] += 60 + 18 * y
        return {b"data": images.clip(0, 255).astype(np.uint8).reshape(n, 3072), b"labels": labels}

    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(n_train // 5), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(n_test), f)


def test_finetune_digits_checkpoint_on_cifar_format_data(make_cfg, tmp_path):
    _write_learnable_cifar(tmp_path / "data")
    cfg = make_cfg("experiment=finetune_cifar10", f"data.root={tmp_path / 'data'}", "data.num_workers=0",
                   "data.batch_size=32", "trainer.epochs=6", "sched.warmup_epochs=0", "data.eval_batch_size=40",
                   "optim.lr=3e-3")
    train(cfg)
    rows = list(csv.DictReader(open(Path(cfg.output_dir) / "metrics.csv")))
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0] - 0.1, losses
    state = torch.load(Path(cfg.output_dir) / "checkpoints" / "last.pt", weights_only=True)
    assert state["model"]["head.weight"].shape == (10, 64)
    assert state["model"]["patch_embed.proj_conv.weight"].shape[1] == 3  # adapted from the 1-channel digits conv


def test_init_from_own_checkpoint_keeps_matching_head(make_cfg, tmp_path):
    cfg = make_cfg(*SMALL)
    train(cfg)
    last = Path(cfg.output_dir) / "checkpoints" / "last.pt"
    again = make_cfg(*SMALL, f"model.checkpoint={last}")
    _, _, info = build_datasets(again.data)
    model = build_model(again.model, info)
    saved = torch.load(last, weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_freeze_backbone_trains_only_the_head(make_cfg):
    cfg = make_cfg(*SMALL, "trainer.freeze_backbone=true", "trainer.epochs=1", "sched.warmup_epochs=0")
    from spikeformers.train.main import build_model

    torch.manual_seed(cfg.seed)
    _, _, info = build_datasets(cfg.data)
    before = build_model(cfg.model, info).state_dict()
    train(cfg)
    after = torch.load(Path(cfg.output_dir) / "checkpoints" / "last.pt", weights_only=True)["model"]
    changed = {k for k in after if k.endswith("weight") and not torch.equal(after[k], before[k])}
    assert changed == {"head.weight"}


@pytest.mark.parametrize("memory", ["checkpoint", "packed"])
def test_memory_options_train_to_the_same_weights(make_cfg, tmp_path, memory):
    plain = make_cfg(*SMALL)
    train(plain)
    other = make_cfg(*SMALL, f"trainer.memory={memory}")
    with open_dict(other):
        other.output_dir = str(tmp_path / memory)
    train(other)
    a = torch.load(Path(plain.output_dir) / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(Path(other.output_dir) / "checkpoints" / "last.pt", weights_only=True)["model"]
    if memory == "packed":  # bits unpack to the same values: identical arithmetic
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_memory_option_rejects_unknown_names(make_cfg):
    with pytest.raises(ValueError, match="trainer.memory must be 'plain', 'checkpoint' or 'packed', got 'bits'"):
        train(make_cfg(*SMALL, "trainer.memory=bits"))


def test_atsnn_finetune_preset_starts_from_the_backbone(make_cfg, tmp_path):
    from omegaconf.errors import InterpolationToMissingValueError

    with pytest.raises(InterpolationToMissingValueError, match="Missing mandatory value: finetune_from"):
        make_cfg("experiment=atsnn_digits_finetune").model.checkpoint  # noqa: B018
    small = ["+model.args.embed_dim=16", "+model.args.num_heads=2", "trainer.max_steps_per_epoch=2", "trainer.epochs=1",
             "data.eval_batch_size=360"]
    base = make_cfg("experiment=atsnn_digits", "atsnn=off", *small)
    train(base)
    backbone = Path(base.output_dir) / "checkpoints" / "last.pt"
    tuned = make_cfg("experiment=atsnn_digits_finetune", f"finetune_from={backbone}", *small)
    with open_dict(tuned):
        tuned.output_dir = str(tmp_path / "tuned")
    assert tuned.atsnn.bn_stats == "running" and tuned.model.checkpoint == str(backbone)
    a = torch.load(backbone, weights_only=True)["model"]
    start = build_model(tuned.model, build_datasets(tuned.data)[2]).state_dict()
    assert a.keys() == start.keys() and all(torch.equal(a[k], start[k]) for k in a)
    train(tuned)
    b = torch.load(Path(tuned.output_dir) / "checkpoints" / "last.pt", weights_only=True)["model"]
    # bn_stats=running: the blocks' BN statistics stay the backbone's
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("block") and "running" in k)
    rows = (Path(tuned.output_dir) / "metrics.csv").read_text().splitlines()
    assert "tokens_per_image" in rows[0]


# --- CPU threads -------------------------------------------------------------------------------


def test_auto_threads_leave_one_cpu_and_share_the_rest_among_the_node_processes():
    from spikeformers.train.distributed import auto_threads

    # (available CPUs, processes on the node) -> threads per process: (CPUs - 1) // processes, at least 1
    cases = {(1, 1): 1, (2, 1): 1, (4, 1): 3, (16, 1): 15, (16, 8): 1, (64, 8): 7, (2, 4): 1}
    assert {case: auto_threads(*case) for case in cases} == cases


def test_available_cpus_follow_the_affinity_mask_and_the_cgroup_quota(monkeypatch):
    import spikeformers.train.distributed as distributed

    mask = len(os.sched_getaffinity(0))
    assert 1 <= distributed.available_cpus() <= mask
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(distributed, "_cgroup_cpu_quota", lambda: 1.5)  # docker --cpus=1.5
    assert distributed.available_cpus() == 2
    monkeypatch.setattr(distributed, "_cgroup_cpu_quota", lambda: None)
    assert distributed.available_cpus() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: two processes share the 4 CPUs
    assert distributed.auto_threads() == 1


def test_threads_field_is_applied_and_recorded_in_the_checkpoint(make_cfg, monkeypatch):
    from spikeformers.train.distributed import set_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        cfg = make_cfg(*SMALL, "trainer.epochs=1", "trainer.max_steps_per_epoch=1", "trainer.threads=3")
        torch.set_num_threads(1)
        train(cfg)
        assert torch.get_num_threads() == 1  # the run's count does not outlive the run
        state = torch.load(Path(cfg.output_dir) / "checkpoints" / "last.pt", weights_only=True)
        assert state["threads"] == 3 and state["config"]["trainer"]["threads"] == 3  # it trained with 3
        from spikeformers.train.distributed import auto_threads

        assert set_threads(None) == auto_threads() <= len(os.sched_getaffinity(0))
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert set_threads(None) == 2  # the user's OMP_NUM_THREADS wins over auto
    finally:
        torch.set_num_threads(before)


# --- data mistakes caught when the data set is built ------------------------------------------------


def test_cifar_root_one_level_too_deep_or_an_unextracted_archive_gets_a_hint(make_cfg, tmp_path):
    _write_cifar(tmp_path / "data", "cifar10")
    deep = tmp_path / "data" / "cifar-10-batches-py"
    with pytest.raises(DatasetError, match="cifar10 not found") as err:
        build_datasets(make_cfg("data=cifar10", f"data.root={deep}").data)
    assert err.value.hint == f"data.root is one level too deep: give the folder that holds cifar-10-batches-py/, data.root={tmp_path / 'data'}"
    archive_only = tmp_path / "download"
    archive_only.mkdir()
    (archive_only / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DatasetError) as err:
        build_datasets(make_cfg("data=cifar10", f"data.root={archive_only}").data)
    assert err.value.hint == f"extract the archive first: tar -xzf {archive_only / 'cifar-10-python.tar.gz'} -C {archive_only}"


def test_labels_outside_the_classes_are_caught_when_the_data_set_is_built(make_cfg, tmp_path):
    """CIFAR-100's pickles (labels 0..99) put where data=cifar10 expects its own."""
    _write_cifar(tmp_path / "c100", "cifar100", n=12)
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    entry = pickle.load(open(tmp_path / "c100" / "cifar-100-python" / "train", "rb"))
    for file in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pickle.dump({b"data": entry[b"data"], b"labels": entry[b"fine_labels"]}, open(folder / file, "wb"))
    # labels 0..11 in each of the 5 training batches: 10 and 11 are outside, twice per batch
    with pytest.raises(DatasetError, match=r"labels outside 0\.\.9 \(e\.g\. 10, 10 samples\)") as err:
        build_datasets(make_cfg("data=cifar10", f"data.root={tmp_path / 'data'}").data)
    assert "cifar100 has 100 classes" in err.value.hint
