"""Property-based tests: random models, settings and runs keep every invariant.

Hypothesis draws a small model (a random stack of Linear or Conv2d layers of
random shapes), a sparsity in ``[0, 0.99]``, a distribution, a policy, an
optimizer and a schedule, then trains it. After every step: exact active counts,
zeros outside every mask in the stored weight, the effective weight and every
optimizer state tensor, masks changing only at update steps with as many weights
grown as dropped, and the dense ``state_dict`` keys. Midway the model, optimizer
and sparsifier state dicts go through ``torch.save`` / ``torch.load(...,
weights_only=True)`` into fresh objects (loaded in a random order), and the
resumed run must end bit-identical to the uninterrupted one.

Profiles (``SPARSETORCH_HYPOTHESIS_PROFILE``): ``ci`` (default: 200 examples,
derandomized, so CI runs the same examples every time) and ``thorough`` (2000
random examples, for a local bug hunt).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import torch
from conftest import check_invariants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from torch import Tensor, nn

import sparsetorch as st

_HEALTH = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile(
    "sparsetorch-ci",
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=_HEALTH,
)
settings.register_profile(
    "sparsetorch-thorough",
    max_examples=2000,
    deadline=None,
    print_blob=True,
    suppress_health_check=_HEALTH,
)
PROFILE = settings.get_profile(
    "sparsetorch-" + os.environ.get("SPARSETORCH_HYPOTHESIS_PROFILE", "ci")
)


@dataclass(frozen=True)
class Case:
    """One drawn example."""

    kind: str  # "mlp" or "cnn"
    widths: tuple[int, ...]  # features (mlp) or channels (cnn), input first
    kernels: tuple[int, ...]  # cnn only
    size: int  # cnn image side
    sparsity: float
    distribution: str
    policy: str
    optimizer: str
    update_interval: int
    total_steps: int
    drop_fraction: float
    drop_schedule: str
    grow_init: str | float
    seed: int
    save_at: int
    load_order: tuple[str, ...]
    structure: str | None = None

    def model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        layers: list[nn.Module] = []
        pairs = list(zip(self.widths[:-1], self.widths[1:], strict=True))
        if self.kind == "mlp":
            for i, (n_in, n_out) in enumerate(pairs):
                layers += [nn.Linear(n_in, n_out, bias=i % 2 == 0), nn.Tanh()]
        else:
            for (c_in, c_out), k in zip(pairs, self.kernels, strict=True):
                layers += [nn.Conv2d(c_in, c_out, k, padding=k // 2), nn.Tanh()]
            layers += [nn.Flatten(), nn.Linear(self.widths[-1] * self.size**2, 3)]
        return nn.Sequential(*layers)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(
                model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3
            )
        return torch.optim.AdamW(model.parameters(), lr=1e-2)

    def sparsify(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, seed: int
    ) -> st.Sparsifier:
        sparsifier = st.sparsify(
            model,
            optimizer,
            policy=self.policy,
            sparsity=self.sparsity,
            distribution=self.distribution,
            total_steps=self.total_steps,
            update_interval=self.update_interval,
            drop_fraction=self.drop_fraction,
            drop_schedule=self.drop_schedule,
            grow_init=self.grow_init,
            seed=seed,
            structure=self.structure,
        )
        if self.policy == "snip":  # its masks come from one batch
            loss = lambda x: model(x).square().mean()  # noqa: E731
            sparsifier.prune_at_init(loss, [self.batch(0)])
        return sparsifier

    def batch(self, step: int) -> Tensor:
        """The input of optimizer step ``step`` (the same in every run)."""
        g = torch.Generator().manual_seed(1000 * self.seed + step)
        if self.kind == "mlp":
            return torch.randn(4, self.widths[0], generator=g)
        return torch.randn(2, self.widths[0], self.size, self.size, generator=g)


@hs.composite
def cases(draw: hs.DrawFn) -> Case:
    kind = draw(hs.sampled_from(["mlp", "cnn"]))
    depth = draw(hs.integers(1, 3))
    top = 12 if kind == "mlp" else 5
    widths = tuple(
        draw(hs.lists(hs.integers(1, top), min_size=depth + 1, max_size=depth + 1))
    )
    kernels = tuple(
        draw(hs.lists(hs.sampled_from([1, 3]), min_size=depth, max_size=depth))
    )
    total_steps = draw(hs.integers(2, 14))
    policy = draw(hs.sampled_from(["rigl", "set", "static", "snfs", "gmp", "snip"]))
    return Case(
        kind=kind,
        widths=widths,
        kernels=kernels,
        size=draw(hs.integers(2, 4)),
        sparsity=draw(hs.floats(0.0, 0.99)),
        distribution=draw(hs.sampled_from(["uniform", "er", "erk"])),
        policy=policy,
        optimizer=draw(hs.sampled_from(["sgd", "adamw"])),
        update_interval=draw(hs.integers(1, 4)),
        total_steps=total_steps,
        drop_fraction=draw(hs.floats(0.0, 1.0)),
        drop_schedule=draw(hs.sampled_from(["cosine", "linear", "constant"])),
        grow_init=draw(hs.sampled_from(["zeros", 0.01])),
        seed=draw(hs.integers(0, 2**16)),
        save_at=draw(hs.integers(1, total_steps - 1)),
        load_order=tuple(draw(hs.permutations(["model", "optimizer", "sparsity"]))),
        # SNFS, GMP and SNIP refuse a structure (their counts move).
        structure=None
        if policy in ("snfs", "gmp", "snip")
        else draw(hs.sampled_from([None, None, "constant-fan-in"])),
    )


def train(
    case: Case,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsifier: st.Sparsifier,
    steps: range,
    dense_keys: list[str],
) -> None:
    """Train ``steps`` (1-based optimizer steps), checking after every one."""
    for k in steps:
        before = {fqn: m.clone() for fqn, m in sparsifier.masks.items()}
        updates = sparsifier.update_count
        optimizer.zero_grad()
        model(case.batch(k)).square().mean().backward()
        optimizer.step()
        assert sparsifier.step_count == k
        check_invariants(sparsifier, optimizer, model=model, dense_keys=dense_keys)
        scheduled = case.policy not in ("static", "snip") and (
            sparsifier.schedule.is_update_step(k)
        )
        assert sparsifier.update_count == updates + scheduled
        for fqn, mask in sparsifier.masks.items():
            grown = int((mask & ~before[fqn]).sum())
            dropped = int((before[fqn] & ~mask).sum())
            if case.policy == "gmp":  # prunes only
                assert grown == 0, fqn
            elif case.policy != "snfs":  # SNFS: equal over all tensors (below)
                assert grown == dropped, fqn
            if not scheduled:
                assert grown == dropped == 0, fqn
        if case.policy == "snfs":
            assert sum(sparsifier.topology.targets.values()) == sum(
                int(m.sum()) for m in before.values()
            )


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded


def bits(t: Tensor) -> Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8)


def same(a: object, b: object) -> bool:
    """Bit-exact equality of nested state dicts."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return (
            a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@settings(PROFILE)
