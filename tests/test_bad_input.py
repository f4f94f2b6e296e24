"""Bad input: a clear sparsetorch error, and the model and optimizer as they were.

Every call here raises from inside sparsetorch (the traceback's last frame is in
the package, so the message on top is sparsetorch's, never a bare torch or
Python error), names the offending value, and changes nothing: parameters keep
their ids and values, modules their classes and hooks, the optimizer its state,
the sparsifier its masks, counts and generator.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import cnn, mlp
from expecttest import assert_expected_inline
from torch import Tensor, nn

import sparsetorch as st

PACKAGE = Path(st.__file__).parent


def raised_by_sparsetorch(error: pytest.ExceptionInfo[BaseException]) -> None:
    """The exception was raised by sparsetorch's code, not by torch or Python."""
    assert Path(str(error.traceback[-1].path)).is_relative_to(PACKAGE), error.traceback


def same(a: object, b: object) -> bool:
    """Deep, exact equality of nested dicts/lists of tensors and plain data."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.dtype == b.dtype
            and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (
        isinstance(a, float)
        and isinstance(b, float)
        and math.isnan(a)
        and math.isnan(b)
    )


class Snapshot:
    """Everything a failed call must leave as it was."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        sparsifier: st.Sparsifier | None = None,
    ) -> None:
        self.model, self.optimizer, self.sparsifier = model, optimizer, sparsifier
        self.value = self.take()

    def take(self) -> dict[str, Any]:
        model = self.model
        value: dict[str, Any] = {
            "classes": [(n, type(m)) for n, m in model.named_modules()],
            "params": [(n, id(p)) for n, p in model.named_parameters()],
            "values": {n: p.detach().clone() for n, p in model.named_parameters()},
            "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
            "hooks": [
                (n, len(m._forward_pre_hooks), len(m._state_dict_hooks))
                for n, m in model.named_modules()
            ],
        }
        if self.optimizer is not None:
            value["optimizer"] = copy.deepcopy(self.optimizer.state_dict())
            value["optimizer_hooks"] = len(self.optimizer._optimizer_step_post_hooks)
        if self.sparsifier is not None:
            s = self.sparsifier
            value["masks"] = {k: m.clone() for k, m in s.masks.items()}
            value["counts"] = (s.step_count, s.update_count)
            value["generator"] = s.generator.get_state()
        return value

    def assert_unchanged(self) -> None:
        now = self.take()
        for key, before in self.value.items():
            assert same(now[key], before), key


