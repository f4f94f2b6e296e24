"""Grow/drop policies: which weights an update drops and which it grows."""

from sparsetorch.policies.base import (
    POLICIES,
    CountContext,
    Policy,
    make_policy,
    random_scores,
    register_policy,
    update_mask,
)
from sparsetorch.policies.gmp import GMP
from sparsetorch.policies.rigl import RigL
from sparsetorch.policies.set import SET
from sparsetorch.policies.snfs import SNFS
from sparsetorch.policies.snip import SNIP
from sparsetorch.policies.static import Static

__all__ = [
    "GMP",
    "POLICIES",
    "SET",
    "SNFS",
    "SNIP",
    "CountContext",
    "Policy",
    "RigL",
    "Static",
    "make_policy",
    "random_scores",
    "register_policy",
    "update_mask",
]
