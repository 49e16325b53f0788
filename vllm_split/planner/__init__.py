"""Placement planner: which layers of a request run on the client and which on the server.

Pure functions over typed records (no I/O, no torch, standard library only). See
docs/planner.md for the model, the DP and the study.
"""

from .baselines import client_max, greedy, server_only
from .cost_model import DeviceSpec, NodeCost, RequestShape, build_graph, node_cost
from .evaluate import enumerate_placements, evaluate
from .model_configs import KNOWN_MODELS, LLAMA3_8B, LLAMA3_70B, SMOLLM2_135M, ModelConfig
from .plan import DEFAULT_TICK_S, plan, result_for
from .problem import (
    SLA,
    LayerGraph,
    LayerNode,
    NetworkSpec,
    Placement,
    PlannerInputError,
    PlanResult,
    Shape,
)
from .profile import (
    PROFILE_SCHEMA,
    Profile,
    ProfileError,
    calibrate_device,
    devices_from_profile,
    fit_efficiency,
    parse_profile,
)

__all__ = [
    "DEFAULT_TICK_S",
    "KNOWN_MODELS",
    "LLAMA3_70B",
    "LLAMA3_8B",
    "PROFILE_SCHEMA",
    "SMOLLM2_135M",
    "DeviceSpec",
    "ModelConfig",
    "NodeCost",
    "Profile",
    "ProfileError",
    "RequestShape",
    "build_graph",
    "calibrate_device",
    "devices_from_profile",
    "fit_efficiency",
    "node_cost",
    "parse_profile",
    "SLA",
    "LayerGraph",
    "LayerNode",
    "NetworkSpec",
    "Placement",
    "PlanResult",
    "PlannerInputError",
    "Shape",
    "client_max",
    "enumerate_placements",
    "evaluate",
    "greedy",
    "plan",
    "result_for",
    "server_only",
]