def trained_mlp() -> tuple[nn.Module, torch.optim.Optimizer]:
    """An MLP and an SGD optimizer with momentum state (one step taken)."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 20)).square().sum().backward()
    optimizer.step()
    return model, optimizer


# -- sparsify() ---------------------------------------------------------------------

SPARSIFY_CASES: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    # (id, keyword arguments, exception, text the message must show)
    ("model-none", {"model": None}, TypeError, "NoneType"),
    ("model-str", {"model": "resnet"}, TypeError, "str"),
    ("optimizer-str", {"optimizer": "sgd"}, TypeError, "str"),
    ("policy-unknown", {"policy": "rigel"}, ValueError, "'rigel'"),
    ("policy-int", {"policy": 3}, TypeError, "int"),
    ("policy-class", {"policy": st.RigL}, TypeError, "type"),
    ("sparsity-one", {"sparsity": 1.0}, ValueError, "1.0"),
    ("sparsity-negative", {"sparsity": -0.1}, ValueError, "-0.1"),
    ("sparsity-percent", {"sparsity": 90}, ValueError, "90"),
    ("sparsity-nan", {"sparsity": float("nan")}, ValueError, "nan"),
    ("sparsity-str", {"sparsity": "0.9"}, TypeError, "'0.9'"),
    ("sparsity-bool", {"sparsity": True}, TypeError, "True"),
    ("sparsity-tensor", {"sparsity": torch.tensor(0.5)}, TypeError, "tensor(0.5000)"),
    ("distribution-unknown", {"distribution": "erdos"}, ValueError, "'erdos'"),
    ("distribution-int", {"distribution": 3}, TypeError, "int"),
    ("distribution-list", {"distribution": ["erk"]}, TypeError, "list"),
    (
        "distribution-dict-missing",
        {"distribution": {"0.weight": 0.5}},
        ValueError,
        "['2.weight', '4.weight']",
    ),
    (
        "distribution-dict-unknown",
        {"distribution": {"0.weight": 0.5, "2.weight": 0.5, "4.weight": 0.5, "x": 0.5}},
        ValueError,
        "['x']",
    ),
    (
        "distribution-dict-out-of-range",
        {"distribution": {"0.weight": 1.5, "2.weight": 0.5, "4.weight": 0.5}},
        ValueError,
        "1.5",
    ),
    (
        "distribution-dict-nan",
        {"distribution": {"0.weight": float("nan"), "2.weight": 0.5, "4.weight": 0.5}},
        ValueError,
        "nan",
    ),
    (
        "distribution-dict-str",
        {"distribution": {"0.weight": "0.5", "2.weight": 0.5, "4.weight": 0.5}},
        TypeError,
        "'0.5'",
    ),
    ("total-steps-zero", {"total_steps": 0}, ValueError, "0"),
    ("total-steps-one", {"total_steps": 1}, ValueError, "total_steps=1"),
    ("total-steps-float", {"total_steps": 100.0}, TypeError, "100.0"),
    ("total-steps-bool", {"total_steps": True}, TypeError, "True"),
    ("update-interval-zero", {"update_interval": 0}, ValueError, "0"),
    ("update-interval-float", {"update_interval": 2.0}, TypeError, "2.0"),
    ("update-interval-none", {"update_interval": None}, TypeError, "None"),
    ("drop-fraction-negative", {"drop_fraction": -0.1}, ValueError, "-0.1"),
    ("drop-fraction-above-one", {"drop_fraction": 1.5}, ValueError, "1.5"),
    ("drop-fraction-nan", {"drop_fraction": float("nan")}, ValueError, "nan"),
    ("drop-fraction-str", {"drop_fraction": "0.3"}, TypeError, "'0.3'"),
    ("drop-schedule-unknown", {"drop_schedule": "exp"}, ValueError, "'exp'"),
    ("drop-schedule-int", {"drop_schedule": 3}, TypeError, "3"),
    ("begin-step-negative", {"begin_step": -1}, ValueError, "-1"),
    ("begin-step-float", {"begin_step": 1.0}, TypeError, "1.0"),
    ("begin-step-after-end", {"begin_step": 80}, ValueError, "begin_step (80)"),
    ("end-step-zero", {"total_steps": None, "end_step": 0}, ValueError, "(0)"),
    ("end-step-float", {"total_steps": None, "end_step": 2.5}, TypeError, "2.5"),
    ("end-step-bool", {"total_steps": None, "end_step": True}, TypeError, "True"),
    ("no-end", {"total_steps": None}, ValueError, "RigL"),
    ("include-str", {"include": "0.weight"}, TypeError, "'0.weight'"),
    ("include-int", {"include": 3}, TypeError, "3"),
    ("include-ints", {"include": [1]}, TypeError, "[1]"),
    ("include-no-match", {"include": ["encoder.*"]}, ValueError, "'encoder.*'"),
    ("exclude-str", {"exclude": "*"}, TypeError, "'*'"),
    ("exclude-everything", {"exclude": ["*"]}, ValueError, "Nothing to sparsify"),
    ("grow-init-unknown", {"grow_init": "ones"}, ValueError, "'ones'"),
    ("grow-init-nan", {"grow_init": float("nan")}, ValueError, "nan"),
    ("grow-init-inf", {"grow_init": float("inf")}, ValueError, "inf"),
    ("grow-init-none", {"grow_init": None}, TypeError, "None"),
    ("seed-float", {"seed": 1.5}, TypeError, "1.5"),
    ("seed-none", {"seed": None}, TypeError, "None"),
    ("seed-too-large", {"seed": 2**64}, ValueError, str(2**64)),
]


@pytest.mark.parametrize(
    ("kwargs", "exception", "shown"),
    [case[1:] for case in SPARSIFY_CASES],
    ids=[case[0] for case in SPARSIFY_CASES],
)
def test_sparsify_rejects(
    kwargs: dict[str, Any], exception: type[Exception], shown: str
) -> None:
    model, optimizer = trained_mlp()
    snapshot = Snapshot(model, optimizer)
    kwargs = {"total_steps": 100, **kwargs}
    with pytest.raises(exception) as error:
        st.sparsify(
            kwargs.pop("model", model), kwargs.pop("optimizer", optimizer), **kwargs
        )
    raised_by_sparsetorch(error)
    assert shown in str(error.value)
    snapshot.assert_unchanged()


def test_seed_range_message() -> None:
    with pytest.raises(ValueError) as error:
        st.sparsify(mlp(), policy="static", seed=-(2**63) - 1)
    assert_expected_inline(
        str(error.value),
        """seed must be in [-2**63, 2**64) (torch.Generator's range), got -9223372036854775809.""",
    )


def test_total_steps_too_small_message() -> None:
    with pytest.raises(ValueError) as error:
        st.sparsify(mlp(), total_steps=100, begin_step=80)
    assert_expected_inline(
        str(error.value),
        """\
total_steps=100 leaves no step for topology updates: end_step defaults to int(0.75 * total_steps) = 75, which must be greater than begin_step (80).
Pass a larger total_steps, or end_step= explicitly.""",
    )


def test_static_policy_ignores_total_steps() -> None:
    sparsifier = st.sparsify(mlp(), policy="static", total_steps=1)
    assert sparsifier.schedule.end_step is None


