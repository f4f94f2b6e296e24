"""Every ordinary architecture trains with RigL and keeps the invariants of DESIGN.md.

Each model trains a few steps with ``update_interval=2`` (five updates) and after
every step: exact active counts, zeros outside every mask in the stored weight,
the weight the module computes with, and every optimizer state tensor; the dense
``state_dict`` keys in their order.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch
from conftest import check_invariants, cnn, effective, mlp
from expecttest import assert_expected_inline
from torch import Tensor, nn

import sparsetorch as st

STEPS = 12  # updates after steps 2, 4, 6, 8, 10 (end_step = 0.75 * 16 = 12)
UPDATES = 5


def train(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    inputs: Callable[[torch.Generator], Any],
    *,
    sparsity: float = 0.8,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    policy: str | st.Policy = "rigl",
) -> tuple[st.Sparsifier, torch.optim.Optimizer]:
    """Sparsify, train ``STEPS`` steps, check the invariants after every step."""
    dense_keys = list(model.state_dict())
    optimizer = make_optimizer(model)
    sparsifier = st.sparsify(
        model,
        optimizer,
        policy=policy,
        sparsity=sparsity,
        total_steps=16,
        update_interval=2,
        include=include,
        exclude=exclude,
    )
    initial = {fqn: m.clone() for fqn, m in sparsifier.masks.items()}
    check_invariants(sparsifier, optimizer, model=model, dense_keys=dense_keys)
    data = torch.Generator().manual_seed(7)
    for _ in range(STEPS):
        optimizer.zero_grad()
        out = model(inputs(data))
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()
        optimizer.step()
        check_invariants(sparsifier, optimizer, model=model, dense_keys=dense_keys)
    assert sparsifier.update_count == UPDATES
    assert any(not torch.equal(initial[f], m) for f, m in sparsifier.masks.items())
    return sparsifier, optimizer


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def randn(*shape: int) -> Callable[[torch.Generator], Tensor]:
    return lambda g: torch.randn(shape, generator=g)


def test_mlp() -> None:
    model = mlp()
    sparsifier, _ = train(model, adam, randn(8, 20))
    assert list(sparsifier.masks) == ["0.weight", "2.weight", "4.weight"]


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda m: torch.optim.SGD(
            m.parameters(),
            lr=0.05,
            momentum=0.9,
            nesterov=True,
            weight_decay=1e-3,
            fused=True,
        ),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, foreach=True),
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, fused=True),
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=True),
    ],
    ids=["sgd-fused-nesterov", "sgd-foreach", "adam-fused", "adamw-foreach"],
)
def test_fused_and_foreach_optimizers(
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
) -> None:
    # They update every tensor in one kernel or one list op, not one at a time
    # through the per-parameter path; the masks must hold in their state all the same.
    _, optimizer = train(mlp(), make_optimizer, randn(8, 20))
    state = optimizer.state[next(iter(optimizer.state))]
    assert state  # momentum or moments were created (and checked every step)


def test_print_for_a_model_without_conv() -> None:
    # rigl-torch's RigLScheduler crashes when printed for a model with no conv.
    model = mlp()
    sparsifier = st.sparsify(model, sparsity=0.8, total_steps=16, update_interval=2)
    assert_expected_inline(
        repr(sparsifier),
        """\