@given(case=cases())
def test_random_runs_keep_the_invariants_and_resume_bit_exactly(case: Case) -> None:
    model = case.model()
    dense_keys = list(model.state_dict())
    optimizer = case.make_optimizer(model)
    sparsifier = case.sparsify(model, optimizer, seed=case.seed)
    check_invariants(sparsifier, optimizer, model=model, dense_keys=dense_keys)
    train(case, model, optimizer, sparsifier, range(1, case.save_at + 1), dense_keys)
    saved = roundtrip(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "sparsity": sparsifier.state_dict(),
        }
    )
    assert saved["sparsity"]["format_version"] == 2
    train(
        case,
        model,
        optimizer,
        sparsifier,
        range(case.save_at + 1, case.total_steps + 1),
        dense_keys,
    )

    # Fresh objects, other initial weights and masks, then the checkpoint.
    torch.manual_seed(case.seed + 1)
    resumed = case.model()
    resumed_optimizer = case.make_optimizer(resumed)
    resumed_sparsifier = case.sparsify(resumed, resumed_optimizer, seed=case.seed + 1)
    loaders = {
        "model": resumed.load_state_dict,
        "optimizer": resumed_optimizer.load_state_dict,
        "sparsity": resumed_sparsifier.load_state_dict,
    }
    for name in case.load_order:
        loaders[name](saved[name])
    assert resumed_sparsifier.step_count == case.save_at
    train(
        case,
        resumed,
        resumed_optimizer,
        resumed_sparsifier,
        range(case.save_at + 1, case.total_steps + 1),
        dense_keys,
    )
    assert same(resumed.state_dict(), model.state_dict())
    assert same(resumed_optimizer.state_dict(), optimizer.state_dict())
    assert same(resumed_sparsifier.state_dict(), sparsifier.state_dict())


