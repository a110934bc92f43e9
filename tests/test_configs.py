"""Hydra configs: every experiment preset, model config and debug config composes and resolves, the
model names are registered in timm, AT-SNN options exist only for AT-SNN models, the digits
default is the job it has always been, and the documented override spellings compose as written."""

import csv
import importlib.resources
import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

import spikeformers  # noqa: F401  (registers the models with timm)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = importlib.resources.files("spikeformers.configs")


def group(name: str) -> list[str]:
    return sorted(p.name[:-5] for p in CONFIGS.joinpath(name).iterdir() if p.name.endswith(".yaml"))


EXPERIMENTS, MODEL_CONFIGS, DEBUG_CONFIGS = group("experiment"), group("model"), group("debug")
# Every model this package registers, found by where its timm entry point lives (not by family names).
OUR_MODELS = sorted(n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("spikeformers."))
# Required values a preset leaves to the command line, and a stand-in for each.
REQUIRED = {"finetune_from": "runs/base/checkpoints/last.pt"}


def compose_cfg(*overrides: str, config_name: str = "train", hydra: bool = False):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="spikeformers.configs", version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=hydra)
    finally:
        GlobalHydra.instance().clear()
    if "output_dir" in cfg:  # ${hydra:runtime.output_dir} exists only inside a Hydra run
        with open_dict(cfg):
            cfg.output_dir = "."
    return cfg


def resolved(cfg) -> dict:
    """The whole config with every interpolation resolved; raises on a missing mandatory value."""
    if "hydra" in cfg:
        with open_dict(cfg):
            del cfg["hydra"]
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def check_atsnn_only_for_atsnn_models(cfg: dict) -> None:
    is_atsnn = cfg["model"]["name"].startswith("atsnn_")
    assert ("atsnn" in cfg) == is_atsnn
    assert ("atsnn" in (cfg["model"]["args"] or {})) == is_atsnn
    if is_atsnn:  # the model receives exactly the group's options
        assert cfg["model"]["args"]["atsnn"] == cfg["atsnn"]


# --- experiment presets ------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_preset_composes_and_resolves(name):
    cfg = compose_cfg(f"experiment={name}")
    missing = {key for key in cfg if OmegaConf.is_missing(cfg, key)}  # top-level ??? values, unresolved
    assert missing <= set(REQUIRED), f"experiment={name} leaves {missing - set(REQUIRED)} unset"
    cfg = resolved(compose_cfg(f"experiment={name}", *(f"{k}={REQUIRED[k]}" for k in missing)))
    assert timm.is_model(cfg["model"]["name"])
    check_atsnn_only_for_atsnn_models(cfg)


def test_required_preset_values_are_reported_missing():
    # the check above would pass vacuously if compose filled or dropped the required value
    with pytest.raises((MissingMandatoryValue, InterpolationToMissingValueError), match="finetune_from"):
        resolved(compose_cfg("experiment=atsnn_digits_finetune"))


# --- model configs -----------------------------------------------------------------------------

# The family configs name no model; every registered model composes with the config of its family.
ABSTRACT_MODEL_CONFIGS = {"spiking", "ann", "atsnn", "qcfs"}


def family(model_name: str) -> str:
    return "atsnn" if model_name.startswith("atsnn_") else "qcfs" if model_name.startswith("qcfs_") else "spiking"


def test_model_config_files_are_the_bases_and_the_exceptions():
    # No name-only model files: a file must set something besides the name (the default excepted:
    # train.yaml needs a file to compose).
    default = compose_cfg(hydra=True).hydra.runtime.choices.model
    for name in MODEL_CONFIGS:
        body = OmegaConf.load(CONFIGS.joinpath("model", f"{name}.yaml"))
        own = set(body) - {"defaults", "name"}
        assert own or name == default, f"configs/model/{name}.yaml only names a model: use model.name={body.name}"
    assert ABSTRACT_MODEL_CONFIGS <= set(MODEL_CONFIGS)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_model_config_composes(name):
    if name in ABSTRACT_MODEL_CONFIGS:
        with pytest.raises(MissingMandatoryValue, match="model.name"):
            resolved(compose_cfg(f"model={name}"))
        return
    cfg = resolved(compose_cfg(f"model={name}"))
    assert timm.is_model(cfg["model"]["name"])
    check_atsnn_only_for_atsnn_models(cfg)


@pytest.mark.parametrize("config", sorted({family(n) for n in OUR_MODELS}))
def test_every_registered_model_composes_with_its_family_config(config):
    names = [n for n in OUR_MODELS if family(n) == config]
    composed = compose_cfg(f"model={config}", f"model.name={names[0]}")
    for model_name in names:  # the models of a family differ only in model.name
        composed.model.name = model_name
        cfg = resolved(composed.copy())
        check_atsnn_only_for_atsnn_models(cfg)
        ann = model_name.startswith("qcfs_")
        assert (cfg["model"]["T"] is None) == ann and (cfg["model"]["backend"] is None) == ann


