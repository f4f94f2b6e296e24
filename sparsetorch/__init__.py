"""sparsetorch: sparse training (RigL, SET, static, SNFS, GMP, SNIP) for PyTorch.

Example::

    >>> import torch
    >>> import sparsetorch as st
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    >>> sparsifier = st.sparsify(model, policy="static", sparsity=0.5)
    >>> int(sparsifier.masks["0.weight"].sum())
    32
"""

# The entry point
from sparsetorch.api import sparsify

# The pieces
from sparsetorch.compat import RigLScheduler
from sparsetorch.distributions import DISTRIBUTIONS, allocate
from sparsetorch.execution import export_sparse
from sparsetorch.flops import FlopsReport
from sparsetorch.metrics import MaskUpdate
from sparsetorch.parametrization import MaskParametrization
from sparsetorch.policies import (
    GMP,
    SET,
    SNFS,
    SNIP,
    Policy,
    RigL,
    Static,
    register_policy,
)
from sparsetorch.schedule import Schedule
from sparsetorch.sparsifier import Sparsifier
from sparsetorch.structure import NM, ConstantFanIn, Structure
from sparsetorch.topology import Topology, select_tensors

__all__ = [
    "DISTRIBUTIONS",
    "GMP",
    "NM",
    "SET",
    "SNFS",
    "SNIP",
    "ConstantFanIn",
    "FlopsReport",
    "MaskParametrization",
    "MaskUpdate",
    "Policy",
    "RigL",
    "RigLScheduler",
    "Schedule",
    "Sparsifier",
    "Static",
    "Structure",
    "Topology",
    "allocate",
    "export_sparse",
    "register_policy",
    "select_tensors",
    "sparsify",
]

__version__ = "0.1.0"