def test_optimizer_without_the_models_parameters() -> None:
    model, _ = trained_mlp()
    other = torch.optim.Adam(nn.Linear(3, 3).parameters())
    snapshot = Snapshot(model, other)
    with pytest.raises(ValueError) as error:
        st.sparsify(model, other, total_steps=100)
    raised_by_sparsetorch(error)
    assert "['0.weight', '2.weight', '4.weight']" in str(error.value)
    snapshot.assert_unchanged()


def test_optimizer_with_only_some_of_the_parameters() -> None:
    model, _ = trained_mlp()
    partial = torch.optim.SGD(model[4].parameters(), lr=0.1)
    snapshot = Snapshot(model, partial)
    with pytest.raises(ValueError) as error:
        st.sparsify(model, partial, total_steps=100)
    assert_expected_inline(
        str(error.value),
        """\
The optimizer does not hold the parameters ['0.weight', '2.weight'].
Pass the optimizer built over model.parameters().""",
    )
    snapshot.assert_unchanged()


# -- models sparsetorch cannot sparsify ---------------------------------------------


def test_weight_norm_parametrized_layer() -> None:
    model = nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)), nn.Linear(4, 2)
    )
    snapshot = Snapshot(model)
    with pytest.raises(ValueError) as error:
        st.sparsify(model, policy="static")
    raised_by_sparsetorch(error)
    assert_expected_inline(
        str(error.value),
        """\
Cannot sparsify ['0.weight']: computed by another parametrization (weight_norm, say) or not parameters, so sparsetorch cannot mask them.
Leave them dense: exclude=['0.weight'].""",
    )
    snapshot.assert_unchanged()
    sparsifier = st.sparsify(model, policy="static", exclude=["0.weight"])
    assert list(sparsifier.masks) == ["1.weight"]


def test_sparse_embedding() -> None:
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    snapshot = Snapshot(model)
    with pytest.raises(ValueError) as error:
        st.sparsify(model, policy="static", include=["*.weight"])
    raised_by_sparsetorch(error)
    assert_expected_inline(
        str(error.value),
        """\
'0.weight' belongs to an embedding with sparse=True, whose sparse gradients sparsetorch cannot mask.
Build it with sparse=False, or leave it dense.""",
    )
    snapshot.assert_unchanged()


def test_sparsifying_twice() -> None:
    model, optimizer = trained_mlp()
    sparsifier = st.sparsify(model, optimizer, policy="static")
    snapshot = Snapshot(model, optimizer, sparsifier)
    with pytest.raises(ValueError) as error:
        st.sparsify(model, optimizer, policy="static", sparsity=0.5)
    raised_by_sparsetorch(error)
    snapshot.assert_unchanged()


# -- frozen parameters --------------------------------------------------------------


def frozen_mlp() -> nn.Sequential:
    model = mlp()
    model[0].requires_grad_(False)  # a frozen first layer, as in fine-tuning
    return model


def test_frozen_tensors_are_skipped_with_a_warning_and_a_summary_note() -> None:
    model = frozen_mlp()
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.1
    )
    with pytest.warns(UserWarning) as record:
        sparsifier = st.sparsify(
            model, optimizer, sparsity=0.5, distribution="uniform", total_steps=1000
        )
    assert len(record) == 1
    assert_expected_inline(
        str(record[0].message),
        """\
Skipped 1 frozen tensor(s) (requires_grad=False), which stay dense: ['0.weight'].
sparsifier.summary() lists them; unfreeze them before sparsify() to sparsify them.""",
    )
    assert_expected_inline(
        sparsifier.summary(),
        """\
tensor    shape     target  actual     active      numel
2.weight  (16, 32)  0.5000  0.5000        256        512
4.weight  (4, 16)   0.5000  0.5000         32         64
total               0.5000  0.5000        288        576
skipped: 0.weight (requires_grad=False, dense)""",
    )
    assert not parametrized(model[0])
    assert bool((model[0].weight != 0).all())


def parametrized(module: nn.Module) -> bool:
    return hasattr(module, "parametrizations")


def test_only_frozen_tensors_selected() -> None:
    model = frozen_mlp()
    snapshot = Snapshot(model)
    with pytest.raises(ValueError) as error:
        st.sparsify(model, policy="static", include=["0.weight"])
    raised_by_sparsetorch(error)
    assert_expected_inline(
        str(error.value),
        """\
Nothing to sparsify: every selected tensor is frozen (requires_grad=False): ['0.weight'].
sparsetorch keeps the masked weights' gradients and optimizer state in step with the masks, so it sparsifies only trained tensors: call .requires_grad_(True) on them, or select others with include=["..."].""",
    )
    snapshot.assert_unchanged()


def test_rigl_scheduler_skips_frozen_layers() -> None:
    model = frozen_mlp()
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.1
    )
    with pytest.warns(UserWarning, match="frozen"):
        pruner = st.RigLScheduler(
            model,
            optimizer,
            dense_allocation=0.5,
            T_end=10,
            ignore_linear_layers=False,
            sparsity_distribution="ERK",
        )
    assert list(pruner.masks) == ["2.weight", "4.weight"]


