"""An analytical cost model of a heterogeneous analog/digital chip: how each Conv/Linear weight matrix tiles onto
crossbars, and the latency and energy per sample of a mapping (docs/design.md, "Hardware cost").

Assumptions, all stated in :class:`Chip` and docs/design.md: batch 1; layers run one after another; an analog
layer's tiles run in parallel, and each of its activations (one per output position: a convolution re-uses
its tiles once per output pixel, a linear layer once per token) takes one MVM time; an activation costs its
used columns' share of a full-core MVM's energy; digital layers run at a fixed MAC throughput, pay the
arithmetic energy per MAC at their precision and read every weight once per sample. Activations moving between
layers, the non-mappable operations (pooling, normalization, attention's products) and biases (aihwkit keeps
them digital) are not costed: the model compares the two ways of running the weight layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import pandas as pd
from torch import nn

from hilal.analog import ANALOG_TYPES, DIGITAL_TYPES, _fan_in, get_preset, output_elements
from hilal.registry import HilalError, check_choice

# Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014, 45 nm: multiply + add (pJ)
HOROWITZ_MAC_PJ = {"int8": 0.2 + 0.03, "int32": 3.1 + 0.1, "fp16": 1.1 + 0.4, "fp32": 3.7 + 0.9}
"""Energy of one multiply-accumulate per digital precision: the multiply plus the add of Horowitz's table."""
PRECISION_BYTES = {"int8": 1, "int32": 4, "fp16": 2, "fp32": 4}
"""Bytes one digital weight takes at each precision."""
OBJECTIVES = ("macs", "energy", "latency")
"""What HILAL's knapsack maximizes the saving of (``MappingConfig.objective``)."""

# HERMES: Le Gallo et al., "A 64-core mixed-signal in-memory compute chip based on phase-change memory for deep
# neural network inference", Nature Electronics 2023: 64 cores of 256 x 256, 16.1 TOPS at 2.48 TOPS/W for 8-bit
# MVMs (four-phase read mode). One MVM on one core is 2 * 256 * 256 operations.
_HERMES_CORES, _HERMES_SIZE, _HERMES_TOPS, _HERMES_TOPS_PER_W = 64, 256, 16.1e12, 2.48e12
_MVM_OPS = 2 * _HERMES_SIZE * _HERMES_SIZE


