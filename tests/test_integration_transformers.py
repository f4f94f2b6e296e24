"""The Hugging Face Trainer callback and Hugging Face model conventions.

Tiny models built from configs (never downloaded), a few CPU steps each.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import transformers
from conftest import assert_same, exit_worker, spawn_ranks
from expecttest import assert_expected_inline
from torch import Tensor
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import sparsetorch as st
from sparsetorch.integrations.transformers import (
    SPARSIFIER_NAME,
    SparseTrainingCallback,
)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

STEPS = 12  # updates at steps 2, 4, 6, 8 (end_step 9); checkpoints at 4, 8, 12


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    config.bos_token_id = config.eos_token_id = 0
    return GPT2LMHeadModel(config)


def bert() -> BertForMaskedLM:
    return BertForMaskedLM(
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
        )
    )


class Tokens(torch.utils.data.Dataset[dict[str, Tensor]]):
    """64 random sequences of 16 tokens, labels = inputs (causal LM)."""

    def __init__(self) -> None:
        self.ids = torch.randint(0, 100, (64, 16), generator=torch.Generator())

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def fit(
    out: Path | str,
    *,
    resume: str | bool | None = None,
    seed: int = 0,
    callback: SparseTrainingCallback | None = None,
    late: bool = False,
    **args: Any,
) -> tuple[GPT2LMHeadModel, Trainer, SparseTrainingCallback]:
    """Train a tiny GPT-2 for STEPS steps with the callback, saving every 4."""
    model = gpt2(seed)
    callback = callback or SparseTrainingCallback(sparsity=0.9, update_interval=2)
    settings: dict[str, Any] = {
        "max_steps": STEPS,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "save_strategy": "steps",
        "save_steps": 4,
        "logging_steps": 100,
        "use_cpu": True,
        "report_to": [],
        "disable_tqdm": True,
        "seed": 0,
    }
    arguments = TrainingArguments(str(out), **{**settings, **args})
    trainer = Trainer(
        model,
        arguments,
        train_dataset=Tokens(),
        eval_dataset=Tokens() if arguments.eval_strategy != "no" else None,
        callbacks=None if late else [callback],
    )
    if late:
        trainer.add_callback(callback)  # on_init_end has passed: train sparsifies
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer, callback


def snapshot(
    model: GPT2LMHeadModel, trainer: Trainer, callback: SparseTrainingCallback
) -> dict[str, Any]:
    sparsifier = callback.sparsifier
    assert sparsifier is not None
    optimizer = trainer.optimizer.state_dict()  # type: ignore[union-attr]
    return {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "masks": {k: v.clone() for k, v in sparsifier.masks.items()},
        "optimizer": optimizer["state"],
        "steps": (sparsifier.step_count, sparsifier.update_count),
        "generator": sparsifier.generator.get_state(),
        "global_step": trainer.state.global_step,
    }


def check_masked(model: GPT2LMHeadModel, trainer: Trainer, sparsifier: Any) -> None:
    """Weights and every optimizer state tensor are zero outside the masks."""
    optimizer = trainer.optimizer
    assert optimizer is not None
    for fqn, mask in sparsifier.masks.items():
        param = sparsifier.topology.params[fqn]
        assert int(param[~mask].count_nonzero()) == 0, fqn
        for value in optimizer.state[param].values():
            if isinstance(value, Tensor) and value.shape == mask.shape:
                assert int(value[~mask].count_nonzero()) == 0, fqn


# -- HF model conventions -----------------------------------------------------------


def test_gpt2_default_selection_is_the_conv1d_layers_with_the_tied_head_dense():
    model = gpt2()
    embedding = model.transformer.wte.weight.detach().clone()
    sparsifier = st.sparsify(model, policy="static", sparsity=0.9)
    assert list(sparsifier.masks) == [
        f"transformer.h.{i}.{layer}.weight"
        for i in range(2)
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert sparsifier.skipped == {
        "lm_head.weight": "tied to transformer.wte.weight, an input embedding"
    }
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight, embedding)  # dense, untouched
    assert_expected_inline(
        sparsifier.summary().splitlines()[-1],
        """skipped: lm_head.weight (tied to transformer.wte.weight, an input embedding, dense)""",
    )


def test_bert_default_selection_keeps_the_tied_decoder_dense():
    model = bert()
    sparsifier = st.sparsify(model, policy="static", sparsity=0.9)
    assert "cls.predictions.decoder.weight" not in sparsifier.masks
    assert sparsifier.skipped == {
        "cls.predictions.decoder.weight": (
            "tied to bert.embeddings.word_embeddings.weight, an input embedding"
        )
    }
    assert len(sparsifier.masks) == 2 * 6 + 1  # q, k, v, o, in, out + head dense


@pytest.mark.parametrize("make", [gpt2, bert])
def test_tie_weights_and_resize_token_embeddings_work_after_sparsify(make: Any):
    model = make()
    sparsifier = st.sparsify(model, policy="static", sparsity=0.9)
    masks = {fqn: m.clone() for fqn, m in sparsifier.masks.items()}
    model.tie_weights()
    model.resize_token_embeddings(120)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is embedding.weight
    assert tuple(head.weight.shape) == (120, 32)
    ids = torch.randint(0, 120, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()  # trains with the new vocab
    assert_same(dict(sparsifier.masks), masks)


def test_including_a_tied_embedding_of_a_hf_model_raises_before_any_change():
    model = gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as error:
        st.sparsify(model, policy="static", include=["*.weight"])
    assert_expected_inline(
        str(error.value),
        """\
