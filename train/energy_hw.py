"""Hardware profiles: energy per synaptic operation and per neuron update of published
neuromorphic chips, and whether a model fits on one.

E_chip = Effective_ACs · E_sop + Σ_neuron-layers T·n · E_nu, every neuron updated every step (the
convention of KerasSpiking's ``model_energy``). What such a chip cannot run is listed as
``unmapped`` and left out of the energy: real-valued MACs on chips without graded inputs (the
first layer), spike × spike attention products (their "weights" change with the input, static
synapses cannot hold them), and BatchNorms that do not fold into a layer (a per-element multiply-add
on spikes or after a nonlinearity: ``bn_unfolded``; listed, not blocking, since the host can run it).

Each value carries its source and a status: ``verified`` (read in the primary source),
``secondary`` (read in a source that cites it), ``unverified`` (widely quoted, not found in a
primary source; printed with a mark). A value not found is ``None``, never guessed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from spikeformers.train.neurobench import AttentionCounts, ConnectionCounts, Counts, NeuronCounts, NormCounts

__all__ = ["CHIPS", "load_chips", "hardware_report"]

_KS = "KerasSpiking model_energy.py device table"
CHIPS: dict[str, dict] = {
    "loihi": {
        "node": "Intel 14 nm, 60 mm²", "e_sop_pJ": 27.1, "e_neuron_pJ": 81.0, "e_hop_pJ": None,
        "neurons_per_chip": 131072, "synapses_per_chip": 130_000_000, "fan_in_limit": None,
        "weight_sharing": False, "graded_input": False,
        "source": "Davies et al., IEEE Micro 38(1):82-99, 2018 (via " + _KS + ": 23.6 + 3.5 pJ per SOP, 81 pJ per update); "
                  "capacity: WikiChip",
        "status": {"e_sop_pJ": "secondary (the 3.5 pJ routing reading is unverified)", "e_neuron_pJ": "secondary",
                   "neurons_per_chip": "secondary", "synapses_per_chip": "secondary",
                   "weight_sharing": "unverified (assumed none: expanded synapses)"},
    },
    "loihi2": {
        "node": "Intel 4, 31 mm²", "e_sop_pJ": None, "e_neuron_pJ": None, "e_hop_pJ": None,
        "neurons_per_chip": 1_000_000, "synapses_per_chip": 120_000_000, "fan_in_limit": None,
        "weight_sharing": True, "graded_input": True,
        "source": "Intel Loihi 2 brief; open-neuromorphic.org (per-op energies not published)",
        "status": {"neurons_per_chip": "secondary", "synapses_per_chip": "secondary",
                   "weight_sharing": "unverified (assumed)", "graded_input": "secondary (graded spikes)"},
    },
    "truenorth": {
        "node": "Samsung 28 nm, 4.3 cm²", "e_sop_pJ": 26.0, "e_neuron_pJ": None, "e_hop_pJ": None,
        "neurons_per_chip": 1_048_576, "synapses_per_chip": 268_435_456, "fan_in_limit": 256,
        "weight_sharing": False, "graded_input": False,
        "source": "Merolla et al., Science 345:668, 2014 (capacity, 4,096 cores × 256); 26 pJ per synaptic event is widely quoted",
        "status": {"e_sop_pJ": "unverified", "neurons_per_chip": "verified", "synapses_per_chip": "verified",
                   "fan_in_limit": "verified"},
    },
    "spinnaker": {
        "node": "130 nm", "e_sop_pJ": 13300.0, "e_neuron_pJ": 26000.0, "e_hop_pJ": None,
        "neurons_per_chip": None, "synapses_per_chip": None, "fan_in_limit": None,
        "weight_sharing": True, "graded_input": True,
        "source": _KS + " citing Höppner et al. 2019", "status": {"e_sop_pJ": "secondary", "e_neuron_pJ": "secondary",
                                                                 "neurons_per_chip": "unverified (~16 K, not used)"},
    },
    "spinnaker2": {
        "node": "28 nm prototype / 22 nm FDSOI", "e_sop_pJ": 450.0, "e_neuron_pJ": 2190.0, "e_hop_pJ": None,
        "neurons_per_chip": None, "synapses_per_chip": None, "fan_in_limit": None,
        "weight_sharing": True, "graded_input": True,
        "source": _KS + " citing Höppner et al. 2019 (arXiv 1903.08941)",
        "status": {"e_sop_pJ": "secondary", "e_neuron_pJ": "secondary"},
    },
    "tianjic": {
        "node": "28 nm HLP", "e_sop_pJ": None, "e_neuron_pJ": None, "e_hop_pJ": None,
        "neurons_per_chip": 39936, "synapses_per_chip": 10_223_616, "fan_in_limit": 256,
        "weight_sharing": None, "graded_input": True,
        "source": "Pei et al., Nature 572:106, 2019; Deng et al., IEEE JSSC 55(8), 2020 (via IEEE CAS Magazine 2022): "
                  "156 FCores × 256 neurons, 256 fan-in",
        "status": {"neurons_per_chip": "secondary (derived 156 × 256)", "synapses_per_chip": "secondary (derived 156 × 256 × 256)",
                   "fan_in_limit": "secondary", "weight_sharing": "unverified"},
    },
    "speck": {
        "node": None, "e_sop_pJ": None, "e_neuron_pJ": None, "e_hop_pJ": None,
        "neurons_per_chip": 327680, "synapses_per_chip": None, "fan_in_limit": None,
        "weight_sharing": True, "graded_input": False,
        "source": "Richter et al., arXiv 2304.06793 (327K neurons); Yao et al., Nat. Commun. 2024 (0.42 mW resting)",
        "status": {"neurons_per_chip": "verified", "weight_sharing": "secondary", "synapses_per_chip": "unverified"},
    },
    "sne": {
        "node": None, "e_sop_pJ": 0.221, "e_neuron_pJ": None, "e_hop_pJ": None,
        "neurons_per_chip": None, "synapses_per_chip": None, "fan_in_limit": None,
        "weight_sharing": True, "graded_input": False,
        "source": "Di Mauro et al., SNE, arXiv 2204.10687 (a reference digital accelerator, 4-bit)",
        "status": {"e_sop_pJ": "verified (abstract)"},
    },
}


def load_chips(path: str | Path | None = None) -> dict[str, dict]:
    """The built-in chips, plus (or replaced by) the entries of a JSON file {name: {field: value}}."""
    chips = {k: dict(v) for k, v in CHIPS.items()}
    if path:
        from spikeformers.models.errors import UserError

        try:
            extra = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read the hardware file {path}: {err}") from None
        if not isinstance(extra, dict) or not all(isinstance(v, dict) for v in extra.values()):
            raise UserError(f"{path} must hold {{chip: {{field: value}}}}", hint="fields as in docs/energy.md")
        for name, fields in extra.items():
            chips[name] = {**chips.get(name, {}), **fields}
    return chips


def hardware_report(counts: Counts, nb: dict, chips: dict[str, dict] | None = None) -> dict:
    """Energy (or None) and the fits-on-chip figures of every chip for the recorded model."""
    chips = chips or CHIPS
    per = counts.per_sample
    conns = [r for r in counts.rows if isinstance(r, ConnectionCounts)]
    # spike-count neurons (E-SpikeFormer) run on a chip as D virtual steps of a spiking neuron
    neurons = [r for r in counts.rows if isinstance(r, NeuronCounts) and (r.spiking or r.model == "count")]
    has_attention = any(isinstance(r, AttentionCounts) for r in counts.rows)
    has_unfolded_bn = any(isinstance(r, NormCounts) and not r.folded for r in counts.rows)
    # a layer fed S/n counts is a MAC to NeuroBench (S/n is not in {−1, 0, 1}); on a chip its
    # input arrives as S spikes, each an accumulate: Σ S-weighted effective ops
    fed_counts = [r for r in conns if r.count_input]
    acs = nb["SynapticOperations"]["Effective_ACs"] + sum(per(r.s_eff_sum) for r in fed_counts)
    macs = max(nb["SynapticOperations"]["Effective_MACs"] - sum(per(r.effective_macs) for r in fed_counts), 0.0)
    neuron_steps = sum(r.n * r.steps * r.levels for r in neurons)
    neurons_required = sum(r.n for r in neurons) + (conns[-1].n_out if conns else 0)
    unique = sum(r.params for r in conns)
    expanded = sum(per(r.dense) / r.steps for r in conns)
    max_fan_in = max((r.fan_in for r in conns), default=0)
    out = {}
    for name, chip in chips.items():
        unmapped = []
        if macs and not chip.get("graded_input"):
            unmapped.append("first_layer_macs")
        if has_attention:
            unmapped.append("attention_products")
        if has_unfolded_bn:
            unmapped.append("bn_unfolded")
        e_sop, e_nu = chip.get("e_sop_pJ"), chip.get("e_neuron_pJ")
        energy = None if e_sop is None else acs * e_sop + (neuron_steps * e_nu if e_nu is not None else 0.0)
        sharing = bool(chip.get("weight_sharing"))
        synapses = unique if sharing else expanded
        n_chip, s_chip, fan_limit = chip.get("neurons_per_chip"), chip.get("synapses_per_chip"), chip.get("fan_in_limit")
        needed = [math.ceil(neurons_required / n_chip) if n_chip else None, math.ceil(synapses / s_chip) if s_chip else None]
        known = [n for n in needed if n is not None]
        chips_needed = max(known) if known else None
        blocking = "attention_products" in unmapped  # first-layer MACs can run on the host; products cannot
        fits = (None if chips_needed is None else
                chips_needed == 1 and (fan_limit is None or max_fan_in <= fan_limit) and not blocking)
        out[name] = {"energy_pJ": energy, "sop_pJ": e_sop, "neuron_pJ": e_nu, "unmapped": unmapped,
                     "neuron_energy_included": e_nu is not None,
                     "fits": {"neurons_required": neurons_required, "neurons_per_chip": n_chip,
                              "synapses_required": synapses, "synapse_mode": "unique" if sharing else "expanded",
                              "synapses_per_chip": s_chip, "max_fan_in": max_fan_in, "fan_in_limit": fan_limit,
                              "chips_needed": chips_needed, "fits_one_chip": fits},
                     "node": chip.get("node"), "source": chip.get("source"), "status": chip.get("status", {})}
    return out
