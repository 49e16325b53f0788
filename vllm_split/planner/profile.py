"""Measured profiles: schema, parsing (from an already-loaded JSON dict) and calibration.

Profile JSON schema ``vllm-split-profile/1`` (the profiler writes it, the planner reads it)::

    {
      "schema": "vllm-split-profile/1",
      "example": false,                      # true marks made-up numbers
      "model": {"name": "...", "hf_config": {... HF config.json keys ...}},
      "devices": [
        {"role": "server" | "client",
         "name": "...",
         "peak_flops": 9.9e14,               # spec sheet dense FLOP/s at the model dtype
         "mem_bandwidth": 3.35e12,           # spec sheet bytes/s
         "measurements": [
           {"node": "block" | "attn" | "mlp" | "head",
            "phase": "prefill" | "decode",
            "tokens": 128,                   # prefill: prompt tokens in the pass
            "context": 0,                    # decode: cached tokens before the new one
            "batch": 1,                      # identical sequences in the measured step
            "seconds": 1.2e-4}               # wall time of this node for the whole step
        ]}
      ]
    }

Calibration fits, per device, ``measured = roofline / efficiency + node_overhead`` by
least squares on relative error (``roofline`` being the step's analytic time at full
efficiency), which turns the spec-sheet roofline into a :class:`DeviceSpec` that
extrapolates to shapes that were not measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .cost_model import DeviceSpec, node_cost
from .model_configs import ModelConfig
from .problem import PlannerInputError

PROFILE_SCHEMA = "vllm-split-profile/1"


class ProfileError(PlannerInputError):
    """A profile dict does not follow the schema; the message names the field."""


@dataclass(frozen=True, slots=True)
class Measurement:
    node: str
    phase: str
    tokens: int
    context: int
    batch: int
    seconds: float


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    role: str
    name: str
    peak_flops: float
    mem_bandwidth: float
    measurements: tuple[Measurement, ...]


@dataclass(frozen=True, slots=True)
class Profile:
    model: ModelConfig
    devices: tuple[DeviceProfile, ...]
    example: bool

    def device(self, role: str) -> DeviceProfile:
        for dev in self.devices:
            if dev.role == role:
                return dev
        raise ProfileError(f"profile has no device with role {role!r}; roles: {[d.role for d in self.devices]}")


def _field(obj: Mapping, key: str, kind: type | tuple, where: str):
    if not isinstance(obj, Mapping) or key not in obj:
        raise ProfileError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ProfileError(f"{where}.{key}: expected {kind}, got {value!r}")
    return value


def parse_profile(data: Mapping) -> Profile:
    """Validate a loaded profile dict and return typed records."""
    schema = _field(data, "schema", str, "profile")
    if schema != PROFILE_SCHEMA:
        raise ProfileError(f"profile.schema: expected {PROFILE_SCHEMA!r}, got {schema!r}")
    model_obj = _field(data, "model", Mapping, "profile")
    model = ModelConfig.from_hf_config(_field(model_obj, "hf_config", Mapping, "profile.model"),
                                       name=model_obj.get("name"))
    devices = []
    for d, dev in enumerate(_field(data, "devices", list, "profile")):
        where = f"profile.devices[{d}]"
        role = _field(dev, "role", str, where)
        if role not in ("server", "client"):
            raise ProfileError(f"{where}.role: expected 'server' or 'client', got {role!r}")
        rows = []
        for r, row in enumerate(_field(dev, "measurements", list, where)):
            at = f"{where}.measurements[{r}]"
            meas = Measurement(
                node=_field(row, "node", str, at), phase=_field(row, "phase", str, at),
                tokens=_field(row, "tokens", int, at), context=_field(row, "context", int, at),
                batch=_field(row, "batch", int, at), seconds=float(_field(row, "seconds", (int, float), at)))
            if meas.phase not in ("prefill", "decode") or meas.node not in ("block", "attn", "mlp", "head"):
                raise ProfileError(f"{at}: node/phase {meas.node!r}/{meas.phase!r} not in the schema")
            if meas.tokens < 1 or meas.context < 0 or meas.batch < 1 or not meas.seconds > 0:
                raise ProfileError(f"{at}: need tokens >= 1, context >= 0, batch >= 1, seconds > 0; got {row!r}")
            rows.append(meas)
        devices.append(DeviceProfile(
            role=role, name=_field(dev, "name", str, where),
            peak_flops=float(_field(dev, "peak_flops", (int, float), where)),
            mem_bandwidth=float(_field(dev, "mem_bandwidth", (int, float), where)),
            measurements=tuple(rows)))
    return Profile(model=model, devices=tuple(devices), example=bool(data.get("example", False)))


def fit_efficiency(predicted_s: Sequence[float], measured_s: Sequence[float]) -> tuple[float, float]:
    """Fit ``measured = predicted / efficiency + overhead`` (relative least squares).

    Returns ``(efficiency, overhead_s)``; the overhead is clamped at 0 (then refit), the
    efficiency at 1 (a device cannot beat its roofline).
    """
    if len(predicted_s) != len(measured_s) or not predicted_s:
        raise PlannerInputError(
            f"need as many predictions as measurements (>= 1): {len(predicted_s)} vs {len(measured_s)}")
    xs = [x / y for x, y in zip(predicted_s, measured_s)]  # regress 1 = a * x + b * (1 / y)
    zs = [1.0 / y for y in measured_s]
    sxx, szz = sum(x * x for x in xs), sum(z * z for z in zs)
    sxz, sx, sz = sum(x * z for x, z in zip(xs, zs)), sum(xs), sum(zs)
    det = sxx * szz - sxz * sxz
    a, b = (0.0, -1.0)
    if len(xs) > 1 and det > 1e-12 * sxx * szz:
        a, b = (sx * szz - sz * sxz) / det, (sxx * sz - sxz * sx) / det
    if b < 0 or a <= 0:
        a, b = sx / sxx, 0.0
    return min(1.0, 1.0 / a), b


def calibrate_device(device: DeviceProfile, model: ModelConfig) -> DeviceSpec:
    """A :class:`DeviceSpec` whose efficiency and overhead fit the device's measurements."""
    if not device.measurements:
        raise ProfileError(f"device {device.name!r} has no measurements to calibrate on")
    ideal = DeviceSpec(device.name, device.peak_flops, device.mem_bandwidth)
    predicted = []
    for meas in device.measurements:
        cost = node_cost(model, meas.node, phase=meas.phase, tokens=meas.tokens, context=meas.context)
        predicted.append(meas.batch * ideal.share_s(cost, meas.batch))  # the whole step
    efficiency, overhead = fit_efficiency(predicted, [m.seconds for m in device.measurements])
    if not math.isfinite(efficiency) or efficiency <= 0:
        raise ProfileError(f"calibration of {device.name!r} failed: efficiency {efficiency!r}")
    return DeviceSpec(device.name, device.peak_flops, device.mem_bandwidth, efficiency, overhead)


def devices_from_profile(profile: Profile) -> tuple[ModelConfig, DeviceSpec, DeviceSpec]:
    """``(model, server, client)`` calibrated from a parsed profile (both roles required)."""
    return (profile.model, calibrate_device(profile.device("server"), profile.model),
            calibrate_device(profile.device("client"), profile.model))