Cannot sparsify ['lm_head.weight', 'transformer.wte.weight']: an input embedding tied to an output layer (lm_head.weight = transformer.wte.weight), in a model with tie_weights().
The model re-ties them by assignment (tie_weights(), resize_token_embeddings()), which a sparsified weight cannot take. Leave them dense: exclude=['lm_head.weight', 'transformer.wte.weight']; or untie them before building the model (config.tie_word_embeddings=False).""",
    )
    assert_same({k: v for k, v in model.state_dict().items()}, before)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted run, checkpoints at 4, 8 and 12 (copy before resuming)."""
    out = tmp_path_factory.mktemp("finished")
    model, trainer, callback = fit(out)
    check_masked(model, trainer, callback.sparsifier)
    return {
        "out": out,
        "model": model,
        "sparsifier": callback.sparsifier,
        "snapshot": snapshot(model, trainer, callback),
    }


def resumable(finished: dict[str, Any], tmp_path: Path) -> Path:
    shutil.copytree(finished["out"], tmp_path / "run")
    return tmp_path / "run"


def test_save_pretrained_loads_into_the_plain_model_with_the_same_logits(
    finished: dict[str, Any], tmp_path: Path
):
    model, sparsifier = finished["model"], finished["sparsifier"]
    model.save_pretrained(tmp_path / "sparse")
    plain = GPT2LMHeadModel.from_pretrained(tmp_path / "sparse")
    assert not any(hasattr(m, "parametrizations") for m in plain.modules())
    model.eval()
    ids = torch.randint(0, 100, (2, 16))
    assert torch.equal(plain(ids).logits, model(ids).logits)
    for fqn, mask in sparsifier.masks.items():
        assert int(plain.get_parameter(fqn)[~mask].count_nonzero()) == 0


def test_from_pretrained_then_sparsify_then_load_state_keeps_every_weight(
    finished: dict[str, Any], tmp_path: Path
):
    model, trained = finished["model"], finished["snapshot"]
    model.save_pretrained(tmp_path / "sparse")
    torch.save(finished["sparsifier"].state_dict(), tmp_path / "sparsifier.pt")

    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "sparse")
    sparsifier = st.sparsify(
        loaded, sparsity=0.9, update_interval=2, total_steps=STEPS
    )  # new random masks
    sparsifier.load_state_dict(
        torch.load(tmp_path / "sparsifier.pt", weights_only=True)
    )
    assert_same(dict(loaded.state_dict()), trained["weights"])
    assert_same(dict(sparsifier.masks), trained["masks"])


