"""Topology: selection, standard state dicts, removal."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, cnn, mlp
from expecttest import assert_expected_inline
from torch import nn

import sparsetorch as st
from sparsetorch import select_tensors


def test_default_selection_is_linear_and_conv_weights() -> None:
    assert select_tensors(cnn()) == ["0.weight", "3.weight", "6.weight"]


def test_include_and_exclude_globs_exclude_wins() -> None:
    model = cnn()
    assert select_tensors(model, include=["*.weight"]) == [
        "0.weight",
        "1.weight",
        "3.weight",
        "6.weight",
    ]
    assert select_tensors(model, include=["*.weight"], exclude=["1.*", "6.*"]) == [
        "0.weight",
        "3.weight",
    ]


def test_glob_matching_nothing_raises() -> None:
    with pytest.raises(ValueError) as error:
        select_tensors(mlp(), exclude=["encoder.*"])
    assert_expected_inline(
        str(error.value),
        """\
exclude glob 'encoder.*' matches no tensor of the model.
tensors: ['0.bias', '0.weight', '2.bias', '2.weight', '4.bias', '4.weight']""",
    )


def test_nothing_selected_raises() -> None:
    with pytest.raises(ValueError) as error:
        st.sparsify(nn.Sequential(nn.LayerNorm(4)), policy="static")
    assert_expected_inline(
        str(error.value),
        """\
Nothing to sparsify: no tensor is selected.
tensors: ['0.bias', '0.weight']
By default the weights of nn.Linear and nn.Conv* layers are selected; pass include=["..."] to choose tensors by name.""",
    )


def test_state_dict_keeps_the_dense_keys_in_order_with_masked_values() -> None:
    model = cnn()
    dense_keys = list(model.state_dict())
    sparsifier = st.sparsify(model, policy="static", sparsity=0.7)
    state = model.state_dict()
    assert list(state) == dense_keys
    for fqn, mask in sparsifier.masks.items():
        assert torch.all(state[fqn][~mask] == 0)
        assert torch.equal(state[fqn] != 0, mask)


def test_submodule_state_dict_keeps_dense_keys() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)))
    dense_keys = list(model[0].state_dict())
    st.sparsify(model, policy="static", sparsity=0.5)
    assert list(model[0].state_dict()) == dense_keys


def test_state_dict_loads_strictly_into_a_plain_model() -> None:
    model = cnn().eval()
    st.sparsify(model, policy="static", sparsity=0.7)
    plain = cnn().eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    x, _ = batch(model)
    assert torch.equal(plain(x), model(x))


def test_dense_checkpoint_is_masked_before_use() -> None:
    dense = mlp()
    model = mlp()
    sparsifier = st.sparsify(model, policy="static", sparsity=0.8)
    masks = {k: m.clone() for k, m in sparsifier.masks.items()}
    model.load_state_dict(dense.state_dict())
    assert all(torch.equal(sparsifier.masks[k], m) for k, m in masks.items())
    x, _ = batch(model)
    out = model(x)
    for fqn, mask in masks.items():
        stored = sparsifier.topology.params[fqn]
        assert torch.all(stored[~mask] == 0)
        assert torch.equal(stored[mask], dense.state_dict()[fqn][mask])
    for fqn in masks:
        with torch.no_grad():
            dense.get_parameter(fqn).mul_(masks[fqn])
    assert torch.equal(out, dense(x))


def test_state_dict_of_a_model_loaded_from_a_dense_checkpoint_is_masked() -> None:
    model = mlp()
    sparsifier = st.sparsify(model, policy="static", sparsity=0.8)
    model.load_state_dict(mlp().state_dict())
    state = model.state_dict()
    for fqn, mask in sparsifier.masks.items():
        assert torch.all(state[fqn][~mask] == 0)


def test_sparsify_keeps_parameter_identity() -> None:
    model = cnn()
    before = [id(p) for p in model.parameters()]
    st.sparsify(model, policy="static")
    assert sorted(id(p) for p in model.parameters()) == sorted(before)


def test_remove_leaves_a_plain_model_with_zeros() -> None:
    model = cnn()
    dense_keys = list(model.state_dict())
    ids = {id(p) for p in model.parameters()}
    sparsifier = st.sparsify(model, policy="static", sparsity=0.6)
    masks = {k: m.clone() for k, m in sparsifier.masks.items()}
    sparsifier.remove()
    assert [type(m) for m in model] == [type(m) for m in cnn()]
    assert {id(p) for p in model.parameters()} == ids
    assert list(model.state_dict()) == dense_keys
    assert [name for name, _ in model.named_parameters()] == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "3.weight",
        "3.bias",
        "6.weight",
        "6.bias",
    ]
    for fqn, mask in masks.items():
        assert torch.equal(model.get_parameter(fqn) != 0, mask)
    x, y = batch(model)
    nn.functional.cross_entropy(model(x), y).backward()
    grad = model.get_parameter("0.weight").grad
    assert grad is not None and bool(torch.any(grad[~masks["0.weight"]] != 0))