Sparsifier(policy=RigL(), step=0, updates=0, next_update=2)
tensor    shape     target  actual     active      numel
0.weight  (32, 20)  0.8353  0.8359        105        640
2.weight  (16, 32)  0.8100  0.8105         97        512
4.weight  (4, 16)   0.3667  0.3594         41         64
total               0.8000  0.8002        243       1216""",
    )


def test_cnn_with_batchnorm_keeps_norms_dense() -> None:
    model = cnn()
    sparsifier, _ = train(model, sgd, randn(4, 3, 8, 8))
    assert list(sparsifier.masks) == ["0.weight", "3.weight", "6.weight"]
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm2d)
    assert st.MaskParametrization not in map(type, bn.modules())
    assert int(bn.num_batches_tracked) == STEPS


def test_grouped_and_depthwise_convolutions() -> None:
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, groups=2),  # grouped: (8, 2, 3, 3)
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: (8, 1, 3, 3)
        nn.Conv2d(8, 16, 1),  # pointwise: (16, 8, 1, 1)
    )
    sparsifier, _ = train(model, sgd, randn(2, 4, 6, 6), sparsity=0.7)
    shapes = {fqn: tuple(m.shape) for fqn, m in sparsifier.masks.items()}
    assert shapes == {
        "0.weight": (8, 2, 3, 3),
        "2.weight": (8, 1, 3, 3),
        "3.weight": (16, 8, 1, 1),
    }


class Conv1d3dTranspose(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3)
        self.t1 = nn.ConvTranspose1d(6, 3, 3, groups=3)
        self.c3 = nn.Conv3d(3, 4, 2)
        self.t2 = nn.ConvTranspose2d(3, 4, 3, stride=2)
        self.t3 = nn.ConvTranspose3d(4, 2, 2)

    def forward(self, x: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        seq, image, volume = x
        a = self.t1(torch.relu(self.c1(seq))).sum()
        b = self.t2(image).sum()
        c = self.t3(torch.relu(self.c3(volume))).sum()
        return a + b + c


def test_conv1d_conv3d_and_transposed_convolutions() -> None:
    model = Conv1d3dTranspose()
    sparsifier, _ = train(
        model,
        adam,
        lambda g: (
            torch.randn(2, 3, 8, generator=g),
            torch.randn(2, 3, 4, 4, generator=g),
            torch.randn(1, 3, 4, 4, 4, generator=g),
        ),
        sparsity=0.6,
    )
    shapes = {fqn: tuple(m.shape) for fqn, m in sparsifier.masks.items()}
    assert shapes == {
        "c1.weight": (6, 3, 3),
        "t1.weight": (6, 1, 3),
        "c3.weight": (4, 3, 2, 2, 2),
        "t2.weight": (3, 4, 3, 3),
        "t3.weight": (4, 2, 2, 2, 2),
    }


# -- attention ---------------------------------------------------------------------


def encoder_layer() -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)


def test_transformer_default_selection_is_out_proj_and_feed_forward() -> None:
    # out_proj is an nn.Linear subclass (selected); in_proj_weight is a bare
    # parameter of nn.MultiheadAttention (opt-in); norms stay dense.
    assert st.select_tensors(encoder_layer()) == [
        "self_attn.out_proj.weight",
        "linear1.weight",
        "linear2.weight",
    ]


def test_transformer_encoder_layer_with_in_proj_weight() -> None:
    model = encoder_layer()
    sparsifier, _ = train(
        model,
        adam,
        randn(2, 5, 16),
        include=["self_attn.in_proj_weight", "*.weight"],
        exclude=["norm*"],
    )
    assert list(sparsifier.masks) == [
        "self_attn.in_proj_weight",
        "self_attn.out_proj.weight",
        "linear1.weight",
        "linear2.weight",
    ]


@contextmanager
def count_calls(name: str) -> Iterator[list[int]]:
    """Count calls to ``torch.<name>`` (a fused fast-path kernel)."""
    original = getattr(torch, name)
    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    setattr(torch, name, counted)
    try:
        yield calls
    finally:
        setattr(torch, name, original)


@pytest.mark.parametrize("mode", ["train", "eval-fast-path"])
def test_attention_reads_in_proj_weight_through_the_mask(mode: str) -> None:
    model = encoder_layer()
    sparsifier = st.sparsify(
        model,
        policy="static",
        sparsity=0.8,
        include=["self_attn.in_proj_weight", "self_attn.out_proj.weight"],
    )
    # A dense checkpoint: loaded into the stored weights, masked before first use.
    dense = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(dense)
    masked = {
        k: v * sparsifier.masks[k] if k in sparsifier.masks else v
        for k, v in dense.items()
    }
    plain = encoder_layer()
    plain.load_state_dict(masked)
    x = torch.randn(2, 5, 16)
    if mode == "train":
        assert torch.equal(model(x), plain(x))
    else:
        model.eval()
        plain.eval()
        with torch.no_grad(), count_calls("_transformer_encoder_layer_fwd") as calls:
            got = model(x)
        assert calls == [1]  # the fused kernel ran, on the masked weights
        with torch.no_grad():
            assert torch.equal(got, plain(x))
    for fqn, mask in sparsifier.masks.items():
        assert torch.all(sparsifier.topology.params[fqn][~mask] == 0)


def test_multihead_attention_fast_path_uses_the_masked_weights() -> None:
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    plain = copy.deepcopy(mha)
    sparsifier = st.sparsify(mha, policy="static", include=["*_weight", "*.weight"])
    assert list(sparsifier.masks) == ["in_proj_weight", "out_proj.weight"]
    with torch.no_grad():
        plain.in_proj_weight.mul_(sparsifier.masks["in_proj_weight"])
        plain.out_proj.weight.mul_(sparsifier.masks["out_proj.weight"])
    mha.eval()
    plain.eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad(), count_calls("_native_multi_head_attention") as calls:
        got, _ = mha(x, x, x, need_weights=False)
    assert calls == [1]
    with torch.no_grad():
        assert torch.equal(got, plain(x, x, x, need_weights=False)[0])


# -- embeddings and recurrent layers ------------------------------------------------


class EmbeddingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.emb(x))  # type: ignore[no-any-return]


def test_embedding_is_opt_in() -> None:
    assert st.select_tensors(EmbeddingModel()) == ["fc.weight"]
    model = EmbeddingModel()
    sparsifier, _ = train(
        model,
        sgd,
        lambda g: torch.randint(0, 20, (16,), generator=g),
        include=["emb.weight", "fc.weight"],
    )
    assert list(sparsifier.masks) == ["emb.weight", "fc.weight"]


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, num_layers=2)
        self.gru = nn.GRU(8, 8, bidirectional=True)
        self.fc = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.gru(self.lstm(x)[0])[0])  # type: ignore[no-any-return]


def test_lstm_and_gru_weights_are_opt_in_and_train_without_warnings() -> None:
    assert st.select_tensors(Recurrent()) == ["fc.weight"]
    model = Recurrent()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no flatten_parameters / cuDNN warning
        sparsifier, _ = train(
            model,
            adam,
            randn(5, 2, 4),
            include=["lstm.weight_*", "gru.weight_*"],
            sparsity=0.7,
        )
    assert list(sparsifier.masks) == [
        "lstm.weight_ih_l0",
        "lstm.weight_hh_l0",
        "lstm.weight_ih_l1",
        "lstm.weight_hh_l1",
        "gru.weight_ih_l0",
        "gru.weight_hh_l0",
        "gru.weight_ih_l0_reverse",
        "gru.weight_hh_l0_reverse",
    ]


def test_lstm_masks_a_dense_checkpoint_before_computing_with_it() -> None:
    # nn.LSTM computes with its _flat_weights list, not through the
    # parametrization; it re-reads the attributes at every forward, which masks.
    model = Recurrent()
    sparsifier = st.sparsify(
        model, policy="static", include=["lstm.weight_*"], sparsity=0.7
    )
    dense = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(dense)
    plain = Recurrent()
    plain.load_state_dict(
        {
            k: v * sparsifier.masks[k] if k in sparsifier.masks else v
            for k, v in dense.items()
        }
    )
    x = torch.randn(5, 2, 4)
    assert torch.equal(model(x), plain(x))
    for fqn, mask in sparsifier.masks.items():
        assert torch.all(effective(model, fqn)[~mask] == 0)


# -- shared weights -----------------------------------------------------------------


class TiedLM(nn.Module):
    """An embedding shared with the output projection (GPT-2 style)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 12, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.fc(self.emb(x))))  # type: ignore[no-any-return]


