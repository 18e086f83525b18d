"""The teacher under FSDP: sharded over the processes, frozen and in eval mode, and the student trained as in one
process. Under DDP the teacher stays a whole, unwrapped copy; DeepSpeed ZeRO-3 and a generating teacher under FSDP
are refused.

Accelerate turns FSDP on only for accelerators (``AcceleratorState`` keeps the FSDP plugin for MULTI_GPU and the
like, never MULTI_CPU), so the two-process test sets the FSDP distributed type itself after Accelerate's own set-up
(:func:`fsdp_on_cpu`); PyTorch's FSDP2 and FSDP1 themselves run on the CPU with gloo."""

import os
from types import SimpleNamespace

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from test_trainer import arguments  # noqa: E402

import helpers  # noqa: E402
from fisherkd.hf import DistillationConfig, DistillationTrainer  # noqa: E402
from fisherkd.hf import trainer as trainer_module  # noqa: E402
from helpers import free_port  # noqa: E402

VOCAB, LENGTH = 50, 8
FSDP2 = {"fsdp": True, "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}


def tiny_llama(layers: int, seed: int) -> transformers.LlamaForCausalLM:
    return helpers.tiny_llama(layers, seed, vocab=VOCAB, tie_word_embeddings=False)


def examples(n: int = 8) -> list[dict[str, torch.Tensor]]:
    """Random sequences whose first two tokens are a prompt (label -100) and whose last is padding."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (LENGTH,), generator=g)
        mask = (torch.arange(LENGTH) < LENGTH - 1).long()
        labels = torch.where(mask.bool() & (torch.arange(LENGTH) >= 2), ids, -100)
        rows.append({"input_ids": ids * mask, "attention_mask": mask, "labels": labels})
    return rows


def distillation_trainer(out_dir: str, batch_size: int, **overrides) -> DistillationTrainer:
    student, teacher = tiny_llama(1, seed=0), tiny_llama(2, seed=1)
    config = DistillationConfig(token_loss={"divergence": "reverse_kl"}, label_loss_weight=0.5)
    args = arguments(out_dir, max_steps=2, per_device_train_batch_size=batch_size, learning_rate=1e-2, **overrides)
    return DistillationTrainer(
        model=student, teacher_model=teacher, distillation=config, args=args, train_dataset=examples()
    )


def record_teacher_calls(trainer: DistillationTrainer) -> list[tuple[bool, bool]]:
    """(any teacher module in training mode, gradients enabled) at every teacher forward pass."""
    calls: list[tuple[bool, bool]] = []
    trainer.teacher_model.register_forward_pre_hook(
        lambda module, args: calls.append((any(m.training for m in module.modules()), torch.is_grad_enabled()))
    )
    return calls


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole weights (FSDP2 keeps DTensor shards: gathered, on every process alike)."""
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()
    }


def local_elements(model: torch.nn.Module) -> int:
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())