@dataclass(frozen=True)
class Chip:
    """Parameters of the heterogeneous chip, each default with its source. Another chip is one
    ``Chip(...)`` (or ``MappingConfig(chip={...})``) away."""

    name: str = "hermes"
    """A label for the record."""
    tile_rows: int | None = None
    """Crossbar inputs per tile; None: the preset's ``mapping.max_input_size`` (256 in this kit's presets), the
    split aihwkit itself applies when it converts a layer."""
    tile_cols: int | None = None
    """Crossbar outputs per tile; None: the preset's ``mapping.max_output_size`` (255)."""
    tiles: int = _HERMES_CORES
    """Tiles on the chip (HERMES: 64 cores); the record says whether a mapping fits."""
    mvm_latency_ns: float = _HERMES_CORES * _MVM_OPS / _HERMES_TOPS * 1e9
    """One tile activation (an MVM, DAC to ADC): 64 cores x 2*256*256 operations / 16.1 TOPS = 521 ns (HERMES,
    8-bit)."""
    mvm_energy_nj: float = _MVM_OPS / _HERMES_TOPS_PER_W * 1e9
    """Energy of one full 256-column MVM including its periphery: 2*256*256 operations / 2.48 TOPS/W = 52.9 nJ
    (HERMES, 8-bit)."""
    mvm_columns: int = _HERMES_SIZE
    """Columns (one ADC each in HERMES) that ``mvm_energy_nj`` is spread over: an activation of c columns costs
    c / mvm_columns of it (assumption: idle columns' converters are not read)."""
    digital_precision: str = "fp32"
    """Precision of digital layers (int8, int32, fp16, fp32); fp32 by default because the kit simulates its
    digital layers in 32-bit floating point."""
    digital_mac_pj: float | None = None
    """Energy per digital MAC; None: multiply + add at ``digital_precision`` (Horowitz, ISSCC 2014, 45 nm:
    4.6 pJ at fp32, 0.23 pJ at int8)."""
    weight_byte_pj: float = 10.0 / 8
    """Energy of reading one byte of a digital weight (once per sample): a 64-bit word from an 8 KB SRAM,
    about 10 pJ (Horowitz, ISSCC 2014); DRAM would be 1.3-2.6 nJ per 64 bits."""
    digital_macs_per_s: float = 168 * 200e6
    """Digital throughput: Eyeriss's 168 processing elements at 200 MHz, one MAC each per cycle (Chen et al.,
    "Eyeriss: an energy-efficient reconfigurable accelerator for deep convolutional neural networks", IEEE JSSC
    2017)."""

    def __post_init__(self) -> None:
        check_choice("digital_precision", self.digital_precision, tuple(HOROWITZ_MAC_PJ))
        for f in ("tiles", "mvm_columns"):
            if int(getattr(self, f)) < 1:
                raise HilalError(f"Chip.{f} must be a positive integer; got {getattr(self, f)!r}")
        for f in ("tile_rows", "tile_cols"):
            v = getattr(self, f)
            if v is not None and int(v) < 1:
                raise HilalError(f"Chip.{f} must be a positive integer or None (the preset's); got {v!r}")
        for f in ("mvm_latency_ns", "mvm_energy_nj", "weight_byte_pj", "digital_macs_per_s"):
            if not float(getattr(self, f)) >= 0:
                raise HilalError(f"Chip.{f} must be >= 0; got {getattr(self, f)!r}")

    @property
    def mac_pj(self) -> float:
        """Energy per digital MAC (pJ)."""
        return HOROWITZ_MAC_PJ[self.digital_precision] if self.digital_mac_pj is None else float(self.digital_mac_pj)

    def for_preset(self, preset: Any) -> Chip:
        """This chip with its tile size taken from ``preset``'s mapping where not set (0 in aihwkit: no split)."""
        if self.tile_rows is not None and self.tile_cols is not None:
            return self
        m = get_preset(preset).mapping
        rows = self.tile_rows or (m.max_input_size or None)
        cols = self.tile_cols or (m.max_output_size or None)
        return replace(self, tile_rows=rows or 2**31, tile_cols=cols or 2**31)


def make_chip(overrides: Mapping[str, Any] | None = None, preset: Any = "pcm") -> Chip:
    """A :class:`Chip` from field overrides (an unknown field is a one-line error naming the valid ones), with its
    tile size from ``preset`` unless given."""
    overrides = dict(overrides or {})
    valid = [f.name for f in fields(Chip)]
    bad = sorted(set(overrides) - set(valid))
    if bad:
        raise HilalError(f"unknown chip setting(s) {bad}; valid: {', '.join(valid)}")
    return Chip(**overrides).for_preset(preset)


def layer_shapes(model: nn.Module, example_input: Any) -> pd.DataFrame:
    """One row per mappable layer, in model order: ``rows`` (the weight matrix's inputs: in_channels / groups x
    kernel size, or in_features), ``cols`` (out_channels / out_features) and ``activations`` per sample (output
    positions: a convolution's output pixels, a linear layer's tokens), measured with forward hooks on a real
    input; ``macs`` = rows x cols x activations, as :func:`hilal.analog.count_macs` counts them."""
    found = output_elements(model, example_input)
    mods = {n: m for n, m in model.named_modules() if isinstance(m, DIGITAL_TYPES + ANALOG_TYPES) and n}
    rows = []
    for n, m in mods.items():
        cols = m.out_channels if hasattr(m, "out_channels") else m.out_features
        r, a = _fan_in(m), found.get(n, 0) // int(cols)
        rows.append({"layer": n, "rows": r, "cols": int(cols), "activations": a, "macs": r * int(cols) * a})
    return pd.DataFrame(rows, columns=["layer", "rows", "cols", "activations", "macs"])