# -- RigLScheduler ------------------------------------------------------------------


def conv_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.Flatten(),
        nn.Linear(16, 2),
    )


RIGL_CASES: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("model-none", {"model": None}, TypeError, "NoneType"),
    ("optimizer-none", {"optimizer": None}, TypeError, "NoneType"),
    ("optimizer-str", {"optimizer": "sgd"}, TypeError, "str"),
    (
        "optimizer-of-another-model",
        {"optimizer": "other"},
        ValueError,
        "['2.weight']",
    ),
    ("dense-allocation-zero", {"dense_allocation": 0}, ValueError, "0"),
    ("dense-allocation-above-one", {"dense_allocation": 1.5}, ValueError, "1.5"),
    ("dense-allocation-nan", {"dense_allocation": float("nan")}, ValueError, "nan"),
    ("dense-allocation-str", {"dense_allocation": "0.1"}, TypeError, "'0.1'"),
    ("t-end-none", {"T_end": None}, ValueError, "T_end"),
    ("t-end-zero", {"T_end": 0}, ValueError, "0"),
    ("t-end-negative", {"T_end": -5}, ValueError, "-5"),
    ("t-end-str", {"T_end": "20"}, TypeError, "'20'"),
    ("distribution-unknown", {"sparsity_distribution": "er"}, ValueError, "'er'"),
    ("distribution-list", {"sparsity_distribution": ["ERK"]}, TypeError, "['ERK']"),
    ("ignore-linear-str", {"ignore_linear_layers": "no"}, TypeError, "'no'"),
    ("delta-zero", {"delta": 0}, ValueError, "0"),
    ("delta-float", {"delta": 1.5}, TypeError, "1.5"),
    ("alpha-negative", {"alpha": -1.0}, ValueError, "-1.0"),
    ("alpha-above-one", {"alpha": 2.0}, ValueError, "2.0"),
    ("alpha-str", {"alpha": "0.3"}, TypeError, "'0.3'"),
    ("static-topo-str", {"static_topo": "yes"}, TypeError, "'yes'"),
    ("grad-accumulation-zero", {"grad_accumulation_n": 0}, ValueError, "0"),
    ("grad-accumulation-delta", {"grad_accumulation_n": 5}, ValueError, "delta=5"),
    ("grad-accumulation-fraction", {"grad_accumulation_n": 1.5}, TypeError, "1.5"),
    ("state-dict-str", {"state_dict": "ckpt.pt"}, TypeError, "str"),
    ("state-dict-empty", {"state_dict": {}}, ValueError, "format_version"),
    (
        "state-dict-of-another-model",
        {"state_dict": "other"},
        ValueError,
        "unexpected in the checkpoint",
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "exception", "shown"),
    [case[1:] for case in RIGL_CASES],
    ids=[case[0] for case in RIGL_CASES],
)
def test_rigl_scheduler_rejects(
    kwargs: dict[str, Any], exception: type[Exception], shown: str
) -> None:
    model = conv_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 6, 6)).sum().backward()
    optimizer.step()
    snapshot = Snapshot(model, optimizer)
    kwargs = {"dense_allocation": 0.2, "T_end": 20, "delta": 5, **kwargs}
    if kwargs.get("optimizer") == "other":
        kwargs["optimizer"] = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    if kwargs.get("state_dict") == "other":
        other = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1)
        )
        kwargs["state_dict"] = st.RigLScheduler(
            other, torch.optim.SGD(other.parameters(), lr=0.1), 0.2, 20, delta=5
        ).state_dict()
    with pytest.raises(exception) as error:
        st.RigLScheduler(
            kwargs.pop("model", model), kwargs.pop("optimizer", optimizer), **kwargs
        )
    raised_by_sparsetorch(error)
    assert shown in str(error.value)
    snapshot.assert_unchanged()


def test_rigl_scheduler_with_a_truncated_rigl_torch_state_dict() -> None:
    model = conv_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    snapshot = Snapshot(model, optimizer)
    rigl_torch_state = {"dense_allocation": 0.2, "S": [0.0, 0.8], "backward_masks": []}
    with pytest.raises(ValueError) as error:
        st.RigLScheduler(model, optimizer, 0.2, 20, state_dict=rigl_torch_state)
    assert_expected_inline(
        str(error.value),
        """\
The rigl-torch checkpoint lacks the keys ['N', '_linear_layers_mask', 'hyperparams', 'rigl_steps', 'step']: it is truncated or not made by rigl-torch's RigLScheduler.state_dict().""",
    )
    snapshot.assert_unchanged()


# -- sparsifier checkpoints ---------------------------------------------------------