# -- the Trainer callback ---------------------------------------------------------


def test_resume_from_checkpoint_is_bit_exact(finished: dict[str, Any], tmp_path: Path):
    uninterrupted = finished["snapshot"]
    assert uninterrupted["steps"] == (STEPS, 4)
    assert (finished["out"] / "checkpoint-8" / SPARSIFIER_NAME).is_file()
    out = resumable(finished, tmp_path)
    model, trainer, callback = fit(out, resume=str(out / "checkpoint-8"))
    assert_same(snapshot(model, trainer, callback), uninterrupted)
    check_masked(model, trainer, callback.sparsifier)


def test_resume_with_accumulation_clipping_and_bf16_is_bit_exact(tmp_path: Path):
    args = {"gradient_accumulation_steps": 2, "max_grad_norm": 0.05, "bf16": True}
    uninterrupted = snapshot(*fit(tmp_path, **args))
    assert uninterrupted["steps"] == (STEPS, 4)
    model, trainer, callback = fit(
        tmp_path, resume=str(tmp_path / "checkpoint-8"), **args
    )
    assert_same(snapshot(model, trainer, callback), uninterrupted)
    check_masked(model, trainer, callback.sparsifier)


def test_callback_added_after_init_resumes_bit_exact(
    finished: dict[str, Any], tmp_path: Path
):
    """trainer.add_callback: the trained weights load before sparsify."""
    out = resumable(finished, tmp_path)
    run = fit(out, resume=str(out / "checkpoint-8"), late=True, seed=1)
    assert_same(snapshot(*run), finished["snapshot"])


def test_model_init_sparsifies_the_model_that_train_builds(tmp_path: Path):
    callback = SparseTrainingCallback(sparsity=0.9, update_interval=2)
    arguments = TrainingArguments(
        str(tmp_path), max_steps=4, use_cpu=True, report_to=[], save_strategy="no"
    )
    trainer = Trainer(
        model_init=lambda: gpt2(),
        args=arguments,
        train_dataset=Tokens(),
        callbacks=[callback],
    )
    trainer.train()  # builds a new model from model_init
    sparsifier = callback.sparsifier
    assert sparsifier is not None
    assert sparsifier.topology.model is trainer.model
    assert (sparsifier.step_count, sparsifier.update_count) == (4, 1)
    assert sparsifier.schedule.end_step == 3


def test_resume_true_finds_the_last_checkpoint(
    finished: dict[str, Any], tmp_path: Path
):
    out = resumable(finished, tmp_path)
    shutil.rmtree(out / "checkpoint-12")
    assert_same(snapshot(*fit(out, resume=True)), finished["snapshot"])


def test_activation_checkpointing_trains_the_same_run(
    finished: dict[str, Any], tmp_path: Path
):
    """The recomputed forward reads the masked weights again: same run, bit for bit."""
    run = fit(tmp_path, save_strategy="no", activation_checkpointing=True)
    assert run[0].is_activation_checkpointing
    assert_same(snapshot(*run), finished["snapshot"])