def fsdp_on_cpu() -> None:
    """Keep the FSDP plugin on a multi-CPU run, as Accelerate does on accelerators (the FSDP branch of
    ``AcceleratorState.__init__``)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def with_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.fsdp_plugin = fsdp_plugin
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = with_fsdp


def shard_directly(version: int, rank: int) -> dict:
    """The sharding helper on its own, FSDP1 and FSDP2, with a stand-in accelerator on the CPU."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=version, auto_wrap_policy="transformer_based_wrap", sync_module_states=False
    )
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        device=torch.device("cpu"),
        mixed_precision="no",
        is_main_process=rank == 0,
        torch_device_mesh=None,
        parallelism_config=None,
    )
    teacher = tiny_llama(2, seed=1).requires_grad_(False).eval()
    ids = torch.randint(1, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = teacher(ids).logits
    elements = sum(p.numel() for p in teacher.parameters())
    sharded = trainer_module._shard_for_inference(teacher, accelerator)
    with torch.no_grad():
        logits = sharded(ids).logits
    return {
        "elements": elements,
        "local": local_elements(sharded),  # after a forward pass: nothing left gathered
        "training": any(m.training for m in sharded.modules()),
        "grad": any(p.requires_grad for p in sharded.parameters()),
        "difference": float((logits - whole).abs().max()),
        # the shared plugin is untouched: the student's layer classes are found when the student is prepared
        "plugin untouched": plugin.auto_wrap_policy is transformer_auto_wrap_policy
        and plugin.transformer_cls_names_to_wrap is None,
    }


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from torch.distributed.fsdp import FSDPModule

    result = {}
    ddp = distillation_trainer(os.path.join(out_dir, f"ddp{rank}"), batch_size=2, ddp_backend="gloo")
    ddp.train()
    result["ddp teacher"] = type(ddp.teacher_model).__name__  # no DDP (nor FSDP) wrapper
    result["ddp student"] = full_state(ddp.model)

    fsdp_on_cpu()
    trainer = distillation_trainer(os.path.join(out_dir, f"fsdp{rank}"), batch_size=2, ddp_backend="gloo", **FSDP2)
    assert trainer.is_fsdp_enabled
    calls = record_teacher_calls(trainer)
    trainer.train()
    teacher = trainer.teacher_model
    result |= {
        "sharded": isinstance(teacher, FSDPModule),
        "elements": sum(p.numel() for p in tiny_llama(2, seed=1).parameters()),
        "local": local_elements(teacher),
        "training": any(m.training for m in teacher.modules()),
        "grad": any(p.requires_grad for p in teacher.parameters()),
        "calls": calls,
        "student": full_state(trainer.model),
        "direct": {version: shard_directly(version, rank) for version in (1, 2)},
    }
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sharding")
    single = distillation_trainer(str(out / "single"), batch_size=4)
    single.train()
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=2, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return {"single": full_state(single.model), "ranks": ranks}


def test_fsdp_shards_the_teacher_over_the_processes(runs):
    for rank in runs["ranks"]:
        assert rank["sharded"]
        # each process holds half of every weight matrix (all dimensions of the tiny Llama are even)
        assert rank["local"] * 2 == rank["elements"]


def test_sharded_teacher_is_frozen_and_in_eval_mode_at_every_forward_pass(runs):
    for rank in runs["ranks"]:
        assert rank["calls"] and rank["calls"] == [(False, False)] * len(rank["calls"])
        assert not rank["training"] and not rank["grad"]


def test_fsdp_two_processes_train_the_student_as_one_process(runs):
    rank0, rank1 = runs["ranks"]
    for name, value in runs["single"].items():
        torch.testing.assert_close(rank0["student"][name], rank1["student"][name])
        torch.testing.assert_close(rank0["student"][name], value, rtol=1e-4, atol=1e-6)


def test_ddp_keeps_the_teacher_whole_and_unwrapped(runs):
    for rank in runs["ranks"]:
        assert rank["ddp teacher"] == "LlamaForCausalLM"
        for name, value in runs["single"].items():
            torch.testing.assert_close(rank["ddp student"][name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("version", [1, 2])
def test_sharding_helper_gives_the_whole_teachers_logits(runs, version):
    for rank in runs["ranks"]:
        direct = rank["direct"][version]
        assert direct["difference"] < 1e-6
        assert direct["local"] * 2 == direct["elements"]
        assert not direct["training"] and not direct["grad"]
        assert direct["plugin untouched"]


class FlaggedTrainer(DistillationTrainer):
    """One process, with the Trainer's FSDP or DeepSpeed flag raised after Accelerate's set-up (for the refusals,
    which come before any sharding)."""

    flag = "is_fsdp_enabled"

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        setattr(self, self.flag, True)


def test_teacher_generation_is_refused_under_fsdp(tmp_path):
    config = DistillationConfig(token_loss={}, policy={"teacher_fraction": 0.5})
    with pytest.raises(NotImplementedError, match="teacher_fraction > 0.*FSDP"):
        FlaggedTrainer(
            model=tiny_llama(1, 0), teacher_model=tiny_llama(2, 1), distillation=config, args=arguments(tmp_path)
        )


def test_deepspeed_zero3_is_refused(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState

    zero3 = property(lambda state: SimpleNamespace(zero_stage=3))

    class DeepSpeedTrainer(FlaggedTrainer):
        flag = "is_deepspeed_enabled"

        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            monkeypatch.setattr(AcceleratorState, "deepspeed_plugin", zero3)

    with pytest.raises(NotImplementedError, match="ZeRO-3.*FSDP"):
        DeepSpeedTrainer(
            model=tiny_llama(1, 0),
            teacher_model=tiny_llama(2, 1),
            distillation=DistillationConfig(token_loss={}),
            args=arguments(tmp_path),
        )