def sparsified(
    sparsity: float = 0.9,
) -> tuple[nn.Module, torch.optim.Optimizer, st.Sparsifier]:
    """A CNN after 3 RigL steps (one update), with momentum state."""
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = st.sparsify(
        model, optimizer, sparsity=sparsity, total_steps=40, update_interval=2
    )
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 8, 8)).square().sum().backward()
        optimizer.step()
    assert sparsifier.update_count == 1
    return model, optimizer, sparsifier


def load_fails(state: object, exception: type[Exception], sparsity: float = 0.9) -> str:
    """Load ``state`` into a fresh trained sparsifier: it raises, nothing changes."""
    model, optimizer, sparsifier = sparsified(sparsity)
    snapshot = Snapshot(model, optimizer, sparsifier)
    with pytest.raises(exception) as error:
        sparsifier.load_state_dict(state)  # type: ignore[arg-type]
    raised_by_sparsetorch(error)
    snapshot.assert_unchanged()
    return str(error.value)


def checkpoint() -> dict[str, Any]:
    """A checkpoint of another run of the same model and settings."""
    _, _, sparsifier = sparsified()
    return sparsifier.state_dict()


def test_checkpoint_of_another_model() -> None:
    other = mlp()
    state = st.sparsify(other, sparsity=0.9, total_steps=40, update_interval=2)
    message = load_fails(state.state_dict(), ValueError)
    assert_expected_inline(
        message,
        """\
The checkpoint's tensors do not match this sparsifier's.
missing from the checkpoint: ['3.weight', '6.weight']
unexpected in the checkpoint: ['2.weight', '4.weight']""",
    )


def test_checkpoint_with_another_sparsity() -> None:
    message = load_fails(checkpoint(), ValueError, sparsity=0.8)
    assert message.startswith(
        "The checkpoint was made with other settings:\nsparsities"
    )


def test_checkpoint_with_other_shapes_under_the_same_names() -> None:
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1))
    other_state = st.sparsify(other, policy="static", include=["2.weight"]).state_dict()
    state = checkpoint()
    state["masks"]["3.weight"] = other_state["masks"]["2.weight"]
    assert_expected_inline(
        load_fails(state, ValueError),
        """Mask '3.weight' has shape (8, 8, 1, 1) in the checkpoint but the weight has shape (8, 8, 3, 3).""",
    )


def test_future_format_version() -> None:
    state = checkpoint()
    state["format_version"] = 4
    assert_expected_inline(
        load_fails(state, ValueError),
        """\
The sparsifier checkpoint has format_version 4, newer than this sparsetorch reads (versions [1, 2, 3]).
Upgrade sparsetorch to load it.""",
    )


@pytest.mark.parametrize("version", [0, "2", None, 2.5, True])
def test_unknown_format_version(version: object) -> None:
    state = checkpoint()
    state["format_version"] = version
    message = load_fails(state, ValueError)
    assert message.startswith(
        f"Unknown sparsifier checkpoint format_version {version!r}"
    )


def test_unknown_format_version_message() -> None:
    state = checkpoint()
    state["format_version"] = "v2"
    assert_expected_inline(
        load_fails(state, ValueError),
        """Unknown sparsifier checkpoint format_version 'v2'; this sparsetorch reads versions [1, 2, 3].""",
    )


def test_not_a_dict() -> None:
    assert_expected_inline(
        load_fails("ckpt.pt", TypeError),
        """\
Sparsifier.load_state_dict takes the dict made by sparsifier.state_dict(), got str.
Load the file first: torch.load(path, weights_only=True)["sparsity"].""",
    )


def test_model_state_dict_instead_of_the_sparsifiers() -> None:
    model, _, _ = sparsified()
    message = load_fails(model.state_dict(), ValueError)
    assert message.startswith("Not a sparsifier checkpoint: it has no 'format_version'")


def test_truncated_checkpoint() -> None:
    state = checkpoint()
    del state["generator"], state["settings"]
    assert_expected_inline(
        load_fails(state, ValueError),
        """The sparsifier checkpoint lacks the keys ['generator', 'settings']: it is truncated or not made by sparsifier.state_dict().""",
    )


@pytest.mark.parametrize("step", [-1, 2.0, "3", None])
def test_bad_step_count(step: object) -> None:
    state = checkpoint()
    state["step"] = step
    message = load_fails(state, ValueError)
    assert f"'step' must be an int >= 0, got {step!r}" in message


@pytest.mark.parametrize(
    "generator", [torch.zeros(10, dtype=torch.uint8), torch.zeros(5056), "seed", None]
)
def test_bad_generator_state(generator: object) -> None:
    state = checkpoint()
    state["generator"] = generator
    message = load_fails(state, ValueError)
    assert message.startswith(
        "The sparsifier checkpoint's generator state is not a CPU torch.Generator state"
    )


def test_masks_not_a_dict() -> None:
    state = checkpoint()
    state["masks"] = [1, 2]
    assert_expected_inline(
        load_fails(state, TypeError),
        """The sparsifier checkpoint's 'masks' must be a dict {tensor_fqn: mask}, got list.""",
    )