# -- lifecycles: any torch.optim optimizer, manual or hooked stepping, warm starts,
# -- tensors that get no gradient ---------------------------------------------------

#: ``name -> (builder, {state key: values allowed outside the mask})``. Every
#: other state tensor of a weight's shape must be exactly zero outside its mask.
OPTIMIZERS: dict[str, Any] = {
    "sgd": (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
        {},
    ),
    "nesterov": (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
        {},
    ),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True), {}),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-2), {}),
    "adamax": (lambda ps: torch.optim.Adamax(ps, lr=1e-2), {"exp_inf": (0.0, 1e-8)}),
    "nadam": (lambda ps: torch.optim.NAdam(ps, lr=1e-2), {}),
    "radam": (lambda ps: torch.optim.RAdam(ps, lr=1e-2), {}),
    "adadelta": (lambda ps: torch.optim.Adadelta(ps), {}),
    "adagrad": (
        lambda ps: torch.optim.Adagrad(ps, lr=1e-2, initial_accumulator_value=0.1),
        {"sum": (0.1,)},
    ),
    "asgd": (lambda ps: torch.optim.ASGD(ps, lr=1e-2), {}),
    "rmsprop": (
        lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5, centered=True),
        {},
    ),
    "rprop": (lambda ps: torch.optim.Rprop(ps, lr=1e-2), {"step_size": (1e-2,)}),
}


@dataclass(frozen=True)
class Lifecycle:
    widths: tuple[int, int, int]
    sparsity: float
    policy: str
    optimizer: str
    stepping: str  # "hooked" | "manual" (sparsify(model, None)) | "late" (attach)
    warm: str  # "none" | "before" (dense state loaded before sparsify) | "after"
    warm_order: tuple[str, str]  # model and optimizer state, in this order
    unused: tuple[bool, ...]  # per step: the side branch gets no gradient
    update_interval: int
    seed: int

    def model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return TwoBranch(*self.widths)


class TwoBranch(nn.Module):
    def __init__(self, n_in: int, hidden: int, n_out: int) -> None:
        super().__init__()
        self.inp = nn.Linear(n_in, hidden)
        self.main = nn.Linear(hidden, n_out)
        self.side = nn.Linear(hidden, n_out, bias=False)
        self.use_side = True

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        out = self.main(h)
        return out + self.side(h) if self.use_side else out


@hs.composite
def lifecycles(draw: hs.DrawFn) -> Lifecycle:
    steps = draw(hs.integers(2, 8))
    return Lifecycle(
        widths=(
            draw(hs.integers(1, 8)),
            draw(hs.integers(1, 8)),
            draw(hs.integers(1, 5)),
        ),
        sparsity=draw(hs.floats(0.0, 0.95)),
        policy=draw(hs.sampled_from(["rigl", "set", "static", "snfs", "gmp"])),
        optimizer=draw(hs.sampled_from(sorted(OPTIMIZERS))),
        stepping=draw(hs.sampled_from(["hooked", "manual", "late"])),
        warm=draw(hs.sampled_from(["none", "before", "after"])),
        warm_order=tuple(draw(hs.permutations(["model", "optimizer"]))),  # type: ignore[arg-type]
        unused=tuple(draw(hs.lists(hs.booleans(), min_size=steps, max_size=steps))),
        update_interval=draw(hs.integers(1, 3)),
        seed=draw(hs.integers(0, 2**16)),
    )


