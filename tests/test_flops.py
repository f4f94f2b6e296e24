"""FLOPs accounting (sparsetorch/flops.py) against hand-computed values.

Conventions (Evci et al. 2020, appendix on FLOPs): FLOPs per example, one
multiply-add = 2 FLOPs; a forward pass costs f_S (sparse) or f_D (dense); a
training step costs 3 f_S, or 2 f_S + f_D when its backward pass keeps the dense
weight gradient.

The two-layer MLP used below, ``Linear(10, 20) -> ReLU -> Linear(20, 5)`` with
sparsities {fc1: 0.75, fc2: 0.5}:

    fc1: 200 weights, 50 active; fc2: 100 weights, 50 active
    f_D = 2 * (200 + 100) = 600        f_S = 2 * (50 + 50) = 200

The conv net, ``Conv2d(3, 8, 3, padding=1) -> ReLU -> Conv2d(8, 4, 3, stride=2,
padding=1) -> Flatten -> Linear(36, 5)`` on 3x6x6 inputs:

    conv1: 216 weights, 6*6 = 36 output positions, sparsity 0.75 -> 54 active
    conv2: 288 weights, 3*3 = 9 output positions, sparsity 0.5 -> 144 active
    fc:    180 weights, 1 position, sparsity 0.5 -> 90 active
    f_D = 2 * (36*216 + 9*288 + 180) = 2 * 10548 = 21096
    f_S = 2 * (36*54 + 9*144 + 90)   = 2 * 3330  = 6660
"""

from __future__ import annotations

import pytest
import torch
from expecttest import assert_expected_inline
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import sparsetorch as st
from sparsetorch.flops import FlopsReport

MLP_SPARSITY = {"0.weight": 0.75, "2.weight": 0.5}
CNN_SPARSITY = {"0.weight": 0.75, "2.weight": 0.5, "5.weight": 0.5}


def mlp2() -> nn.Sequential:
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))


def cnn2() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(36, 5),
    )


def mlp_report(policy: str | st.Policy = "static", **kwargs: object) -> FlopsReport:
    sparsifier = st.sparsify(mlp2(), policy=policy, distribution=MLP_SPARSITY, **kwargs)  # type: ignore[arg-type]
    return sparsifier.flops(torch.randn(4, 10))


# -- inference ----------------------------------------------------------------------


def test_mlp_inference_flops_per_layer_and_total() -> None:
    report = mlp_report()
    assert [(x.name, x.kind, x.tensor) for x in report.layers] == [
        ("0.weight", "Linear", "0.weight"),
        ("2.weight", "Linear", "2.weight"),
    ]
    assert [(x.inference, x.dense_inference) for x in report.layers] == [
        (100.0, 400.0),
        (100.0, 200.0),
    ]
    assert (report.inference_flops, report.dense_inference_flops) == (200.0, 600.0)
    assert report.inference_ratio == 200 / 600
    assert report.batch_size == 4


def test_conv_inference_flops() -> None:
    sparsifier = st.sparsify(cnn2(), policy="static", distribution=CNN_SPARSITY)
    report = sparsifier.flops(torch.randn(2, 3, 6, 6))
    assert [(x.kind, x.positions, x.active) for x in report.layers] == [
        ("Conv2d", 36.0, 54),
        ("Conv2d", 9.0, 144),
        ("Linear", 1.0, 90),
    ]
    assert (report.inference_flops, report.dense_inference_flops) == (6660.0, 21096.0)
    assert report.inference_ratio == 6660 / 21096