def corrupt(fqn: str, **changes: Any) -> dict[str, Any]:
    state = checkpoint()
    state["masks"][fqn] = {**state["masks"][fqn], **changes}
    return state


@pytest.mark.parametrize(
    ("features", "sparsity", "encoding", "dtype"),
    [
        (100, 0.9, "bits", torch.uint8),  # 10000 weights: 1250 bytes < 2000
        (100, 0.99, "indices", torch.int16),  # 200 bytes < 1250
        (300, 0.9, "bits", torch.uint8),  # 90000 weights: 11250 bytes < 36000
        (300, 0.99, "indices", torch.int32),  # 3600 bytes < 11250
    ],
)
def test_checkpoint_stores_the_smaller_encoding(
    features: int, sparsity: float, encoding: str, dtype: torch.dtype
) -> None:
    model = nn.Sequential(nn.Linear(features, features))
    sparsifier = st.sparsify(model, policy="static", sparsity=sparsity)
    entry = sparsifier.state_dict()["masks"]["0.weight"]
    assert (entry["encoding"], entry["data"].dtype) == (encoding, dtype)
    assert entry["active"] == round((1 - sparsity) * features**2)
    fresh = st.sparsify(
        nn.Sequential(nn.Linear(features, features)),
        policy="static",
        sparsity=sparsity,
        seed=1,
    )
    assert not torch.equal(fresh.masks["0.weight"], sparsifier.masks["0.weight"])
    fresh.load_state_dict(sparsifier.state_dict())
    assert torch.equal(fresh.masks["0.weight"], sparsifier.masks["0.weight"])


def bits_checkpoint() -> tuple[dict[str, Any], dict[str, Any]]:
    """A checkpoint and its bit-packed entry for '6.weight'."""
    state = checkpoint()
    entry = state["masks"]["6.weight"]
    assert entry["encoding"] == "bits"
    entry["data"] = entry["data"].clone()
    return state, entry


def test_corrupted_bits_dtype() -> None:
    state, entry = bits_checkpoint()
    entry["data"] = entry["data"].to(torch.int32)
    assert_expected_inline(
        load_fails(state, TypeError),
        """Mask '6.weight': bit-packed data must be torch.uint8, got torch.int32.""",
    )


def test_corrupted_bits_length() -> None:
    state, entry = bits_checkpoint()
    entry["data"] = entry["data"][:-1]
    assert_expected_inline(
        load_fails(state, ValueError),
        """Mask '6.weight': bit-packed data has 63 bytes, but a mask of shape (4, 128) needs 64.""",
    )


def test_corrupted_bits_count() -> None:
    state, entry = bits_checkpoint()
    entry["data"][0] ^= 1  # one weight more or less than 'active' says
    message = load_fails(state, ValueError)
    assert message.startswith(f"Mask '6.weight' says it has {entry['active']} active")
    assert message.endswith("the checkpoint is corrupted.")


def test_corrupted_bits_with_a_matching_active_field() -> None:
    state, entry = bits_checkpoint()
    entry["data"][0] ^= 1
    entry["active"] = sum(bin(int(b)).count("1") for b in entry["data"])
    message = load_fails(state, ValueError)
    assert message.startswith(f"Mask '6.weight' has {entry['active']} active weights")
    assert message.endswith(
        "in the checkpoint, but this sparsifier targets 101.\n"
        "Build the sparsifier with the checkpoint's sparsity and distribution."
    )


def test_padding_bits_set() -> None:
    model = nn.Sequential(nn.Linear(3, 5))  # 15 weights: 2 bytes, 1 padding bit
    sparsifier = st.sparsify(model, policy="static", sparsity=0.5)
    state = sparsifier.state_dict()
    entry = state["masks"]["0.weight"]
    assert entry["encoding"] == "bits"
    entry["data"] = entry["data"].clone()
    entry["data"][-1] |= 1
    snapshot = Snapshot(model, None, sparsifier)
    with pytest.raises(ValueError) as error:
        sparsifier.load_state_dict(state)
    assert_expected_inline(
        str(error.value), """Mask '0.weight': the padding bits are not zero."""
    )
    snapshot.assert_unchanged()


def test_corrupted_mask_shape_field() -> None:
    assert_expected_inline(
        load_fails(corrupt("6.weight", shape=[8, 64]), ValueError),
        """Mask '6.weight' has shape (8, 64) in the checkpoint but the weight has shape (4, 128).""",
    )


def test_mask_entry_of_the_wrong_type() -> None:
    state = checkpoint()
    state["masks"]["6.weight"] = torch.ones(4, 128, dtype=torch.bool)
    assert_expected_inline(
        load_fails(state, TypeError),
        """Mask '6.weight' in a format_version 2 checkpoint must be a dict with keys ['active', 'data', 'encoding', 'shape'], got Tensor.""",
    )