def check_state_outside(
    sparsifier: st.Sparsifier, optimizer: torch.optim.Optimizer, allowed: dict[str, Any]
) -> None:
    """Zeros (or the optimizer's documented values) outside every mask."""
    model = sparsifier.topology.model
    for fqn, mask in sparsifier.masks.items():
        param = sparsifier.topology.params[fqn]
        # Read through the parametrization, as the forward does: a model state
        # dict loaded since the last forward is masked then (the stored tensor
        # waits, see docs/reliability.md); after a step the stored one is masked.
        weight = model.get_submodule(fqn.rpartition(".")[0]).weight
        assert int(weight[~mask].count_nonzero()) == 0, (fqn, "weight")
        assert int(param[~mask].count_nonzero()) == 0, (fqn, "stored weight")
        for key, state in optimizer.state[param].items():
            if isinstance(state, Tensor) and state.shape == param.shape:
                values = state[~mask]
                ok = torch.zeros_like(values, dtype=torch.bool)
                for value in allowed.get(key, (0.0,)):
                    ok |= values == value
                assert bool(ok.all()), (fqn, key, values[~ok][:4])


@settings(PROFILE)
@given(case=lifecycles())
def test_random_lifecycles_keep_the_masks_in_weights_and_optimizer_state(
    case: Lifecycle,
) -> None:
    build, allowed = OPTIMIZERS[case.optimizer]
    g = torch.Generator().manual_seed(case.seed)
    xs = [torch.randn(3, case.widths[0], generator=g) for _ in case.unused]

    def step(model: TwoBranch, optimizer: torch.optim.Optimizer, x: Tensor) -> None:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    dense: dict[str, Any] = {}
    if case.warm != "none":  # a short dense run to start from
        teacher = case.model()
        teacher_optimizer = build(teacher.parameters())
        for x in xs[:2]:
            step(teacher, teacher_optimizer, x)
        dense = {
            "model": teacher.state_dict(),
            "optimizer": teacher_optimizer.state_dict(),
        }

    torch.manual_seed(case.seed + 1)
    model = TwoBranch(*case.widths)
    optimizer = build(model.parameters()) if case.stepping != "late" else None

    def warm_start(optimizer: torch.optim.Optimizer) -> None:
        for what in case.warm_order:
            target = model if what == "model" else optimizer
            target.load_state_dict(dense[what])

    if case.warm == "before" and optimizer is not None:
        warm_start(optimizer)
    sparsifier = st.sparsify(
        model,
        optimizer if case.stepping == "hooked" else None,
        policy=case.policy,
        sparsity=case.sparsity,
        distribution="uniform",
        total_steps=1000,
        update_interval=case.update_interval,
        drop_fraction=0.5,
        seed=case.seed,
    )
    if optimizer is None:
        optimizer = build(model.parameters())  # built after sparsify
        sparsifier.attach_optimizer(optimizer)
    if case.warm == "after" or (case.warm == "before" and case.stepping == "late"):
        warm_start(optimizer)
    if case.stepping != "manual":  # else attached at its first step, before it
        check_state_outside(sparsifier, optimizer, allowed)
    for k, (x, unused) in enumerate(zip(xs, case.unused, strict=True), start=1):
        side = sparsifier.masks["side.weight"].clone()
        model.use_side = not unused
        step(model, optimizer, x)
        if case.stepping == "manual":
            sparsifier.step()
        assert sparsifier.step_count == k
        check_state_outside(sparsifier, optimizer, allowed)
        for fqn, mask in sparsifier.masks.items():
            assert int(mask.sum()) == sparsifier.topology.targets[fqn]
        if unused and case.policy == "rigl":
            assert torch.equal(sparsifier.masks["side.weight"], side)
    updates = sum(sparsifier.schedule.is_update_step(k) for k in range(1, len(xs) + 1))
    assert sparsifier.update_count == (0 if case.policy == "static" else updates)