def test_dense_flops_match_torch_flop_counter_for_every_layer_type() -> None:
    """The dense counts equal torch's own FLOP counter (2 FLOPs per multiply-add)."""
    from transformers.pytorch_utils import Conv1D

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv1d(2, 4, 3, padding=1)
            self.c2 = nn.Conv2d(4, 6, 3, stride=2, groups=2)
            self.c3 = nn.Conv3d(1, 2, (1, 2, 2))
            self.t1 = nn.ConvTranspose1d(4, 2, 2, stride=2)
            self.t2 = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2)
            self.t3 = nn.ConvTranspose3d(2, 1, 2)
            self.lin = nn.Linear(7, 3)  # on a (batch, 5, 7) input: 5 positions
            self.gpt = Conv1D(4, 7)  # GPT-2's layer: weight (in=7, out=4)

        def forward(self, x: Tensor) -> Tensor:
            a = self.t1(self.c1(x[:, :2, 0, :8]))  # (n, 2, 16)
            b = self.t2(self.c2(x[:, :4]))  # (n, 4, 6, 6)
            c = self.t3(self.c3(x[:, :1].unsqueeze(1)))  # (n, 1, 2, 8, 8)
            d = self.lin(x[:, 0, :5, :7]) + self.gpt(x[:, 1, :5, :7].contiguous()).sum()
            return a.sum() + b.sum() + c.sum() + d.sum()

    x = torch.randn(3, 4, 13, 13)
    with FlopCounterMode(display=False) as counter:
        Net()(x)
    expected = {
        name.removeprefix("Net.") + ".weight": sum(ops.values())
        for name, ops in counter.get_flop_counts().items()
        if name.startswith("Net.")
    }
    sparsifier = st.sparsify(Net(), policy="static", sparsity=0.5)
    report = sparsifier.flops(x)
    assert report.batch_size == 3
    assert {x.name: x.dense_inference * 3 for x in report.layers} == expected
    assert [x.kind for x in report.layers] == [
        "Conv1d",
        "Conv2d",
        "Conv3d",
        "ConvTranspose1d",
        "ConvTranspose2d",
        "ConvTranspose3d",
        "Linear",
        "Conv1D",
    ]
    for layer in report.layers:  # sparse: the same positions times the active count
        assert layer.inference == layer.dense_inference * layer.active / layer.numel


def test_unmasked_layers_count_dense() -> None:
    sparsifier = st.sparsify(
        mlp2(), policy="static", distribution={"0.weight": 0.75}, include=["0.weight"]
    )
    report = sparsifier.flops(torch.randn(4, 10), total_steps=10)
    assert [(x.tensor, x.active, x.inference) for x in report.layers] == [
        ("0.weight", 50, 100.0),
        (None, 100, 200.0),
    ]
    assert report.inference_ratio == 300 / 600
    assert report.training_flops == 3 * 300 * 10


def test_masked_tensor_outside_counted_layers_is_listed() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    sparsifier = st.sparsify(
        model, policy="static", sparsity=0.5, include=["0.weight", "1.weight"]
    )
    report = sparsifier.flops(torch.tensor([[1, 2, 3]]))
    assert report.uncounted == ("0.weight",)
    assert str(report).splitlines()[-1] == (
        "not counted: 0.weight (not a Linear, Conv or attention weight)"
    )


# -- training, by policy -------------------------------------------------------------


def test_dense_training_is_three_dense_forwards_per_step() -> None:
    sparsifier = st.sparsify(mlp2(), policy="static", sparsity=0.0)
    report = sparsifier.flops(torch.randn(4, 10), total_steps=100)
    # 3 f_D per step: 3 * 600 * 100
    assert report.training_flops == report.dense_training_flops == 180_000
    assert (report.inference_ratio, report.training_ratio) == (1.0, 1.0)


def test_static_and_set_training_is_three_sparse_forwards_per_step() -> None:
    static = mlp_report("static", total_steps=100)
    set_ = mlp_report("set", total_steps=100, update_interval=10)
    for report in (static, set_):
        # 3 f_S per step: 3 * 200 * 100; dense: 3 * 600 * 100
        assert (report.training_flops, report.dense_training_flops) == (
            60_000,
            180_000,
        )
        assert report.training_ratio == 1 / 3
        assert report.dense_grad_steps == 0