def tokens(g: torch.Generator) -> Tensor:
    return torch.randint(0, 12, (16,), generator=g)


def test_output_layer_tied_to_an_embedding_stays_dense_by_default() -> None:
    model = TiedLM()
    embedding = model.emb.weight.detach().clone()
    sparsifier = st.sparsify(model, policy="static", sparsity=0.5)
    assert list(sparsifier.masks) == ["fc.weight"]
    assert sparsifier.skipped == {
        "head.weight": "tied to emb.weight, an input embedding"
    }
    assert model.head.weight is model.emb.weight
    assert torch.equal(model.emb.weight, embedding)
    assert sparsifier.summary().splitlines()[-1] == (
        "skipped: head.weight (tied to emb.weight, an input embedding, dense)"
    )


def test_tied_weights_included_one_mask_under_the_linear_name() -> None:
    model = TiedLM()
    sparsifier, _ = train(
        model, sgd, tokens, sparsity=0.5, include=["fc.weight", "head.weight"]
    )
    assert list(sparsifier.masks) == ["fc.weight", "head.weight"]
    assert model.emb.weight is sparsifier.topology.params["head.weight"]
    assert model.head.weight is model.emb.weight
    mask = sparsifier.masks["head.weight"]
    assert torch.all(model.emb.weight[~mask] == 0)


def test_tied_weights_selected_by_both_names_are_counted_once() -> None:
    model = TiedLM()
    sparsifier, _ = train(model, sgd, tokens, sparsity=0.5, include=["*.weight"])
    assert list(sparsifier.masks) == ["emb.weight", "fc.weight"]
    assert_expected_inline(
        sparsifier.summary(),
        """\
tensor      shape    target  actual     active      numel
emb.weight  (12, 8)  0.5370  0.5417         44         96
fc.weight   (8, 8)   0.4444  0.4375         36         64
total                0.5000  0.5000         80        160""",
    )
    state = model.state_dict()
    assert list(state) == ["emb.weight", "fc.weight", "fc.bias", "head.weight"]
    assert torch.equal(state["emb.weight"], state["head.weight"])


