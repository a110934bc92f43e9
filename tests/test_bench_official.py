"""benchmarks/bench_train_step.py --official: the official model's step timed beside ours.

The official code is not in the repository, so a stand-in ``model.py`` plays it: it defines the
official class name with the official constructor arguments and returns (logits, hook) as the
official SDT does. It builds its network from those arguments with a different seed, so the logits
agree only if the benchmark passed our configuration and loaded our weights into it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_step.py"

# spikformer_tiny: 2 blocks, D = 64, 4 heads, MLP ratio 4, one input channel, 32x32, 10 classes.
FAKE_OFFICIAL = '''
import timm
import torch
from timm.models import register_model
from torch import nn

import spikeformers  # noqa: F401
import sibling  # the official files import their siblings: the folder must be on sys.path
from spikingjelly.clock_driven.neuron import MultiStepLIFNode  # the official files' import (0.0.0.0.12 name)

CALLS = []


class Spikformer(nn.Module):
    def __init__(self, img_size_h=128, img_size_w=128, patch_size=16, in_channels=2, num_classes=11,
                 embed_dims=[64, 128, 256], num_heads=[1, 2, 4], mlp_ratios=[4, 4, 4], qkv_bias=False,
                 qk_scale=None, drop_rate=0., attn_drop_rate=0., drop_path_rate=0., norm_layer=nn.LayerNorm,
                 depths=[6, 8, 6], sr_ratios=[8, 4, 2], T=4):
        super().__init__()
        assert (img_size_h, img_size_w, patch_size, in_channels, num_classes) == (32, 32, 4, 1, 10)
        assert (embed_dims, num_heads, mlp_ratios, depths, sr_ratios, T) == (64, 4, 4, 2, 1, sibling.T)
        torch.manual_seed(1234)  # other weights than ours until they are loaded
        inner = timm.create_model("spikformer_tiny", embed_dim=embed_dims, num_heads=num_heads, depth=depths,
                                  mlp_ratio=mlp_ratios, in_chans=in_channels, num_classes=num_classes, T=T,
                                  backend="spikingjelly")
        for name, child in inner.named_children():  # the same keys as ours, no prefix
            self.add_module(name, child)
        self.__dict__["inner"] = inner
        self.resets = 0
        assert MultiStepLIFNode(tau=2.0, detach_reset=True, backend="cupy").step_mode == "m"

    def reset(self):  # what SpikingJelly's neurons define; the benchmark calls it after each step
        self.resets += 1

    def forward(self, x):
        return self.inner(x), None


@register_model  # as the official files do: timm looks the defining module up in sys.modules
def spikformer_official_stand_in(pretrained=False, **kwargs):
    return Spikformer(**kwargs)
'''


def _bench(*args, timeout=300):
    env = dict(os.environ, SPIKEFORMERS_LIF_COMPILE="0")  # eager LIF loops: no compile in a test
    return subprocess.run([sys.executable, "-P", str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_official_step_timed_beside_ours(tmp_path):
    official = tmp_path / "official"
    official.mkdir()
    (official / "model.py").write_text(FAKE_OFFICIAL)
    (official / "sibling.py").write_text("T = 2\n")
    out = tmp_path / "official.json"
    proc = _bench("--models", "spikformer_tiny", "--batch", "2", "--T", "2", "--iters", "2", "--warmup", "2",
                  "--threads", "1", "--official", f"spikformer={official}", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours, theirs = json.loads(out.read_text())
    assert (ours["option"], theirs["option"]) == ("plain", "official")
    # Every official key got our weights: same function, so the logits agree to rounding (the
    # SpikingJelly neuron against our torch LIF) and the gradients too.
    assert ours["official_keys_loaded"] == theirs["official_keys_loaded"]
    loaded, total = map(int, ours["official_keys_loaded"].split("/"))
    assert loaded == total > 0
    assert theirs["max_logit_diff"] < 1e-4 and theirs["max_grad_rel_diff"] < 1e-3
    assert len(theirs["ms_all"]) == 2 and theirs["ms_per_step"] > 0
    # ours vs official: official's step time / ours, round by round; the official row is 1 against itself.
    assert theirs["vs_official"] == theirs["cpu_vs_official"] == 1.0
    assert ours["vs_official"] > 0 and ours["cpu_vs_official"] > 0
    assert abs(theirs["speedup"] * ours["vs_official"] - 1) < 0.5  # the same ratio seen from both sides
    assert f"ours vs official spikformer_tiny (plain): {ours['vs_official']:.2f}x wall" in proc.stdout
    assert "| spikformer_tiny | official |" in proc.stdout


def test_official_missing_folder_is_one_line(tmp_path):
    proc = _bench("--models", "spikformer_tiny", "--official", f"spikformer={tmp_path / 'nowhere'}", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"bench_train_step.py: error: --official spikformer: no such folder '{tmp_path / 'nowhere'}'"]


def test_official_missing_class_is_one_line(tmp_path):
    (tmp_path / "model.py").write_text("class SpikeDrivenTransformer:\n    pass\n")
    proc = _bench("--models", "spikformer_tiny", "--batch", "2", "--T", "1", "--iters", "1", "--warmup", "2",
                  "--official", f"spikformer={tmp_path}", timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"bench_train_step.py: error: --official spikformer: {tmp_path / 'model.py'} defines no class Spikformer")


def test_official_for_another_family_is_one_line(tmp_path):
    (tmp_path / "model.py").write_text("")
    proc = _bench("--models", "sdt_tiny", "--batch", "2", "--T", "1", "--iters", "1", "--warmup", "2",
                  "--official", f"spikformer={tmp_path}", timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "bench_train_step.py: error: --official has no sdt folder for sdt_tiny (a SpikeDrivenTransformer); "
        "families: spikformer, sdt")


def test_official_neuron_names_on_spikingjelly_2():
    """The official files' ``MultiStepLIFNode`` on SpikingJelly 2.0, against the LIF equations
    by hand: X = 1.2 at every step, H = V + (X - V) / 2, S = (H >= v_th), V = H (1 - S).
    v_th 1.0: H = 0.6, 0.9, 1.05 -> spikes 0, 0, 1; v_th 0.5 (the attention neurons): H = 0.6 and a
    reset every step -> 1, 1, 1."""
    code = f"""
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("bench", {str(SCRIPT)!r})
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
bench.install_clock_driven_names()
from spikingjelly.clock_driven import functional
from spikingjelly.clock_driven.neuron import MultiStepLIFNode, MultiStepParametricLIFNode
x = torch.full((3, 1), 1.2)
for v_th in (1.0, 0.5):
    lif = MultiStepLIFNode(tau=2.0, v_threshold=v_th, detach_reset=True, backend="cupy")
    print(lif(x[:2]).flatten().tolist())  # leaves V = 0.9 (v_th 1.0): the reset must clear it
    functional.reset_net(lif)
    print(lif(x).flatten().tolist())
MultiStepParametricLIFNode(init_tau=2.0, detach_reset=True, backend="cupy")
"""
    proc = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:4] == ["[0.0, 0.0]", "[0.0, 0.0, 1.0]", "[1.0, 1.0]", "[1.0, 1.0, 1.0]"]