def test_rigl_keeps_the_dense_gradient_once_per_update() -> None:
    report = mlp_report("rigl", total_steps=100, update_interval=10)
    # end_step = 75: updates after steps 10, 20, ..., 70 (7), each step's backward
    # computes the dense weight gradient: 7 * (2 f_S + f_D) + 93 * 3 f_S
    # = 3 * 200 * 100 + 7 * (600 - 200) = 62_800
    assert report.dense_grad_steps == 7
    assert report.training_flops == 62_800
    assert report.training_ratio == 62_800 / 180_000
    # per layer: fc1 3 * 100 * 100 + 7 * 300; fc2 3 * 100 * 100 + 7 * 100
    assert [x.training for x in report.layers] == [32_100, 30_700]


def test_rigl_with_a_longer_schedule_is_more_steps() -> None:
    """The paper's "RigL 2x": the same recipe over twice the steps."""
    report = mlp_report("rigl", total_steps=200, update_interval=10)
    # end_step = 150: 14 updates; 3 * 200 * 200 + 14 * 400 = 125_600
    assert (report.dense_grad_steps, report.training_flops) == (14, 125_600)
    assert report.dense_training_flops == 360_000


def test_rigl_over_gradient_accumulation_keeps_it_for_each_accumulated_step() -> None:
    sparsifier = st.sparsify(
        mlp2(), policy="rigl", distribution=MLP_SPARSITY, total_steps=100,
        update_interval=10,
    )  # fmt: skip
    sparsifier.capture_steps = 2  # RigLScheduler(grad_accumulation_n=2)
    report = sparsifier.flops(torch.randn(4, 10))
    # steps 9-10, 19-20, ..., 69-70: 14; 60_000 + 14 * 400
    assert (report.dense_grad_steps, report.training_flops) == (14, 65_600)


def test_snfs_keeps_the_dense_gradient_at_every_step_until_the_last_update() -> None:
    report = mlp_report("snfs", total_steps=100, update_interval=10)
    # updates after 10, ..., 70; steps 1-70 cost 2 f_S + f_D, steps 71-100 3 f_S:
    # 70 * (400 + 600) + 30 * 600 = 3 * 200 * 100 + 70 * 400 = 88_000
    assert (report.dense_grad_steps, report.training_flops) == (70, 88_000)


def test_gmp_training_follows_the_density_schedule_from_dense() -> None:
    sparsifier = st.sparsify(
        mlp2(), policy="gmp", sparsity=0.9, distribution="uniform", end_step=31,
        update_interval=10,
    )  # fmt: skip
    report = sparsifier.flops(torch.randn(4, 10), total_steps=40)
    # Zhu & Gupta's cubic schedule to 90% over the prunings after steps 10, 20, 30:
    # density 1 - 0.9 * (1 - (1 - t / 30)^3) = 0.3667, 0.1333, 0.1 at t = 10, 20, 30
    counts = [sparsifier.targets_at(k) for k in (0, 10, 20, 30)]
    assert [(c["0.weight"], c["2.weight"]) for c in counts] == [
        (200, 100),
        (73, 37),
        (27, 13),
        (20, 10),
    ]
    # steps 1-10 dense: 10 * 3 * 600; 11-20: 10 * 3 * 2 * (73 + 37);
    # 21-30: 10 * 3 * 2 * (27 + 13); 31-40: 10 * 3 * 2 * (20 + 10)
    assert report.training_flops == 18_000 + 6_600 + 2_400 + 1_800
    assert report.training_ratio == 28_800 / 72_000
    assert report.dense_grad_steps == 0
    assert report.inference_ratio == 60 / 600  # the final masks