class LogRecorder(TrainerCallback):
    """The logs as a callback sees them."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any):
        self.logs.append(dict(logs))


def test_metrics_go_into_the_trainers_logs(tmp_path: Path):
    callback = SparseTrainingCallback(sparsity=0.9, update_interval=2, itop=True)
    before, after = LogRecorder(), LogRecorder()
    arguments = TrainingArguments(
        str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4,
        logging_steps=3, save_strategy="no", use_cpu=True, report_to=[],
        disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(
        gpt2(), arguments, train_dataset=Tokens(), callbacks=[before, callback, after]
    )
    trainer.train()
    sparsifier = callback.sparsifier
    assert sparsifier is not None
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    # logged after steps 3, 6, 9, 12; updates after 2, 4, 6, 8
    assert [(e["step"], e["sparsity/updates"]) for e in train_logs] == [
        (3, 1.0),
        (6, 3.0),
        (9, 4.0),
        (12, 4.0),
    ]
    itop = [e["sparsity/itop"] for e in train_logs]
    assert itop == sorted(itop) and itop[0] > 0.1
    last = {k: v for k, v in train_logs[-1].items() if k.startswith("sparsity/")}
    assert last == sparsifier.metrics()
    assert [k for k in after.logs[0] if k.startswith("sparsity/")] == list(last)
    assert not any(k.startswith("sparsity/") for k in before.logs[0])
    assert sparsifier.total_steps == STEPS
    # Moved first (as the docstring says for report_to), every callback sees them.
    trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(callback))
    trainer.log({"loss": 1.0})
    assert before.logs[-1]["sparsity/itop"] == itop[-1]


def test_run_length_comes_from_the_trainer(finished: dict[str, Any]):
    assert finished["sparsifier"].schedule.end_step == int(0.75 * STEPS)


def test_resume_for_more_steps_keeps_the_checkpoints_run_length(
    finished: dict[str, Any], tmp_path: Path
):
    out = resumable(finished, tmp_path)
    _, _, callback = fit(out, resume=str(out / "checkpoint-8"), max_steps=16)
    sparsifier = callback.sparsifier
    assert sparsifier is not None
    assert sparsifier.schedule.end_step == int(0.75 * STEPS)  # not of 16
    assert (sparsifier.step_count, sparsifier.update_count) == (16, 4)


def test_load_best_model_at_end_restores_the_best_checkpoints_masks(tmp_path: Path):
    model, trainer, callback = fit(
        tmp_path,
        eval_strategy="steps",
        eval_steps=4,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # the worst loss: an early checkpoint
    )
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-12")
    saved = torch.load(Path(best) / SPARSIFIER_NAME, weights_only=True)
    sparsifier = callback.sparsifier
    assert sparsifier is not None
    state = sparsifier.state_dict()
    assert (state["step"], state["updates"]) == (
        saved["sparsifier"]["step"],
        saved["sparsifier"]["updates"],
    )
    assert_same(state["masks"], saved["sparsifier"]["masks"])
    weights = safetensors.torch.load_file(Path(best) / "model.safetensors")
    current = model.state_dict()
    assert_same({k: current[k] for k in weights}, weights)
    check_masked(model, trainer, sparsifier)


def test_resume_with_another_runs_sparsifier_state_raises(
    finished: dict[str, Any], tmp_path: Path
):
    fit(tmp_path, seed=1)  # other weights, same masks (same mask seed)
    shutil.copy(
        finished["out"] / "checkpoint-8" / SPARSIFIER_NAME,
        tmp_path / "checkpoint-8" / SPARSIFIER_NAME,
    )
    callback = SparseTrainingCallback(sparsity=0.9, update_interval=2)
    with pytest.raises(RuntimeError, match="saved with other weights") as error:
        fit(tmp_path, resume=str(tmp_path / "checkpoint-8"), callback=callback)
    assert "resume_from_checkpoint=True" in str(error.value)
    assert callback.sparsifier is not None
    assert callback.sparsifier.step_count == 0  # nothing was loaded


def test_resume_from_a_folder_outside_output_dir_raises(
    finished: dict[str, Any], tmp_path: Path
):
    with pytest.raises(RuntimeError) as error:
        fit(tmp_path / "b", resume=str(finished["out"] / "checkpoint-8"))
    message = str(error.value).replace(str(tmp_path), "TMP")
    assert_expected_inline(
        message,
        """\