def test_unknown_mask_encoding() -> None:
    assert_expected_inline(
        load_fails(corrupt("6.weight", encoding="rle"), ValueError),
        """Mask '6.weight' has unknown encoding 'rle'; this sparsetorch reads 'bits' and 'indices'.""",
    )


@pytest.mark.parametrize(
    ("change", "exception"),
    [
        ("out-of-range", ValueError),
        ("negative", ValueError),
        ("duplicate", ValueError),
        ("unsorted", ValueError),
        ("float", TypeError),
        ("two-dimensional", ValueError),
        ("too-few", ValueError),
    ],
)
def test_corrupted_indices(change: str, exception: type[Exception]) -> None:
    _, _, sparsifier = sparsified(0.99)
    state = sparsifier.state_dict()
    entry = state["masks"]["6.weight"]
    assert entry["encoding"] == "indices"
    index = entry["data"].clone()
    if change == "out-of-range":
        index[-1] = 4 * 128
    elif change == "negative":
        index[0] = -1
    elif change == "duplicate":
        index[1] = index[0]
    elif change == "unsorted":
        index = index.flip(0)
    elif change == "float":
        index = index.float()
    elif change == "two-dimensional":
        index = index.view(1, -1)
    else:
        index = index[:-1]
        entry["active"] -= 1
    entry["data"] = index
    _, _, fresh = sparsified(0.99)
    snapshot = Snapshot(fresh.topology.model, fresh.optimizer, fresh)
    with pytest.raises(exception) as error:
        fresh.load_state_dict(state)
    raised_by_sparsetorch(error)
    assert str(error.value).startswith("Mask '6.weight")
    snapshot.assert_unchanged()


DATA = Path(__file__).parent / "data"


def test_version_1_file_still_loads() -> None:
    # tests/data/sparsifier_v1.pt was written by sparsetorch 302c3b5 (format 1:
    # plain bool masks) with tests/data/make_sparsifier_v1.py.
    spec = importlib.util.spec_from_file_location(
        "make_v1", DATA / "make_sparsifier_v1.py"
    )
    assert spec is not None and spec.loader is not None
    make_v1 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_v1)
    saved = torch.load(DATA / "sparsifier_v1.pt", weights_only=True)
    assert saved["sparsifier"]["format_version"] == 1
    model, optimizer = make_v1.build()
    sparsifier = st.sparsify(
        model, optimizer, sparsity=0.75, distribution="uniform", total_steps=40,
        update_interval=5, seed=3,
    )  # fmt: skip
    model.load_state_dict(saved["model"])
    sparsifier.load_state_dict(saved["sparsifier"])
    assert (sparsifier.step_count, sparsifier.update_count) == (12, 2)
    assert torch.equal(
        sparsifier.generator.get_state(), saved["sparsifier"]["generator"]
    )
    for fqn, mask in sparsifier.masks.items():
        assert torch.equal(mask, saved["sparsifier"]["masks"][fqn])
        assert int(mask.sum()) == {"0.weight": 32, "2.weight": 16}[fqn]
        assert torch.equal(sparsifier.topology.params[fqn], saved["model"][fqn])
    state = sparsifier.state_dict()  # saved again: as version 2
    assert state["format_version"] == 2
    assert {k: e["encoding"] for k, e in state["masks"].items()} == {
        "0.weight": "bits",
        "2.weight": "bits",
    }
    for _ in range(8):  # and training goes on: updates at steps 15 and 20
        optimizer.zero_grad()
        model(torch.randn(4, 8)).square().sum().backward()
        optimizer.step()
    assert (sparsifier.step_count, sparsifier.update_count) == (20, 4)
    assert all(
        int(m.sum()) == {"0.weight": 32, "2.weight": 16}[k]
        for k, m in sparsifier.masks.items()
    )


def version_1(**changes: Tensor) -> dict[str, Any]:
    """A format_version 1 checkpoint (plain bool masks) of another run."""
    _, _, sparsifier = sparsified()
    state = sparsifier.state_dict()
    state["format_version"] = 1
    state["masks"] = {k: m.clone() for k, m in sparsifier.masks.items()} | changes
    return state


def test_version_1_checkpoint_of_the_same_settings_loads() -> None:
    state = version_1()
    _, _, sparsifier = sparsified()
    sparsifier.load_state_dict(state)
    assert all(torch.equal(m, state["masks"][k]) for k, m in sparsifier.masks.items())


def test_version_1_mask_of_the_wrong_dtype() -> None:
    mask = version_1()["masks"]["6.weight"]
    assert_expected_inline(
        load_fails(version_1(**{"6.weight": mask.float()}), TypeError),
        """Mask '6.weight' in the checkpoint must be a bool tensor, got torch.float32.""",
    )


def test_version_1_mask_of_the_wrong_shape() -> None:
    mask = version_1()["masks"]["6.weight"]
    assert_expected_inline(
        load_fails(version_1(**{"6.weight": mask.T}), ValueError),
        """Mask '6.weight' has shape (128, 4) in the checkpoint but the weight has shape (4, 128).""",
    )


