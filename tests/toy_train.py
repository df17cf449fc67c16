"""A tiny training script that uses the runtime API exactly as a training stage does.

Model: ``ToyPair`` = a ``ToyNet`` (exported, EMA-tracked, like the tokenizer) + a critic (like the
discriminator), one optimizer with two param groups at different learning rates, one backward of the
summed losses. ``--single-model`` trains a ``ToyNet`` alone (the generator-stage shape, for ZeRO-3).
Writes ``RUN/results-rank{R}.json`` with what the tests check. Run it under any launcher, e.g.
``accelerate launch --num_processes 2 --use_deepspeed --zero_stage 2 tests/toy_train.py --run-dir R``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from models.config import ConfigBase  # noqa: E402
from models.hub import PretrainedMixin  # noqa: E402
from pipeline.config import TrainConfig, save_resolved_config  # noqa: E402
from pipeline.training import state_digest  # noqa: E402

MODEL_CLASS = "toy_train:ToyNet"


@dataclasses.dataclass
class ToyConfig(ConfigBase):
    dim: int = 8
    hidden: int = 16


class ToyNet(PretrainedMixin, nn.Module):
    """x: float [B, dim] -> prediction [B, dim]; a buffer checks that exports carry buffers."""

    config_class = ToyConfig

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.body = nn.Sequential(nn.Linear(config.dim, config.hidden), nn.Tanh(), nn.Linear(config.hidden, config.dim))
        self.register_buffer("scale", torch.full((config.dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.scale


class ToyPair(nn.Module):
    """ToyNet + critic: both trained by one backward of the summed losses (the GAN recipe of docs/design.md)."""

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.net = ToyNet(config)
        self.critic = nn.Linear(config.dim, 1)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        prediction = self.net(x)
        critic_loss = (self.critic(prediction.detach()).squeeze(-1) - target.sum(-1)).pow(2).mean()
        return (prediction - target).pow(2).mean() + critic_loss


class ToyStream:
    """Deterministic rank-sharded batches; ``position`` counts batches drawn (the resumable state)."""

    def __init__(self, dim: int, batch: int, rank: int, world: int, seed: int):
        self.dim, self.batch, self.rank, self.world, self.seed = dim, batch, rank, world, seed
        self.position = 0

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Global batch index position*world + rank: the data seen depends on the total sample order only.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.position * self.world + self.rank)
        self.position += 1
        x = torch.randn(self.batch, self.dim, generator=generator)
        return x, torch.sin(3 * x).flip(-1)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--zero", type=int, default=2, help="train.zero_stage (used when the launcher gives none)")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ckpt-every", type=int, default=2)
    parser.add_argument("--keep-last", type=int, default=2)
    parser.add_argument("--ema-decay", type=float, default=0.8)
    parser.add_argument("--resume", default="auto")
    parser.add_argument("--die-in-save", type=int, default=0,
                        help="os._exit(1) in the middle of saving this step's checkpoint (kill -9 test)")
    parser.add_argument("--single-model", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.checkpoint import CheckpointManager
    from pipeline.ema import EMA
    from pipeline.runtime import build_accelerator, finish_training
    from pipeline.schedule import warmup_cosine

    run_dir = Path(args.run_dir)
    train = TrainConfig(max_steps=args.steps, grad_accum=args.grad_accum, ckpt_every=args.ckpt_every,
                        keep_last=args.keep_last, zero_stage=args.zero, ema_decay=args.ema_decay)
    accelerator = build_accelerator(train, run_dir, grad_clip=1.0, micro_batch_size=args.batch, seed=7,
                                    log_with=("tensorboard",), project_name="toy")
    config = ToyConfig()
    if accelerator.is_main_process:
        save_resolved_config(_RunConfig(model=config), run_dir)

    model = ToyNet(config) if args.single_model else ToyPair(config)
    net = model if args.single_model else model.net
    groups = [{"params": list(net.parameters()), "lr": args.lr}]
    if not args.single_model:
        groups.append({"params": list(model.critic.parameters()), "lr": args.lr * 10})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    scheduler = warmup_cosine(optimizer, args.warmup, args.steps, min_lr_ratio=0.1)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(model)
    net = unwrapped if args.single_model else unwrapped.net
    ema = EMA(net, args.ema_decay)
    stream = ToyStream(config.dim, args.batch, accelerator.process_index, accelerator.num_processes, seed=3)
    ckpt = CheckpointManager(run_dir, accelerator, args.keep_last, {"model": dataclasses.asdict(config), "lr": args.lr},
                             stage="toy", model_class=MODEL_CLASS)
    step = ckpt.resume(args.resume, ema=ema, extra={"stream": stream})
    resumed_from = step

    def export_state() -> dict[str, torch.Tensor]:
        state = accelerator.get_state_dict(model)
        if args.single_model:
            return state
        return {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}

    lrs = []
    while step < args.steps:
        for _ in range(args.grad_accum):
            x, target = next(stream)
            with accelerator.accumulate(model):
                loss = model(x, target) if not args.single_model else (model(x) - target).pow(2).mean()
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
        scheduler.step()
        step += 1
        ema.update()
        lrs.append([group["lr"] for group in optimizer.param_groups])
        accelerator.log({"loss": loss.item()}, step=step)
        if step % args.ckpt_every == 0 or step == args.steps:
            extra = {"stream": stream, **({"crash": _CrashWhenSaved()} if step == args.die_in_save else {})}
            ckpt.save(step, export_state=export_state, ema=ema, extra=extra)

    # Under ZeRO-3 the module's parameters are placeholders: compare the gathered state instead.
    final = export_state()
    ema_full = ema.state_dict_for()
    ema.copy_to()
    after_copy = export_state()
    finish_training(accelerator)
    result = {
        "distributed_type": str(accelerator.distributed_type),
        "world_size": accelerator.num_processes,
        "zero_stage": ckpt.zero_stage,
        "resumed_from": resumed_from,
        "steps": step,
        "stream_position": stream.position,
        "lrs": lrs,
        "digest": state_digest(unwrapped.state_dict()) if ckpt.zero_stage < 3 else None,
        "net_change": None, "critic_change": None, "ema_copy_max_diff": None,
    }
    if accelerator.is_main_process:
        prefix = "" if args.single_model else "net."
        result["net_change"] = max((final[k] - initial[prefix + k]).abs().max().item() for k in final
                                   if prefix + k in initial and k != "scale")
        if not args.single_model:
            critic = unwrapped.critic.state_dict()
            result["critic_change"] = max((critic[k] - initial["critic." + k]).abs().max().item() for k in critic)
        result["ema_copy_max_diff"] = max((after_copy[k].float() - ema_full[k]).abs().max().item() for k in ema_full)
    (run_dir / f"results-rank{accelerator.process_index}.json").write_text(json.dumps(result, indent=1))
    return 0


class _CrashWhenSaved:
    """Saved right after accelerator.save_state wrote the DeepSpeed state: dies like kill -9 (no cleanup)."""

    def state_dict(self) -> dict:
        os._exit(1)

    def load_state_dict(self, state: dict) -> None:
        raise AssertionError("a crashed save must never be resumed")


@dataclasses.dataclass
class _RunConfig(ConfigBase):
    model: ToyConfig = dataclasses.field(default_factory=ToyConfig)


if __name__ == "__main__":
    sys.exit(main())