SparseTrainingCallback found no sparsifier state TMP/b/checkpoint-8/sparsifier.pt.
The Trainer resumed at this step; the callback reads the sparsifier state from output_dir/checkpoint-<global_step>, where the Trainer saves it. Resume with resume_from_checkpoint=True or a checkpoint folder of output_dir (copy it there), saved by a run with this callback.""",
    )


def test_sparsify_with_the_accelerated_optimizer_leaves_the_model_unchanged_on_error(
    tmp_path: Path,
):
    """The issue's row: sparsify inside a user's on_train_begin."""
    model = gpt2()
    arguments = TrainingArguments(
        str(tmp_path), max_steps=2, use_cpu=True, report_to=[], save_strategy="no"
    )
    trainer = Trainer(model, arguments, train_dataset=Tokens())
    trainer.create_optimizer()
    optimizer = trainer.accelerator.prepare(trainer.optimizer)
    assert type(optimizer).__name__ == "AcceleratedOptimizer"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        sparsifier = st.sparsify(model, optimizer, policy="static")
    except (TypeError, ValueError, RuntimeError):
        assert_same(dict(model.state_dict()), before)
        assert not any(hasattr(m, "parametrizations") for m in model.modules())
    else:
        assert sparsifier.optimizer is optimizer.optimizer


# -- DDP: 2 processes on gloo -------------------------------------------------------


class SparsifyInOnTrainBegin(TrainerCallback):
    """The issue's wrong placement: a user's own callback, after DDP wrapped."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any):
        st.sparsify(
            kwargs["model"],  # the inner module: DDP's hooks are lost
            kwargs["optimizer"].optimizer,
            sparsity=0.9,
            update_interval=2,
            total_steps=STEPS,
        )


def _ddp_worker(rank: int, out: str) -> None:
    transformers.logging.set_verbosity_error()
    # Each rank initializes its model from another seed: rank 0's must win.
    # DDP's no_sync on accumulation steps, clipping across ranks.
    ddp = {
        "ddp_backend": "gloo",
        "gradient_accumulation_steps": 2,
        "max_grad_norm": 0.05,
    }
    uninterrupted = snapshot(*fit(out, seed=rank, **ddp))
    resumed = snapshot(
        *fit(out, seed=rank, resume=os.path.join(out, "checkpoint-8"), **ddp)
    )
    arguments = TrainingArguments(
        os.path.join(out, "own"),
        max_steps=STEPS,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        ddp_backend="gloo",
    )
    own = Trainer(
        gpt2(rank),
        arguments,
        train_dataset=Tokens(),
        callbacks=[SparsifyInOnTrainBegin()],
    )
    try:
        own.train()
        stopped = "trained to the end"
    except RuntimeError as error:
        stopped = str(error)
    torch.save(
        {
            "uninterrupted": uninterrupted,
            "resumed": resumed,
            "own_callback": stopped,
            "world": int(torch.distributed.get_world_size()),
        },
        os.path.join(out, f"rank{rank}.pt"),
    )
    torch.distributed.destroy_process_group()
    exit_worker()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    found = spawn_ranks(_ddp_worker, tmp_path_factory.mktemp("ddp"))
    assert [r["world"] for r in found] == [2, 2]
    return found


def test_ddp_ranks_identical_and_resume_bit_exact(ranks: list[dict[str, Any]]):
    first, second = ranks
    assert first["uninterrupted"]["steps"] == (STEPS, 4)
    assert_same(first["uninterrupted"], second["uninterrupted"])
    assert_same(first["resumed"], second["resumed"])
    assert_same(first["resumed"], first["uninterrupted"])


def test_ddp_sparsify_in_a_users_on_train_begin_stops_with_a_clear_error(
    ranks: list[dict[str, Any]],
):
    """Not silently different ranks: sparsetorch's guard stops the run."""
    for rank in ranks:
        assert "find_unused_parameters" in rank["own_callback"], rank["own_callback"]


# -- the example ---------------------------------------------------------------------


def test_vit_example_quick_run_trains_90_percent_sparse(
    capsys: pytest.CaptureFixture[str],
):
    examples = str(Path(__file__).parent.parent / "examples")
    sys.path.insert(0, examples)
    try:
        example = importlib.import_module("hf_vit_fashion_mnist")
    finally:
        sys.path.remove(examples)
    metrics = example.main(["--quick", "--policy", "rigl"])
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"rigl: test accuracy {metrics['eval_accuracy']:.4f}"
    assert any("step=8, updates=2, next_update=none" in line for line in out)
    total = next(line for line in out if line.startswith("total "))
    assert total.split()[1:3] == ["0.9000", "0.9000"]
    assert not any(line.startswith("classifier.") for line in out)  # head dense
    assert any(line.startswith("vit.layers.3.mlp.fc2.weight ") for line in out)