def test_the_model_families_are_found():
    # guards the parametrization above against an empty or partial model list
    assert {"sdt_tiny", "spikformer_tiny", "atsnn_spikformer_tiny", "atsnn_sdt_tiny", "qcfs_vgg_tiny"} <= set(OUR_MODELS)
    assert "vit_tiny_patch16_224" not in OUR_MODELS


def test_atsnn_options_are_rejected_for_other_models():
    for overrides in (["atsnn=off"], ["atsnn.merge_r=4"], ["model.name=spikformer_tiny", "atsnn=off"],
                      ["experiment=spikformer_cifar10", "atsnn.halting=false"]):
        with pytest.raises(ConfigCompositionException, match="Could not override 'atsnn"):
            compose_cfg(*overrides)


def test_atsnn_override_spellings_reach_the_model():
    off = resolved(compose_cfg("experiment=atsnn_digits", "atsnn=off"))
    assert off["model"]["args"]["atsnn"]["halting"] is False and off["model"]["args"]["atsnn"]["merge_r"] == 0
    merged = resolved(compose_cfg("model=atsnn", "model.name=atsnn_spikformer_tiny", "atsnn.merge_r=4"))
    assert merged["model"]["args"]["atsnn"]["merge_r"] == 4 and merged["model"]["args"]["atsnn"]["halting"] is True
    # a preset's own atsnn values reach the model too
    sdt = resolved(compose_cfg("experiment=atsnn_sdt_digits"))
    assert sdt["model"]["args"]["atsnn"]["readout"] == "time_mean"


# --- the digits default ------------------------------------------------------------------------

# The composed default before the model configs were reorganised (minus the unused atsnn section it
# used to carry): the same model, data, optimizer, schedule and trainer, hence the same result.
DIGITS_DEFAULT = """
seed: 0
resume: null
model: {name: sdt_tiny, T: 4, backend: auto, pretrained: false, checkpoint: null, args: null}
data:
  name: digits
  root: data
  img_size: 32
  batch_size: 64
  eval_batch_size: 256
  num_workers: 0
  mean: [0.5]
  std: [0.5]
  smoothing: 0.1
  aug: {max_shift: 2, scale: [0.08, 1.0], ratio: [0.75, 1.3333333333333333], hflip: 0.5, color_jitter: 0.0,
        auto_augment: null, interpolation: bicubic, re_prob: 0.0, crop_pct: 1.0}
  mixup: {mixup: 0.0, cutmix: 0.0, prob: 1.0, switch_prob: 0.5, mode: batch, off_epoch: null}
  frames: null
  frame_size: null
optim: {name: adamw, lr: 0.005, weight_decay: 0.01, filter_bias_and_bn: true, layer_decay: null, kwargs: {}}
sched: {name: cosine, warmup_epochs: 1, warmup_lr: 1.0e-05, min_lr: 1.0e-05, cooldown_epochs: 0, step_on_epochs: false}
trainer:
  epochs: 15
  device: auto
  memory: plain
  amp: false
  amp_dtype: bfloat16
  compile: false
  channels_last: false
  grad_clip: null
  sync_bn: false
  deterministic: true
  ema: {enable: false, decay: 0.9998}
  distill: {teacher: null, teacher_pretrained: true, teacher_checkpoint: null, alpha: 0.5}
  tet: {enable: false, lam: 0.001, phi: 1.0}
  freeze_backbone: false
  save_every_steps: null
  max_steps_per_epoch: null
  log_block_rates: true
  progress: true
logger: {name: csv}
"""


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_digits_default_is_unchanged():
    cfg = resolved(compose_cfg())
    expected = flatten(OmegaConf.to_container(OmegaConf.create(DIGITS_DEFAULT)))
    got = flatten(cfg)
    assert {k: got.get(k, "<absent>") for k in expected} == expected
    assert cfg["model"] == OmegaConf.to_container(OmegaConf.create(DIGITS_DEFAULT))["model"]  # no extra model keys
    assert "atsnn" not in cfg and "debug" not in cfg and "finetune_from" not in cfg
    eval_cfg = resolved(compose_cfg(config_name="eval"))
    assert eval_cfg["model"] == cfg["model"] and "atsnn" not in eval_cfg


def test_default_group_choices():
    choices = compose_cfg(hydra=True).hydra.runtime.choices
    assert choices.model == "sdt_tiny" and choices.debug is None and choices.experiment is None
    # configs/local/ is git-ignored: a checkout without it composes (optional), one with it uses it
    assert choices.get("local") in (None, "default")


# --- debug configs -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", DEBUG_CONFIGS)
@pytest.mark.parametrize("experiment", [None, "sdt_cifar10", "atsnn_digits_finetune"])
def test_debug_config_composes_on_top_of_any_job(name, experiment):
    job = [f"experiment={experiment}", f"finetune_from={REQUIRED['finetune_from']}"] if experiment == "atsnn_digits_finetune" \
        else [f"experiment={experiment}"] if experiment else []
    plain = compose_cfg(*job)
    cfg = compose_cfg(*job, f"debug={name}", hydra=True)
    assert cfg.hydra.run.dir.startswith("outputs/debug/")
    tcfg = cfg.trainer
    assert tcfg.epochs <= 3 and tcfg.deterministic and not tcfg.compile and tcfg.save_every_steps is None
    assert cfg.data.num_workers == 0 and cfg.logger.name == "csv"
    # debugging changes how the job runs, never what it trains
    assert resolved(cfg)["model"] == resolved(plain)["model"]
    assert cfg.optim == plain.optim and cfg.data.name == plain.data.name


