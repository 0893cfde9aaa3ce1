"""DINO pretraining of a Swin-UNETR (or UNETR) encoder on IoU-based positive pairs.

Each image gives two crops whose IoU lies in [--min_iou, --max_iou], each with its own
augmentations. A student network learns to match the centred, sharpened output of a
teacher (an exponential moving average of the student) on the other view (Caron et al.,
2021). The teacher's encoder is written to ``<chkpt_dir>/<run_name>.pt`` after every
epoch (the student's is stored next to it), ready for ``main_finetune.py --chkpt_path``.

2D slices, one GPU, the paper's interval::

    python main_dino.py --data_dir <DIR_WITH_PREPROCESSED_2D_PNGS> --embedding_size 48 \\
        --batch_size 128 --n_epochs 100 --min_iou 0.3 --max_iou 0.6 --num_workers 8 --use_amp

3D volumes, and several GPUs (batch size per GPU)::

    python main_dino.py --data_dir <DIR_WITH_NIFTI> --spatial_dims 3 --crop_size 64 --batch_size 8 --use_amp
    torchrun --nproc_per_node 4 main_dino.py --data_dir D --batch_size 32 --run_name d1 --use_amp
    srun --ntasks 4 --gpus 4 python main_dino.py --data_dir D --batch_size 32 --run_name d1 --use_amp   # SLURM

Resume an interrupted run (same flags plus --resume)::

    python main_dino.py --data_dir D --run_name d1 --use_amp --resume

Faster on one GPU: view augmentations on the GPU, decoded slices in RAM (see main_simsiam.py)::

    python main_dino.py --data_dir D --use_amp --amp_dtype bf16 --num_workers 16 --batch_augment --cache_images

A quick look on the CPU::

    python main_dino.py --data_dir /tmp/ph2d --low_resource_mode --crop_size 32 --n_epochs 2 \\
        --warmup_epochs 1 --chkpt_dir /tmp/runs
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

import engine
from models import DINOHead, DINOLoss, DINOModel, build_encoder, encoder_out_dim
from pretrain import PretrainMethod, add_common_args, run_pretraining
from utils import UserError, run_cli

LOW_RESOURCE_HEAD = {"hidden_dim": 256, "bottleneck_dim": 64, "out_dim": 256}
#: How the teacher runs: "original" (the student's drop path, train mode) or "dino" (none, eval mode).
TEACHER_STYLES = ("original", "dino")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pretrain a Swin-UNETR / UNETR encoder with DINO on crop pairs whose IoU lies in [min_iou, max_iou].",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    groups = add_common_args(
        parser, "dino", {"base_lr": 5e-5, "warmup_epochs": 10, "end_lr": 1e-6}, ("--batch_size_per_gpu",)
    )
    opt = groups["optim"]
    opt.add_argument(
        "--weight_decay",
        "--wd",
        "--base_wd",
        dest="weight_decay",
        type=float,
        default=0.04,
        help="AdamW weight decay at the start of the cosine weight-decay schedule (not on biases and norms).",
    )
    opt.add_argument(
        "--weight_decay_end",
        "--end_wd",
        dest="weight_decay_end",
        type=float,
        default=0.4,
        help="Weight decay at the end of training.",
    )
    opt.add_argument(
        "--clip_grad",
        type=float,
        default=3.0,
        help="Clip each parameter's gradient to this L2 norm (as DINO's code does); 0 disables.",
    )
    opt.add_argument(
        "--freeze_last_layer",
        type=int,
        default=1,
        help="Epochs during which the head's last layer is not updated (helps the start; raise it if the loss does not fall).",
    )
    g = parser.add_argument_group("DINO")
    g.add_argument(
        "--out_dim",
        type=int,
        default=1024,
        help=f"Dimension K of the head's output (the softmax). {LOW_RESOURCE_HEAD['out_dim']} with --low_resource_mode.",
    )
    g.add_argument(
        "--hidden_dim",
        type=int,
        default=2048,
        help=f"Hidden width of the head's MLP. {LOW_RESOURCE_HEAD['hidden_dim']} with --low_resource_mode.",
    )
    g.add_argument(
        "--bottleneck_dim",
        type=int,
        default=256,
        help=f"Bottleneck before the weight-normed last layer. {LOW_RESOURCE_HEAD['bottleneck_dim']} with --low_resource_mode.",
    )
    g.add_argument(
        "--momentum_teacher",
        "--base_momentum",
        dest="momentum_teacher",
        type=float,
        default=0.9995,
        help="Teacher EMA momentum at the start; it follows a cosine schedule to 1.",
    )
    g.add_argument("--student_temp", type=float, default=0.1, help="Temperature of the student's softmax.")
    g.add_argument(
        "--teacher_temp",
        type=float,
        default=0.04,
        help="Temperature of the teacher's softmax after the warm-up (lower = sharper targets).",
    )
    g.add_argument(
        "--warmup_teacher_temp",
        "--init_teacher_temp",
        dest="warmup_teacher_temp",
        type=float,
        default=0.04,
        help="Teacher temperature at the start of its linear warm-up.",
    )
    g.add_argument(
        "--warmup_teacher_temp_epochs",
        "--teacher_temp_warmup_epochs",
        dest="warmup_teacher_temp_epochs",
        type=int,
        default=0,
        help="Epochs of the teacher-temperature warm-up.",
    )
    g.add_argument(
        "--center_momentum", type=float, default=0.9, help="EMA momentum of the centre of the teacher outputs."
    )
    g.add_argument(
        "--teacher_style",
        choices=TEACHER_STYLES,
        default="original",
        help="original: the teacher is built like the student (drop path --drop_path_rate) and runs in train mode, "
        "as the original code's main_dino.py; dino: no drop path and eval mode, a deterministic teacher as in "
        "the DINO paper's recipe.",
    )
    return parser


class DINOMethod(PretrainMethod):
    """DINO: AdamW with lr warm-up and cosine decay, cosine weight decay, EMA teacher with a
    cosine momentum schedule, centring and temperature warm-up, last layer frozen for the
    first epochs, per-parameter gradient clipping. The teacher keeps the student's drop path
    and train mode, as the original code (``--teacher_style dino``: neither)."""

    name = "dino"
    resume_keys = (
        "weight_decay",
        "weight_decay_end",
        "clip_grad",
        "freeze_last_layer",
        "out_dim",
        "hidden_dim",
        "bottleneck_dim",
        "momentum_teacher",
        "student_temp",
        "teacher_temp",
        "warmup_teacher_temp",
        "warmup_teacher_temp_epochs",
        "center_momentum",
        "teacher_style",
    )
    clip_mode = "per_param"

    @staticmethod
    def adjust_args(args: argparse.Namespace) -> None:
        for k in ("out_dim", "hidden_dim", "bottleneck_dim"):
            if getattr(args, k) < 1:
                raise UserError(f"--{k} must be positive, got {getattr(args, k)}")
        for k in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if getattr(args, k) <= 0:
                raise UserError(f"--{k} must be positive, got {getattr(args, k)}")
        for k in ("momentum_teacher", "center_momentum"):
            if not 0.0 <= getattr(args, k) <= 1.0:
                raise UserError(f"--{k} must lie in [0, 1], got {getattr(args, k)}")
        if args.clip_grad < 0 or args.freeze_last_layer < 0 or args.warmup_teacher_temp_epochs < 0:
            raise UserError("--clip_grad, --freeze_last_layer and --warmup_teacher_temp_epochs must be non-negative")
        if args.low_resource_mode:
            for k, v in LOW_RESOURCE_HEAD.items():
                setattr(args, k, min(getattr(args, k), v))

    def __init__(self, args: argparse.Namespace, cfg: dict[str, Any], info: engine.DistInfo, iters_per_epoch: int):
        super().__init__(args, cfg, info, iters_per_epoch)

        def head() -> DINOHead:
            return DINOHead(encoder_out_dim(cfg), args.out_dim, args.hidden_dim, args.bottleneck_dim)

        dev = info.device
        self.student = DINOModel(build_encoder(cfg), head()).to(dev)
        # "original": the student's drop path, train mode (the original code); "dino": no drop path, eval
        # mode. Drop path has no parameters, so the weights match either way.
        paper_teacher = args.teacher_style == "dino"
        self.teacher = DINOModel(build_encoder({**cfg, "drop_path_rate": 0.0} if paper_teacher else cfg), head())
        self.teacher.to(dev)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.teacher.train(not paper_teacher)
        self.encoder = self.teacher.encoder
        self.teacher_forward: torch.nn.Module = self.teacher  # compiled with --compile
        self.train_module = engine.wrap_ddp(self.student, info)
        self.ema_params = ([p for p in self.student.parameters()], [p for p in self.teacher.parameters()])
        self.criterion = DINOLoss(
            args.out_dim,
            args.n_epochs,
            n_views=2,
            student_temp=args.student_temp,
            teacher_temp=args.teacher_temp,
            warmup_teacher_temp=args.warmup_teacher_temp,
            warmup_teacher_temp_epochs=args.warmup_teacher_temp_epochs,
            center_momentum=args.center_momentum,
        ).to(dev)
        self.base_lr = args.base_lr
        self.clip_grad = args.clip_grad
        self.optimizer = engine.make_optimizer(
            torch.optim.AdamW, engine.param_groups(self.student), args.fused_optimizer, lr=args.base_lr
        )
        n, it = args.n_epochs, iters_per_epoch
        self.lr_schedule = engine.cosine_schedule(args.base_lr, args.end_lr, n, it, args.warmup_epochs)
        self.wd_schedule = engine.cosine_schedule(args.weight_decay, args.weight_decay_end, n, it)
        self.momentum_schedule = engine.cosine_schedule(args.momentum_teacher, 1.0, n, it)

    def compile(self) -> None:
        super().compile()
        self.teacher_forward = engine.maybe_compile(self.teacher, self.args)

    def loss_fn(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, Any]]:
        dev = self.info.device
        x = torch.cat([batch["image1"], batch["image2"]]).to(dev, non_blocking=True)
        with torch.no_grad():
            teacher_out = self.teacher_forward(x)
        student_out = self.train_module(x)
        return self.criterion(student_out, teacher_out, epoch), {}

    def before_optimizer_step(self, it: int) -> None:
        if it // self.iters_per_epoch < self.args.freeze_last_layer:
            for p in self.student.head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, it: int) -> None:
        # teacher <- m * teacher + (1 - m) * student, for all tensors at once (few kernel launches)
        m = float(self.momentum_schedule[it])
        student, teacher = self.ema_params
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, student, alpha=1.0 - m)

    def epoch_record(self, epoch: int) -> dict[str, float]:
        last = min((epoch + 1) * self.iters_per_epoch - 1, len(self.momentum_schedule) - 1)
        return {
            "teacher_momentum": float(self.momentum_schedule[last]),
            "teacher_temp": float(self.criterion.teacher_temp(epoch)),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loss": self.criterion.state_dict(),  # the centre
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.criterion.load_state_dict(state["loss"])

    def extra_checkpoint(self) -> dict[str, Any]:
        return {"student_encoder": {k: v.detach().cpu() for k, v in self.student.encoder.backbone.state_dict().items()}}


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run DINO pretraining; see :func:`pretrain.run_pretraining` for the returned dict."""
    return run_pretraining(args, DINOMethod)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
