"""The Lightning callback with real Lightning: one line, exact resume, DDP, logging.

The DDP test runs this file as a script (``python test_integration_lightning.py
ddp OUT``): Lightning's ``strategy="ddp"`` launcher starts the second rank by
re-running the script, exactly as it does for users, with 2 CPU processes on gloo.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same, check_invariants, exit_worker
from expecttest import assert_expected_inline
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import sparsetorch as st
from sparsetorch._checkpoint import decode_mask
from sparsetorch.integrations.lightning import SparseTraining

ROOT = Path(__file__).resolve().parent.parent


def test_import_sparsetorch_does_not_import_lightning():
    code = (
        "import sys, sparsetorch, sparsetorch.integrations; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


# -- a tiny module and its data ------------------------------------------------------


class Tiny(pl.LightningModule):
    """12-24-6 MLP; SGD with momentum and a StepLR, or Adam."""

    def __init__(self, optimizer: str = "sgd", seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 6))
        self.optimizer_name = optimizer

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=0.01)
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]


def loader(n: int = 48, batch_size: int = 8) -> DataLoader[tuple[Tensor, ...]]:
    """``n`` fixed examples in a fixed order (no shuffle: resume replays it)."""
    g = torch.Generator().manual_seed(1234)
    data = TensorDataset(
        torch.randn(n, 12, generator=g), torch.randint(0, 6, (n,), generator=g)
    )
    return DataLoader(data, batch_size=batch_size)


def trainer(callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        accelerator="cpu",
        devices=kwargs.pop("devices", 1),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def sparse(**kwargs: Any) -> SparseTraining:
    kwargs.setdefault("sparsity", 0.75)
    kwargs.setdefault("update_interval", 4)
    kwargs.setdefault("drop_schedule", "constant")
    return SparseTraining(**kwargs)


def final_state(
    t: pl.Trainer, module: pl.LightningModule, cb: SparseTraining
) -> dict[str, Any]:
    assert cb.sparsifier is not None
    return {
        "model": module.state_dict(),
        "optimizer": t.optimizers[0].state_dict(),
        "lr_schedulers": [c.scheduler.state_dict() for c in t.lr_scheduler_configs],
        "sparsifier": cb.sparsifier.state_dict(),
        "global_step": t.global_step,
    }


# -- one line --------------------------------------------------------------------------


class InitialMasks(pl.Callback):
    """The masks the run starts from (after a resume: the checkpoint's)."""

    def __init__(self, cb: SparseTraining) -> None:
        self.cb = cb
        self.masks: dict[str, Tensor] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        assert self.cb.sparsifier is not None
        self.masks = {f: m.clone() for f, m in self.cb.sparsifier.masks.items()}


def test_one_line_trains_sparse_with_zeros_outside_the_masks():
    module, cb = Tiny(), sparse()
    initial = InitialMasks(cb)
    dense_keys = list(Tiny().state_dict())
    t = trainer([cb, initial], max_epochs=2)
    t.fit(module, loader())
    sparsifier = cb.sparsifier
    assert sparsifier is not None
    assert sparsifier.topology.model is module
    # 12 steps, end_step = int(0.75 * 12) = 9: updates at steps 4 and 8
    assert (t.global_step, sparsifier.step_count) == (12, 12)
    assert (sparsifier.schedule.end_step, sparsifier.update_count) == (9, 2)
    assert not any(
        torch.equal(initial.masks[f], m) for f, m in sparsifier.masks.items()
    )
    optimizer = t.optimizers[0]
    assert optimizer.state  # momentum exists, and is zero outside the masks
    check_invariants(sparsifier, optimizer, model=module, dense_keys=dense_keys)


def test_checkpoint_has_dense_keys_and_loads_into_a_plain_module(tmp_path: Path):
    module, cb = Tiny(), sparse(update_interval=2)
    t = trainer([cb], max_epochs=1)
    t.fit(module, loader())
    t.save_checkpoint(tmp_path / "run.ckpt")
    checkpoint = torch.load(tmp_path / "run.ckpt", weights_only=True)
    assert list(checkpoint["state_dict"]) == list(Tiny().state_dict())
    assert list(checkpoint["callbacks"]) == ["SparseTraining"]
    plain = Tiny.load_from_checkpoint(tmp_path / "run.ckpt", weights_only=True)
    x = torch.randn(5, 12)
    assert torch.equal(plain(x), module(x))


# -- resume: bit-exact against the uninterrupted run -------------------------------

CASES = {
    "sgd_momentum_steplr": ({"optimizer": "sgd"}, {}),
    "adam_accumulate_clip": (
        {"optimizer": "adam"},
        {"accumulate_grad_batches": 2, "gradient_clip_val": 0.05},
    ),
    "bf16_mixed": ({"optimizer": "sgd"}, {"precision": "bf16-mixed"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_with_ckpt_path_is_bit_exact(case: str, tmp_path: Path):
    module_kwargs, trainer_kwargs = CASES[case]
    # uninterrupted, saving a checkpoint at the end of every epoch
    save = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    module, cb = Tiny(**module_kwargs), sparse(update_interval=2, itop=True)
    t = trainer([cb, save], max_epochs=3, enable_checkpointing=True, **trainer_kwargs)
    t.fit(module, loader())
    expected = final_state(t, module, cb)
    assert cb.sparsifier is not None and cb.sparsifier.update_count >= 2
    check_invariants(cb.sparsifier, t.optimizers[0], model=module)
    # resumed from the end of epoch 0, into a module initialised differently
    module2, cb2 = Tiny(**module_kwargs, seed=1), sparse(update_interval=2, itop=True)
    t2 = trainer([cb2], max_epochs=3, **trainer_kwargs)
    t2.fit(module2, loader(), ckpt_path=tmp_path / "epoch=0.ckpt")
    assert_same(final_state(t2, module2, cb2), expected)
    assert (cb2.mask_change, cb2.itop_rate) == (cb.mask_change, cb.itop_rate)


def test_resume_from_an_older_callback_checkpoint_keeps_itop(tmp_path: Path):
    """Callbacks before sparsetorch.metrics kept the ITOP masks in their own state."""
    save = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    module, cb = Tiny(), sparse(update_interval=2, itop=True)
    t = trainer([cb, save], max_epochs=3, enable_checkpointing=True)
    t.fit(module, loader())
    path = tmp_path / "epoch=0.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["callbacks"]["SparseTraining"]
    ever = state["sparsifier"].pop("metrics")["ever_active"]
    state["ever_active"] = {  # the older layout: plain bool tensors
        fqn: decode_mask(entry, fqn, tuple(entry["shape"]), entry["active"])
        for fqn, entry in ever.items()
    }
    torch.save(checkpoint, path)
    module2, cb2 = Tiny(seed=1), sparse(update_interval=2, itop=True)
    trainer([cb2], max_epochs=3).fit(module2, loader(), ckpt_path=path)
    assert (cb2.mask_change, cb2.itop_rate) == (cb.mask_change, cb.itop_rate)
    assert cb.itop_rate is not None and cb.itop_rate > 0.25


def test_flops_after_fit_count_the_trainers_run_length():
    module, cb = Tiny(), sparse(policy="static", distribution="uniform")
    trainer([cb], max_epochs=2).fit(module, loader())
    assert cb.sparsifier is not None
    report = cb.sparsifier.flops()
    # 12 steps of 8 examples; f_S = 2 * (72 + 36), f_D = 2 * (288 + 144)
    assert (report.total_steps, report.batch_size) == (12, 8)
    assert (report.training_flops, report.dense_training_flops) == (
        3 * 216 * 12,
        3 * 864 * 12,
    )


def test_resume_keeps_the_checkpoints_run_length_unless_total_steps_is_given(
    tmp_path: Path,
):
    """Like an LR scheduler's state: fitting longer does not stretch the schedule."""
    module, cb = Tiny(), sparse(update_interval=2)
    t = trainer([cb], max_epochs=1)
    t.fit(module, loader())
    t.save_checkpoint(tmp_path / "run.ckpt")
    assert cb.sparsifier is not None and cb.sparsifier.schedule.end_step == 4
    module2, cb2 = Tiny(seed=1), sparse(update_interval=2)
    trainer([cb2], max_epochs=3).fit(module2, loader(), ckpt_path=tmp_path / "run.ckpt")
    assert cb2.sparsifier is not None
    assert (cb2.sparsifier.schedule.end_step, cb2.sparsifier.update_count) == (4, 1)
    # total_steps= extends it: end_step = int(0.75 * 18)
    module3, cb3 = Tiny(seed=1), sparse(update_interval=2, total_steps=18)
    trainer([cb3], max_epochs=3).fit(module3, loader(), ckpt_path=tmp_path / "run.ckpt")
    assert cb3.sparsifier is not None
    assert (cb3.sparsifier.schedule.end_step, cb3.sparsifier.update_count) == (13, 4)


def test_resume_from_a_dense_checkpoint_starts_sparse_from_its_weights(tmp_path: Path):
    dense = Tiny()
    t = trainer([], max_epochs=1)
    t.fit(dense, loader())
    t.save_checkpoint(tmp_path / "dense.ckpt")
    module, cb = Tiny(seed=1), sparse(total_steps=12)
    t2 = trainer([cb], max_epochs=1)
    t2.fit(module, loader(), ckpt_path=tmp_path / "dense.ckpt")
    assert cb.sparsifier is not None
    check_invariants(cb.sparsifier, t2.optimizers[0], model=module)


# -- accumulation, clipping, bf16 ---------------------------------------------------


def test_accumulation_counts_optimizer_steps_and_sets_the_run_length_from_them():
    module, cb = Tiny(), sparse(update_interval=2)
    t = trainer([cb], max_epochs=2, accumulate_grad_batches=2, gradient_clip_val=0.1)
    t.fit(module, loader())
    sparsifier = cb.sparsifier
    assert sparsifier is not None
    # 6 batches an epoch, 3 optimizer steps: 6 steps, end_step = int(0.75 * 6)
    assert t.estimated_stepping_batches == 6
    assert (sparsifier.step_count, sparsifier.schedule.end_step) == (6, 4)
    assert sparsifier.update_count == 1  # at step 2 (4 is end_step)
    check_invariants(sparsifier, t.optimizers[0], model=module)


def test_bf16_mixed_trains_sparse():
    module, cb = Tiny(), sparse()
    t = trainer([cb], max_epochs=2, precision="bf16-mixed")
    t.fit(module, loader())
    assert cb.sparsifier is not None and cb.sparsifier.update_count == 2
    check_invariants(cb.sparsifier, t.optimizers[0], model=module)


def test_manual_optimization_counts_the_optimizer_steps():
    class Manual(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(F.cross_entropy(self(batch[0]), batch[1]))
            optimizer.step()

    module, cb = Manual(), sparse()
    t = trainer([cb], max_epochs=2)
    t.fit(module, loader())
    assert cb.sparsifier is not None
    assert (cb.sparsifier.step_count, cb.sparsifier.update_count) == (12, 2)
    check_invariants(cb.sparsifier, t.optimizers[0], model=module)


# -- logging ------------------------------------------------------------------------


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(
        self, metrics: Mapping[str, float], step: int | None = None
    ) -> None:
        assert step is not None
        self.rows.append((step, dict(metrics)))


class Observer(pl.Callback):
    """Reference values computed apart from the callback: masks before each step."""

    def __init__(self, cb: SparseTraining) -> None:
        self.cb = cb
        self.expected: list[dict[str, float]] = []
        self.ever: dict[str, Tensor] = {}
        self.change = 0.0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        assert self.cb.sparsifier is not None
        self.before = {f: m.clone() for f, m in self.cb.sparsifier.masks.items()}
        self.updates = self.cb.sparsifier.update_count
        if not self.ever:
            self.ever = dict(self.before)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        sparsifier = self.cb.sparsifier
        assert sparsifier is not None
        masks = sparsifier.masks
        if sparsifier.update_count != self.updates:
            grown = sum(int((masks[f] & ~self.before[f]).sum()) for f in masks)
            self.change = grown / sum(int(m.sum()) for m in masks.values())
            self.ever = {f: self.ever[f] | masks[f] for f in masks}
        numel = sum(m.numel() for m in masks.values())
        f32 = lambda v: torch.tensor(v, dtype=torch.float32).item()  # noqa: E731
        self.expected.append(
            {
                "sparsity/sparsity": f32(
                    1 - sum(int(m.sum()) for m in masks.values()) / numel
                ),
                "sparsity/mask_change": f32(self.change),
                "sparsity/updates": f32(sparsifier.update_count),
                "sparsity/itop": f32(
                    sum(int(e.sum()) for e in self.ever.values()) / numel
                ),
            }
        )


def test_logs_sparsity_mask_change_and_itop_every_step():
    module, cb, logger = Tiny(), sparse(itop=True), MemoryLogger()
    observer = Observer(cb)
    t = trainer([cb, observer], max_epochs=3, logger=logger, log_every_n_steps=1)
    t.fit(module, loader())
    logged = [
        {k: v for k, v in row.items() if k.startswith("sparsity/")}
        for _, row in logger.rows
    ]
    assert [step for step, _ in logger.rows] == list(range(18))
    assert logged == observer.expected
    assert [row["sparsity/updates"] for row in logged] == [0.0] * 3 + [1.0] * 4 + [
        2.0
    ] * 4 + [3.0] * 7
    changes = {row["sparsity/mask_change"] for row in logged}
    assert len(changes) > 2 and all(0 <= c <= 0.3 for c in changes)
    assert logged[-1]["sparsity/itop"] > logged[0]["sparsity/itop"] == 0.25


def test_log_metrics_false_logs_nothing():
    module, cb, logger = (
        Tiny(),
        sparse(log_metrics=False, update_interval=2),
        MemoryLogger(),
    )
    trainer([cb], max_epochs=1, logger=logger, log_every_n_steps=1).fit(
        module, loader()
    )
    assert not any(k.startswith("sparsity/") for _, row in logger.rows for k in row)


# -- stages and placements ----------------------------------------------------------


def test_validate_and_test_leave_the_module_dense():
    class WithEval(Tiny):
        def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
            self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    module, cb = WithEval(), sparse()
    trainer([cb]).validate(module, loader())
    assert cb.sparsifier is None
    assert not any(
        "parametrizations" in name for name in module.state_dict(keep_vars=True)
    )


def test_a_second_fit_with_the_same_callback_is_refused():
    module, cb = Tiny(), sparse(update_interval=2)
    trainer([cb], max_epochs=1).fit(module, loader())
    with pytest.raises(RuntimeError) as info:
        trainer([cb], max_epochs=1).fit(Tiny(), loader())
    assert_expected_inline(
        str(info.value),
        """\
This SparseTraining callback already trains Tiny; a callback makes one fit sparse.
For another fit, pass a new SparseTraining to a new Trainer; to continue a run, resume it with trainer.fit(model, ckpt_path=...).""",
    )


def test_unknown_run_length_is_refused_with_the_fix():
    class Stream(IterableDataset[tuple[Tensor, Tensor]]):
        def __iter__(self) -> Any:
            for _ in range(4):
                yield torch.randn(12), torch.tensor(1)

    module, cb = Tiny(), sparse()
    with pytest.raises(ValueError) as info:
        trainer([cb], max_epochs=1).fit(module, DataLoader(Stream(), batch_size=2))
    assert_expected_inline(
        str(info.value),
        """\
SparseTraining needs the run length to schedule topology updates, and the Trainer cannot estimate it (estimated_stepping_batches = -1: max_epochs=-1 or an iterable dataset, without max_steps).
Pass SparseTraining(total_steps=...) or SparseTraining(end_step=...), or Trainer(max_steps=...).""",
    )
    # and with max_steps it runs
    module, cb = Tiny(), sparse(update_interval=2)
    t = trainer([cb], max_steps=8)
    t.fit(module, DataLoader(Stream(), batch_size=2))
    assert cb.sparsifier is not None and cb.sparsifier.schedule.end_step == 6
    # and so it does with end_step
    module, cb = Tiny(), sparse(update_interval=1, end_step=2)
    trainer([cb], max_epochs=1).fit(module, DataLoader(Stream(), batch_size=2))
    assert cb.sparsifier is not None
    assert (cb.sparsifier.step_count, cb.sparsifier.update_count) == (2, 1)


def test_layers_built_in_configure_model_are_refused():
    class Late(Tiny):
        def configure_model(self) -> None:
            if not hasattr(self, "head"):
                self.head = nn.Linear(6, 6)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.net(x))

    module, cb = Late(), sparse()
    with pytest.raises(RuntimeError) as info:
        trainer([cb], max_epochs=1).fit(module, loader())
    assert_expected_inline(
        str(info.value),
        """\
The tensors ['head.weight'] appeared after SparseTraining sparsified the module in setup('fit'), so they would train dense.
Build the layers in __init__ (or the module's setup), not in configure_model, or leave them out with exclude=[...].""",
    )


def test_an_optimizer_without_the_masked_weights_is_refused():
    class BiasOnly(Tiny):
        def configure_optimizers(self) -> Any:
            return torch.optim.SGD([self.net[0].bias, self.net[2].bias], lr=0.1)

    with pytest.raises(ValueError) as info:
        trainer([sparse()], max_epochs=1).fit(BiasOnly(), loader())
    assert_expected_inline(
        str(info.value),
        """\
None of the optimizers returned by configure_optimizers holds the masked weights ['net.0.weight', 'net.2.weight'].
Build the optimizer over self.parameters() in configure_optimizers.""",
    )


def test_a_strategy_restoring_after_setup_is_refused():
    class Late(SingleDeviceStrategy):
        @property
        def restore_checkpoint_after_setup(self) -> bool:
            return True

    module = Tiny()
    with pytest.raises(RuntimeError) as info:
        trainer([sparse()], max_epochs=1, strategy=Late(torch.device("cpu"))).fit(
            module, loader()
        )
    assert_expected_inline(
        str(info.value),
        """\
SparseTraining does not support the Late strategy: it shards the weights or restores checkpoints after wrapping the module, and sparsetorch keeps whole local tensors whose masks must exist before the weights load.
Use strategy="ddp" (or a single device); for FSDP2, ModelParallelStrategy with fully_shard in configure_model.""",
    )
    assert not any(
        "parametrizations" in name for name in module.state_dict(keep_vars=True)
    )


def test_sparsify_in_configure_optimizers_beside_the_callback_is_refused():
    class Twice(Tiny):
        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            st.sparsify(self, optimizer, total_steps=12, update_interval=2)
            return optimizer

    module = Twice()
    with pytest.raises(ValueError) as info:
        trainer([sparse(update_interval=2)], max_epochs=1).fit(module, loader())
    assert_expected_inline(
        str(info.value),
        """\
'net.0.weight' is already sparsified: a model can be sparsified once.
Call sparsifier.remove() first, or keep using the existing sparsifier.""",
    )


# -- DDP: 2 CPU processes on gloo ------------------------------------------------------


def two_ranks(mode: str, tmp_path: Path, timeout: int) -> dict[Any, Any]:
    """Run this file as ``mode`` (2 ranks under Lightning's launcher); load each
    rank's uninterrupted and resumed results."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(
        [sys.executable, __file__, mode, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {
        (tag, rank): torch.load(tmp_path / f"{tag}_rank{rank}.pt", weights_only=True)
        for tag in ("uninterrupted", "resumed")
        for rank in (0, 1)
    }


def test_ddp_ranks_agree_and_resume_is_bit_exact(tmp_path: Path):
    """strategy="ddp", 2 CPU ranks on gloo; also the placement without the callback."""
    runs = two_ranks("ddp", tmp_path, timeout=120)
    full = runs["uninterrupted", 0]["state"]
    # 96 examples, 8 per batch per rank: 6 steps an epoch, 3 epochs; end_step 13
    assert (
        full["global_step"],
        full["sparsifier"]["step"],
        full["sparsifier"]["updates"],
    ) == (18, 18, 3)
    for tag in ("uninterrupted", "resumed"):
        for rank in (0, 1):  # ranks agree, and the resumed run ends bit-equal
            assert_same(runs[tag, rank]["state"], full, f"{tag} rank {rank}")
    for tag in ("uninterrupted", "resumed"):
        assert_same(runs[tag, 1]["initial_masks"], runs[tag, 0]["initial_masks"], tag)
    # the resumed run started from the checkpoint's masks (updated at step 4)
    fresh = runs["uninterrupted", 0]["initial_masks"]
    for masks in (runs["resumed", 0]["initial_masks"], full["masks"]):
        assert not any(torch.equal(fresh[f], masks[f]) for f in fresh)
    # sparsify(self.trainer.strategy.model) in configure_optimizers trains the same
    for rank in (0, 1):
        wrapper = torch.load(tmp_path / f"wrapper_rank{rank}.pt", weights_only=True)
        assert_same(wrapper, {"model": full["model"], "masks": full["masks"]})


def _ddp_main(out: Path) -> None:
    """Both ranks: an uninterrupted run, a run resumed from its epoch-0 checkpoint,
    and the run that sparsifies the DDP wrapper in configure_optimizers."""
    torch.set_num_threads(1)

    def run(tag: str, seed: int, ckpt: Path | None) -> None:
        module, cb = Tiny(seed=seed), sparse()
        initial = InitialMasks(cb)
        save = ModelCheckpoint(dirpath=out, save_top_k=-1, filename="{epoch}")
        t = trainer(
            [cb, initial, save],
            max_epochs=3,
            devices=2,
            strategy="ddp",
            enable_checkpointing=True,
        )
        t.fit(module, loader(96), ckpt_path=ckpt)
        assert cb.sparsifier is not None
        state = final_state(t, module, cb)
        state["masks"] = dict(cb.sparsifier.masks)
        torch.save(
            {"state": state, "initial_masks": initial.masks},
            out / f"{tag}_rank{t.global_rank}.pt",
        )

    run("uninterrupted", 0, None)
    run("resumed", 1, out / "epoch=0.ckpt")

    # without the callback: sparsify the DDP wrapper inside configure_optimizers
    class SparsifyTheWrapper(Tiny):
        def configure_optimizers(self) -> Any:
            config = super().configure_optimizers()
            self.sparsifier = st.sparsify(
                self.trainer.strategy.model,
                config[0][0],
                sparsity=0.75,
                total_steps=18,
                update_interval=4,
                drop_schedule="constant",
            )
            return config

    module = SparsifyTheWrapper()
    t = trainer([], max_epochs=3, devices=2, strategy="ddp")
    t.fit(module, loader(96))
    state = {"model": module.state_dict(), "masks": dict(module.sparsifier.masks)}
    torch.save(state, out / f"wrapper_rank{t.global_rank}.pt")


# -- FSDP2: ModelParallelStrategy, 2 CPU processes on gloo ---------------------------


class ShardedTiny(Tiny):
    """Tiny, sharded with FSDP2 in ``configure_model`` (ModelParallelStrategy)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net[0], self.net[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def _whole(t: Tensor) -> Tensor:
    full = t.full_tensor() if hasattr(t, "full_tensor") else t
    return full.detach().clone()


def test_model_parallel_strategy_trains_sharded_and_resumes_exactly(
    tmp_path: Path,
):
    """FSDP2 through Lightning: masks sharded like the weights, zeros outside them
    in weight and optimizer-state shards, ranks agreeing, and a run resumed from
    a distributed checkpoint ending bit-equal to the uninterrupted one."""
    runs = two_ranks("fsdp2", tmp_path, timeout=300)
    full = runs["uninterrupted", 0]
    # 96 examples, 8 per batch per rank: 6 steps an epoch, 3 epochs; end_step 13
    assert full["sharded"] and full["updates"] == 3
    for tag in ("uninterrupted", "resumed"):
        for rank in (0, 1):
            run = runs[tag, rank]
            assert run["outside"] == 0, (tag, rank)  # weight and state shards
            assert_same(run["masks"], full["masks"], f"{tag} rank {rank}")
            assert_same(run["weights"], full["weights"], f"{tag} rank {rank}")


def _fsdp2_main(out: Path) -> None:
    """Both ranks: an uninterrupted run and one resumed from its epoch-0
    checkpoint (a distributed checkpoint folder), under ModelParallelStrategy."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    torch.set_num_threads(1)

    def run(tag: str, seed: int, ckpt: Path | None) -> None:
        module, cb = ShardedTiny(optimizer="adam", seed=seed), sparse()
        save = ModelCheckpoint(dirpath=out, save_top_k=-1, filename="{epoch}")
        t = trainer(
            [cb, save],
            max_epochs=3,
            devices=2,
            strategy=ModelParallelStrategy(
                data_parallel_size=2, tensor_parallel_size=1
            ),
            enable_checkpointing=True,
        )
        t.fit(module, loader(96), ckpt_path=ckpt)
        sparsifier = cb.sparsifier
        assert sparsifier is not None
        optimizer = t.optimizers[0]
        outside = 0
        for fqn, param in sparsifier.topology.params.items():
            off = ~sparsifier.masks[fqn].to_local()  # type: ignore[attr-defined]
            for value in (param, *optimizer.state[param].values()):
                if isinstance(value, Tensor) and value.shape == param.shape:
                    outside += int(value.to_local()[off].count_nonzero())  # type: ignore[attr-defined]
        state = {
            "sharded": sparsifier.sharded,
            "updates": sparsifier.update_count,
            "masks": {f: _whole(m) for f, m in sparsifier.masks.items()},
            "weights": {f: _whole(p) for f, p in sparsifier.topology.params.items()},
            "outside": outside,
        }
        torch.save(state, out / f"{tag}_rank{t.global_rank}.pt")

    run("uninterrupted", 0, None)
    run("resumed", 1, out / "epoch=0.ckpt")


# -- the example, on the real data ------------------------------------------------


def test_example_quick_run_on_real_fashion_mnist(tmp_path: Path):
    script = ROOT / "examples" / "lightning_fashion_mnist.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.splitlines()[-2:]  # run, test accuracy, train seconds
    accuracy = {line[:10].strip(): float(line.split()[-2]) for line in table}
    assert set(accuracy) == {"dense", "rigl 90%"}, proc.stdout
    assert accuracy["dense"] > 0.7 and accuracy["rigl 90%"] > 0.6  # chance: 0.1
    assert "total                     0.9000  0.9000" in proc.stdout
    header, *lines = (
        (tmp_path / "rigl" / "version_0" / "metrics.csv").read_text().splitlines()
    )
    columns = header.split(",")
    for name in ("sparsity/sparsity", "sparsity/mask_change", "sparsity/itop"):
        assert name in columns
    updates = [line.split(",")[columns.index("sparsity/updates")] for line in lines]
    assert float([u for u in updates if u][-1]) > 0


if __name__ == "__main__" and sys.argv[1:2] == ["ddp"]:
    _ddp_main(Path(sys.argv[2]))
    exit_worker()
if __name__ == "__main__" and sys.argv[1:2] == ["fsdp2"]:
    _fsdp2_main(Path(sys.argv[2]))
    exit_worker()