def test_debug_step_limits():
    assert compose_cfg("debug=default").trainer.max_steps_per_epoch is None
    assert compose_cfg("debug=fdr").trainer.max_steps_per_epoch == 1
    limit = compose_cfg("debug=limit").trainer
    assert (limit.epochs, limit.max_steps_per_epoch) == (3, 3)


def test_debug_fdr_command_runs_one_step_and_saves_once(tmp_path):
    # the command of docs/training.md, as written: one step, one evaluation, one run folder
    exe = shutil.which("spikeformers-train", path=str(Path(sys.executable).parent))
    assert exe, "spikeformers-train is not installed next to this Python"
    env = dict(os.environ, SPIKEFORMERS_LIF_COMPILE="0", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    out = subprocess.run([exe, "debug=fdr"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = [p for p in (tmp_path / "outputs" / "debug").glob("*/*") if p.is_dir()]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert len(rows) == 1 and rows[0]["epoch"] == "0"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    saved = OmegaConf.load(run / "config.yaml")
    assert (saved.trainer.epochs, saved.trainer.max_steps_per_epoch) == (1, 1)
    assert OmegaConf.to_container(saved.model) == resolved(compose_cfg())["model"]
    assert not (tmp_path / "wandb").exists() and not list(run.glob("wandb"))


# --- local settings ----------------------------------------------------------------------------


def documented_local_config() -> str:
    text = (ROOT / "docs" / "training.md").read_text()
    (block,) = re.findall(r"```yaml\n(# @package _global_\n.*?)```", text, re.S)
    return block


def test_documented_local_config_is_composed_after_presets_and_before_the_command_line(tmp_path):
    # configs/local/ of the checkout is the user's; the same file is put on the search path instead
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "default.yaml").write_text(documented_local_config())
    search = f"hydra.searchpath=[file://{tmp_path}]"
    local = OmegaConf.create(documented_local_config())
    cfg = compose_cfg(search, "experiment=sdt_cifar10", hydra=True)
    assert cfg.hydra.runtime.choices.local == "default"
    assert cfg.data.root == local.data.root and cfg.data.num_workers == local.data.num_workers
    assert compose_cfg(search, "experiment=sdt_cifar10", "data.num_workers=1").data.num_workers == 1
    assert compose_cfg(search, "debug=fdr").data.num_workers == 0  # debug comes after local
    assert compose_cfg("experiment=sdt_cifar10").data.num_workers != local.data.num_workers  # the file did it


# --- documented commands -----------------------------------------------------------------------


def documented_train_commands() -> list[tuple[str, list[str]]]:
    """(where, overrides) of every distinct `spikeformers-train ...` line in README.md and docs/*.md
    (code blocks and inline code), placeholders such as <name> left out."""
    commands = {}
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text().replace("\\\n", " ")
        # `spikeformers-train: error: ...` is a message the tool prints, not a command
        # (`spikeformers-train --presets` lists presets instead of training: tests/test_progress.py runs it)
        lines = re.findall(r"^\s*(spikeformers-train\b(?!:| --presets)[^\n]*)", text, re.M)
        lines += re.findall(r"`(spikeformers-train\b(?!:| --presets)[^`\n]*)`", text)
        for line in lines:
            line = line.split("#")[0].split("`")[0].split("||")[0]  # `cmd || echo ...`: the command
            if "<" in line or "&&" in line:
                continue
            args = [a for a in shlex.split(line)[1:] if a not in ("-m", "--multirun")]
            commands.setdefault(tuple(args), f"{path.name}: {' '.join(line.split())}")
    return [(where, list(args)) for args, where in commands.items()]


DOCUMENTED = documented_train_commands()


@pytest.mark.parametrize("args", [a for _, a in DOCUMENTED], ids=[w for w, _ in DOCUMENTED])
def test_documented_train_command_composes(args):
    parsed = OverridesParser.create().parse_overrides(args)
    # a sweep (-m a=1,2) composes once per combination
    choices = [list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()] for o in parsed]
    for combo in itertools.product(*choices):
        overrides = [f"{o.get_key_element()}={v}" for o, v in zip(parsed, combo)]
        cfg = resolved(compose_cfg(*overrides))
        assert timm.is_model(cfg["model"]["name"])
        check_atsnn_only_for_atsnn_models(cfg)


def test_documented_commands_are_found():
    spelled = {" ".join(a) for _, a in DOCUMENTED}
    assert "debug=fdr" in spelled and "model.name=spikformer_tiny trainer.epochs=1" in spelled