def test_conv_training_flops() -> None:
    sparsifier = st.sparsify(
        cnn2(), policy="rigl", distribution=CNN_SPARSITY, total_steps=40,
        update_interval=5,
    )  # fmt: skip
    report = sparsifier.flops(torch.randn(2, 3, 6, 6))
    # end_step = 30: updates after 5, ..., 25 (5); 3 * 6660 * 40 + 5 * (21096 - 6660)
    assert report.training_flops == 799_200 + 72_180
    assert report.training_ratio == 871_380 / (3 * 21096 * 40)


# -- recording the sizes -------------------------------------------------------------


def hook_counts(model: nn.Module, names: list[str]) -> list[tuple[int, int]]:
    """Forward hooks and pre-hooks on the modules ``names`` (the model's own)."""
    modules = dict(model.named_modules())
    return [
        (len(modules[n]._forward_hooks), len(modules[n]._forward_pre_hooks))
        for n in names
    ]


def test_the_training_forward_after_the_first_step_is_recorded_then_unhooked() -> None:
    model = mlp2()
    names = [name for name, _ in model.named_modules()]
    before = hook_counts(model, names)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = st.sparsify(
        model, optimizer, policy="static", distribution=MLP_SPARSITY
    )
    assert hook_counts(model, names) == before  # no hooks before training
    model(torch.randn(3, 10)).sum().backward()
    optimizer.step()  # from here, the next training forward is recorded
    assert hook_counts(model, names) == [(1, 1), (1, 0), (0, 0), (1, 0)]
    with pytest.raises(RuntimeError, match="none was recorded yet"):
        sparsifier.flops()
    model.eval()
    model(torch.randn(5, 10))  # eval: not recorded
    model.train()
    model(torch.randn(6, 10)).sum().backward()
    assert hook_counts(model, names) == before
    optimizer.step()
    report = sparsifier.flops(total_steps=10)
    assert (report.batch_size, report.inference_flops) == (6, 200.0)


def test_hooks_are_removed_after_a_step_without_a_recorded_forward() -> None:
    """A compiled model does not run them: they are gone one step later."""
    model = mlp2()
    names = [name for name, _ in model.named_modules()]
    before = hook_counts(model, names)
    sparsifier = st.sparsify(model, policy="static", distribution=MLP_SPARSITY)
    sparsifier.step()
    assert hook_counts(model, names) != before
    sparsifier.step()
    assert hook_counts(model, names) == before
    sparsifier.step()
    model(torch.randn(6, 10))
    assert hook_counts(model, names) == before
    with pytest.raises(RuntimeError, match="none was recorded yet"):
        sparsifier.flops()
    assert sparsifier.flops(torch.randn(2, 10)).inference_flops == 200.0


def test_transformer_inference_fast_path_is_kept() -> None:
    """Modules with forward hooks lose nn.TransformerEncoderLayer's fused path."""
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True).eval()
    sparsifier = st.sparsify(layer, policy="static", sparsity=0.5)
    assert all(not m._forward_hooks for m in layer.modules())
    report = sparsifier.flops(torch.randn(2, 5, 16))  # 5 positions per example
    assert [(x.name, x.positions) for x in report.layers] == [
        ("self_attn.in_proj_weight", 5.0),
        ("self_attn.out_proj.weight", 5.0),
        ("linear1.weight", 5.0),
        ("linear2.weight", 5.0),
    ]
    # 5 tokens * (48*16 in_proj + 16*16 out_proj + 2 * 32*16 feed-forward) MACs
    assert report.dense_inference_flops == 2 * 5 * (768 + 256 + 1024)
    assert all(not m._forward_hooks for m in layer.modules())