def test_version_1_mask_with_the_wrong_count() -> None:
    mask = version_1()["masks"]["6.weight"].clone()
    mask[0, :8] = True
    mask[1, :8] = True
    assert_expected_inline(
        load_fails(version_1(**{"6.weight": mask}), ValueError),
        """\
Mask '6.weight' has 114 active weights in the checkpoint, but this sparsifier targets 101.
Build the sparsifier with the checkpoint's sparsity and distribution.""",
    )


def test_version_1_mask_not_a_tensor() -> None:
    assert_expected_inline(
        load_fails(version_1(**{"6.weight": [True, False]}), TypeError),  # type: ignore[arg-type]
        """Mask '6.weight': the checkpoint's mask must be a tensor, got list.""",
    )


# -- pickling a sparsified model ----------------------------------------------------


def test_torch_save_of_the_model_says_to_save_state_dicts() -> None:
    model, optimizer, sparsifier = sparsified()
    snapshot = Snapshot(model, optimizer, sparsifier)
    with pytest.raises(RuntimeError) as error:
        torch.save(model, io.BytesIO())
    raised_by_sparsetorch(error)
    assert_expected_inline(
        str(error.value),
        """\
Cannot pickle the sparsified Conv2d module: torch.save(model) pickles whole modules, and modules sparsified with sparsetorch (torch.nn.utils.parametrize) cannot be pickled.
Save the state dicts instead: torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "sparsity": sparsifier.state_dict()}, path), or call sparsifier.remove() first for a plain model with zeros.""",
    )
    snapshot.assert_unchanged()
    assert copy.deepcopy(model) is not model  # deepcopy still works


def test_state_dicts_save_and_the_removed_model_pickles() -> None:
    model, optimizer, sparsifier = sparsified()
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "sparsity": sparsifier.state_dict(),
        },
        buffer,
    )
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["sparsity"]["format_version"] == 2
    sparsifier.remove()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    plain = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    plain.eval()
    assert torch.equal(plain(x), model(x))


# -- NaN and inf at an update -------------------------------------------------------


def poisoned_update(where: str) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = st.sparsify(
        model, optimizer, sparsity=0.8, total_steps=40, update_interval=2
    )
    x = torch.randn(4, 20)
    optimizer.zero_grad()
    model(x).square().sum().backward()
    optimizer.step()  # step 1
    optimizer.zero_grad()
    model(x).square().sum().backward()
    param = sparsifier.topology.params["2.weight"]
    mask = sparsifier.masks["2.weight"]
    active = mask.flatten().nonzero()[0, 0]
    inactive = (~mask).flatten().nonzero()[0, 0]
    if where == "weight":
        with torch.no_grad():
            param.view(-1)[active] = float("nan")
    else:
        dense = sparsifier.topology.parametrizations["2.weight"].dense_grad
        assert dense is not None
        dense.view(-1)[inactive] = float("inf")
    masks = {k: m.clone() for k, m in sparsifier.masks.items()}
    with pytest.warns(RuntimeWarning) as record:
        optimizer.step()  # step 2: the update is skipped
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith("Skipped the topology update at step 2: RigL.")
    assert "NaN/inf" in message
    assert sparsifier.update_count == 0
    assert all(torch.equal(m, masks[k]) for k, m in sparsifier.masks.items())
    for p in sparsifier.topology.parametrizations.values():
        assert p.dense_grad is None
    for fqn, m in sparsifier.masks.items():
        assert torch.all(sparsifier.topology.params[fqn][~m] == 0)


def test_nan_weight_at_an_update_skips_it_with_a_warning() -> None:
    poisoned_update("weight")


def test_inf_gradient_at_an_update_skips_it_with_a_warning() -> None:
    poisoned_update("grad")


def test_nan_where_an_update_does_not_read_is_ignored() -> None:
    # Drop scores are read at active positions only: a NaN elsewhere cannot be
    # picked, so the update runs.
    @dataclass(frozen=True, kw_only=True)
    class NaNOutside(st.SET):
        def drop_score(self, weight: Tensor, mask: Tensor) -> Tensor:
            return weight.abs().masked_fill(~mask, float("nan"))

    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = st.sparsify(
        model, optimizer, policy=NaNOutside(), sparsity=0.8, total_steps=40,
        update_interval=1, drop_fraction=0.1, drop_schedule="constant",
    )  # fmt: skip
    before = {k: m.clone() for k, m in sparsifier.masks.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()
    assert sparsifier.update_count == 1
    for fqn, mask in sparsifier.masks.items():
        assert int(mask.sum()) == sparsifier.topology.targets[fqn]
        grown, dropped = mask & ~before[fqn], before[fqn] & ~mask
        assert int(grown.sum()) == int(dropped.sum())
    assert any(not torch.equal(m, before[k]) for k, m in sparsifier.masks.items())