def test_tied_weight_is_masked_after_a_dense_load_before_either_user_reads_it() -> None:
    model = TiedLM()
    sparsifier = st.sparsify(
        model, policy="static", sparsity=0.5, include=["fc.weight", "head.weight"]
    )
    mask = sparsifier.masks["head.weight"]
    seen: list[Tensor] = []
    model.emb.register_forward_hook(lambda m, args, out: seen.append(out.detach()))
    model.load_state_dict(
        {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    )
    model(torch.arange(12))
    assert torch.equal(seen[0], mask.float())  # the embedding read the masked rows


def test_sparsifying_the_other_name_of_a_sparsified_tied_weight_raises() -> None:
    model = TiedLM()
    st.sparsify(model, policy="static", sparsity=0.5, include=["head.weight"])
    with pytest.raises(ValueError) as error:
        st.sparsify(model, policy="static", include=["emb.weight"])
    assert_expected_inline(
        str(error.value),
        """'emb.weight' is already sparsified under another name (tied weights): a model can be sparsified once.""",
    )


def test_remove_keeps_the_tie() -> None:
    model = TiedLM()
    sparsifier = st.sparsify(model, policy="static", sparsity=0.5, include=["*.weight"])
    sparsifier.remove()
    assert model.head.weight is model.emb.weight
    assert type(model.emb) is nn.Embedding


@dataclass(frozen=True, kw_only=True)
class RecordingRigL(st.RigL):
    """RigL that records the dense gradients it grows from."""

    needs_grad: ClassVar[bool] = True
    grads: list[Tensor] = field(default_factory=list, compare=False, repr=False)

    def grow_score(
        self,
        weight: Tensor,
        mask: Tensor,
        grad: Tensor | None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        assert grad is not None
        self.grads.append(grad.clone())
        return super().grow_score(weight, mask, grad, generator)


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.fc(x)))  # type: ignore[no-any-return]


def test_layer_used_twice_grows_from_the_summed_dense_gradient() -> None:
    model = Twice()
    policy = RecordingRigL()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = st.sparsify(
        model, optimizer, policy=policy, sparsity=0.5, total_steps=8, update_interval=2
    )
    x = torch.randn(4, 6)
    optimizer.step()  # step 1: no gradients, nothing happens
    # The reference: a plain layer with the same (masked) weights, dense gradient.
    plain = Twice()
    plain.load_state_dict(model.state_dict())
    plain(x).square().sum().backward()
    optimizer.zero_grad()
    model(x).square().sum().backward()
    optimizer.step()  # step 2: update
    assert sparsifier.update_count == 1
    assert len(policy.grads) == 1
    assert plain.fc.weight.grad is not None
    torch.testing.assert_close(policy.grads[0], plain.fc.weight.grad, rtol=0, atol=0)
    assert int(sparsifier.masks["fc.weight"].sum()) == 18


# -- missing weights, closures ------------------------------------------------------


class NoWeight(nn.Linear):
    """A Linear whose weight was deleted: it computes with a low-rank pair."""

    def __init__(self) -> None:
        super().__init__(6, 6)
        del self.weight
        self.register_parameter("weight", None)
        self.a = nn.Parameter(torch.randn(6, 2))
        self.b = nn.Parameter(torch.randn(2, 6))

    def forward(self, x: Tensor) -> Tensor:
        return x @ (self.a @ self.b).T + self.bias


def test_modules_whose_weight_is_none_are_skipped() -> None:
    model = nn.Sequential(
        nn.Linear(6, 6), nn.LayerNorm(6, elementwise_affine=False), NoWeight()
    )
    assert st.select_tensors(model) == ["0.weight"]
    sparsifier, _ = train(model, sgd, randn(4, 6), sparsity=0.5)
    assert list(sparsifier.masks) == ["0.weight"]
    assert model[2].weight is None


def test_optimizer_step_with_a_closure() -> None:
    # rigl-torch's RigLScheduler crashes on optimizer.step(closure).
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dense_keys = list(model.state_dict())
    sparsifier = st.sparsify(
        model, optimizer, sparsity=0.8, total_steps=16, update_interval=2
    )
    x = torch.randn(8, 20)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    for _ in range(STEPS):
        optimizer.step(closure)
        check_invariants(sparsifier, optimizer, model=model, dense_keys=dense_keys)
    assert sparsifier.update_count == UPDATES


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lstm_on_cuda_keeps_the_mask_through_cudnn() -> None:
    # cuDNN computes with a flattened copy of the weights when they are not one
    # contiguous chunk: the result must still be the masked weights'.
    model = Recurrent().cuda()
    plain = copy.deepcopy(model)
    sparsifier, _ = train(
        model,
        adam,
        lambda g: torch.randn(5, 2, 4, generator=g).cuda(),
        include=["lstm.weight_*"],
        sparsity=0.7,
    )
    plain.load_state_dict(model.state_dict())
    x = torch.randn(5, 2, 4, device="cuda")
    torch.testing.assert_close(model(x), plain(x))
    for fqn, mask in sparsifier.masks.items():
        assert torch.all(effective(model, fqn)[~mask] == 0)