def layer_costs(shapes: pd.DataFrame, chip: Chip) -> pd.DataFrame:
    """Per layer (a :func:`layer_shapes` table): ``tiles`` (row blocks x column blocks, as aihwkit splits the
    matrix), ``utilization`` (weights / tile cells), ``weight_bytes`` when digital, and latency (µs) and energy
    (µJ) per sample on analog tiles and on the digital cores (module docstring)."""
    if chip.tile_rows is None or chip.tile_cols is None:
        raise HilalError("the chip's tile size is not set: build it with make_chip(..., preset) or set tile_rows "
                         "and tile_cols")
    df = shapes.copy()
    row_blocks = [math.ceil(r / chip.tile_rows) for r in df["rows"]]
    col_blocks = [math.ceil(c / chip.tile_cols) for c in df["cols"]]
    df["tiles"] = [a * b for a, b in zip(row_blocks, col_blocks, strict=True)]
    weights = df["rows"] * df["cols"]
    df["utilization"] = weights / (df["tiles"] * chip.tile_rows * chip.tile_cols)
    df["weight_bytes"] = weights * PRECISION_BYTES[chip.digital_precision]
    # an activation reads every used column of every row block once
    columns_read = pd.Series(row_blocks, index=df.index) * df["cols"]
    df["analog_latency_us"] = df["activations"] * chip.mvm_latency_ns * 1e-3
    df["analog_energy_uj"] = df["activations"] * columns_read * chip.mvm_energy_nj / chip.mvm_columns * 1e-3
    df["digital_latency_us"] = df["macs"] / chip.digital_macs_per_s * 1e6
    df["digital_energy_uj"] = (df["macs"] * chip.mac_pj + df["weight_bytes"] * chip.weight_byte_pj) * 1e-6
    return df


def savings(costs: pd.DataFrame, objective: str) -> dict[str, float]:
    """Per layer, what putting it on analog tiles saves under ``objective``: its MACs, or its digital less its
    analog energy (µJ) or latency (µs); additive over layers, since layers run one after another."""
    check_choice("objective", objective, OBJECTIVES)
    if objective == "macs":
        return {n: float(v) for n, v in zip(costs["layer"], costs["macs"], strict=True)}
    unit = {"energy": "uj", "latency": "us"}[objective]
    d, a = costs[f"digital_{objective}_{unit}"], costs[f"analog_{objective}_{unit}"]
    return {n: float(x - y) for n, x, y in zip(costs["layer"], d, a, strict=True)}


def mapping_cost(costs: pd.DataFrame, analog: Iterable[str], chip: Chip) -> dict[str, Any]:
    """The hardware record of a mapping with the ``analog`` layers on tiles and the rest digital: analog tiles and
    their utilization (weights / cells of the tiles used; None with no tile), whether they fit the chip, digital
    weight storage (MB = 1e6 bytes), latency (µs) and energy (µJ) per sample with their analog and digital parts,
    and the gains over running every layer digitally (all-digital / this mapping)."""
    analog = set(analog)
    unknown = sorted(analog - set(costs["layer"]))
    if unknown:
        raise HilalError(f"unknown layer(s) {unknown}; layers costed: {', '.join(costs['layer'])}")
    on = costs["layer"].isin(analog)
    a, d = costs[on], costs[~on]
    tiles = int(a["tiles"].sum())
    cells = tiles * chip.tile_rows * chip.tile_cols
    parts = {"latency_analog_us": float(a["analog_latency_us"].sum()),
             "latency_digital_us": float(d["digital_latency_us"].sum()),
             "energy_analog_uj": float(a["analog_energy_uj"].sum()),
             "energy_digital_uj": float(d["digital_energy_uj"].sum())}
    latency = parts["latency_analog_us"] + parts["latency_digital_us"]
    energy = parts["energy_analog_uj"] + parts["energy_digital_uj"]
    all_latency, all_energy = float(costs["digital_latency_us"].sum()), float(costs["digital_energy_uj"].sum())
    return {"chip": chip.name, "analog_tiles": tiles, "chip_tiles": chip.tiles, "fits_chip": tiles <= chip.tiles,
            "tile_utilization": float((a["rows"] * a["cols"]).sum() / cells) if cells else None,
            "digital_weight_mb": float(d["weight_bytes"].sum() / 1e6),
            "latency_us": latency, "energy_uj": energy, **parts,
            "latency_gain": all_latency / latency if latency > 0 else None,
            "energy_gain": all_energy / energy if energy > 0 else None}


def chip_costs(model: nn.Module, example_input: Any, chip: Chip) -> pd.DataFrame:
    """:func:`layer_costs` of ``model``'s layers measured on ``example_input``."""
    return layer_costs(layer_shapes(model, example_input), chip)