def test_cross_attention_counts_each_projection_block_per_token() -> None:
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: Tensor, memory: Tensor) -> Tensor:
            return self.attn(x, memory, memory, need_weights=False)[0]

    model = Cross()
    sparsifier = st.sparsify(
        model,
        policy="static",
        sparsity=0.5,
        include=["attn.in_proj_weight", "attn.out_proj.weight"],
    )
    report = sparsifier.flops((torch.randn(2, 3, 8), torch.randn(2, 5, 8)))
    in_proj, out_proj = sparsifier.masks.values()
    q, k, v = (int(in_proj[i : i + 8].sum()) for i in (0, 8, 16))
    # query block per query token (3), key and value blocks per memory token (5)
    assert [(x.name, x.inference, x.dense_inference) for x in report.layers] == [
        ("attn.in_proj_weight", 2 * (3 * q + 5 * k + 5 * v), 2 * 64 * (3 + 5 + 5)),
        ("attn.out_proj.weight", 2 * 3 * int(out_proj.sum()), 2 * 64 * 3),
    ]


def test_example_input_leaves_modes_and_batch_norm_statistics_unchanged() -> None:
    model = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    model[2].eval()  # a layer in eval mode inside a training model
    sparsifier = st.sparsify(model, policy="static", sparsity=0.5)
    stats = [t.clone() for t in model[1].buffers()]
    report = sparsifier.flops({"input": torch.randn(5, 10)})
    assert [model.training, *(m.training for m in model)] == [True, True, True, False]
    assert all(
        torch.equal(a, b) for a, b in zip(stats, model[1].buffers(), strict=True)
    )
    assert report.batch_size == 5
    # the example's sizes stand: no training forward is recorded any more
    assert hook_counts(model, ["", "0", "1", "2"]) == [(0, 0)] * 4


def test_flops_without_a_forward_names_the_fix() -> None:
    sparsifier = st.sparsify(mlp2(), policy="static")
    with pytest.raises(RuntimeError) as info:
        sparsifier.flops()
    assert_expected_inline(
        str(info.value),
        """\
sparsifier.flops() needs the layer sizes of one forward pass, and none was recorded yet (sparsetorch records the first forward in training mode after the first optimizer step, unless compiled).
Pass an input: sparsifier.flops(example_input=x), or call it after the first training step.""",
    )


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_total_steps_raise(bad: int) -> None:
    sparsifier = st.sparsify(mlp2(), policy="static")
    with pytest.raises(ValueError, match=f"total_steps must be >= 1, got {bad}"):
        sparsifier.flops(torch.randn(1, 10), total_steps=bad)
    with pytest.raises(TypeError, match="total_steps must be an int"):
        sparsifier.flops(torch.randn(1, 10), total_steps=2.5)  # type: ignore[arg-type]


def test_run_length_comes_from_sparsify_and_set_total_steps() -> None:
    sparsifier = st.sparsify(mlp2(), policy="static", distribution=MLP_SPARSITY)
    report = sparsifier.flops(torch.randn(4, 10))
    assert (report.total_steps, report.training_flops, report.training_ratio) == (
        None,
        None,
        None,
    )
    sparsifier.set_total_steps(50)
    assert sparsifier.flops().training_flops == 3 * 200 * 50


# -- display -------------------------------------------------------------------------


def test_report_table() -> None:
    report = mlp_report("rigl", total_steps=100, update_interval=10)
    assert_expected_inline(
        str(report),
        """\
RigL, 100 steps (7 with a dense weight gradient), FLOPs per example
weight    type    density   inference  x dense    training  x dense
0.weight  Linear   0.2500  1.0000e+02   0.2500  3.2100e+04   0.2675
2.weight  Linear   0.5000  1.0000e+02   0.5000  3.0700e+04   0.5117
total              0.3333  2.0000e+02   0.3333  6.2800e+04   0.3489""",
    )


def test_summary_shows_flops_once_asked() -> None:
    sparsifier = st.sparsify(
        mlp2(), policy="rigl", distribution=MLP_SPARSITY, total_steps=100,
        update_interval=10,
    )  # fmt: skip
    assert "FLOPs" not in sparsifier.summary()
    sparsifier.flops(torch.randn(4, 10))
    assert_expected_inline(
        sparsifier.summary().splitlines()[-1],
        """FLOPs per example: inference 200 (0.3333x dense), training 6.28e+04 (0.3489x dense) over 100 steps""",
    )
