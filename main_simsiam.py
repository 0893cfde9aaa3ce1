"""SimSiam pretraining of a Swin-UNETR (or UNETR) encoder on IoU-based positive pairs.

Each image gives two crops whose IoU lies in [--min_iou, --max_iou]; each crop gets its
own augmentations; the network learns to predict one view's projection from the other's
(Chen & He, 2021). The encoder weights land in ``<chkpt_dir>/<run_name>.pt`` after every
epoch, ready for ``main_finetune.py --chkpt_path``.

The paper's run (2D slices from preprocess_flare_unlabelled.py, one GPU)::

    python main_simsiam.py --data_dir <DIR_WITH_PREPROCESSED_2D_PNGS> --embedding_size 48 \\
        --batch_size 128 --n_epochs 100 --base_lr 0.025 --min_iou 0.3 --max_iou 0.6 \\
        --num_workers 8 --use_amp

3D volumes (preprocess_flare_unlabelled.py --spatial_dims 3)::

    python main_simsiam.py --data_dir <DIR_WITH_NIFTI> --spatial_dims 3 --crop_size 64 \\
        --batch_size 8 --min_iou 0.3 --max_iou 0.6 --use_amp

Several GPUs (the batch size is per GPU), and resuming an interrupted run::

    torchrun --nproc_per_node 4 main_simsiam.py --data_dir D --batch_size 32 --run_name s1 --use_amp
    torchrun --nproc_per_node 4 main_simsiam.py --data_dir D --batch_size 32 --run_name s1 --use_amp --resume
    # or in a SLURM allocation (sbatch --ntasks 4 --gpus 4): srun starts the 4 ranks
    srun python main_simsiam.py --data_dir D --batch_size 32 --run_name s1 --use_amp

Faster on one GPU (issue 7): the view augmentations as batched tensor operations on the GPU,
and the decoded slices kept in RAM (X*Y bytes per slice: 8.75 GB per 100k slices of 350 x 250)::

    python main_simsiam.py --data_dir <DIR_WITH_PREPROCESSED_2D_PNGS> --embedding_size 48 \\
        --batch_size 128 --min_iou 0.3 --max_iou 0.6 --num_workers 16 --use_amp --amp_dtype bf16 \\
        --batch_augment --cache_images

A quick look on the CPU (a minute on a laptop)::

    python make_phantoms.py --output_dir /tmp/ph --n_labelled 0 --n_unlabelled 2 --size_xy 96 --n_slices 12
    python preprocess_flare_unlabelled.py --data_dir /tmp/ph/unlabelled --output_dir /tmp/ph2d
    python main_simsiam.py --data_dir /tmp/ph2d --low_resource_mode --crop_size 32 --n_epochs 2 \\
        --chkpt_dir /tmp/runs --min_iou 0.3 --max_iou 0.6
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

import engine
from models import SimSiam, SimSiamLoss, build_encoder, collapse_coefficient, convert_sync_batchnorm
from pretrain import PretrainMethod, add_common_args, run_pretraining
from utils import UserError, run_cli

LOW_RESOURCE_PROJ_DIM = 256
LOW_RESOURCE_PRED_DIM = 64


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pretrain a Swin-UNETR / UNETR encoder with SimSiam on crop pairs whose IoU lies in [min_iou, max_iou].",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    groups = add_common_args(parser, "simsiam", {"base_lr": 0.025, "warmup_epochs": 0, "end_lr": 1e-6})
    groups["optim"].add_argument(
        "--wd", type=float, default=1e-5, help="Weight decay of SGD (not applied to biases and norm parameters)."
    )
    g = parser.add_argument_group("SimSiam")
    g.add_argument(
        "--proj_dim",
        type=int,
        default=2048,
        help=f"Width of the projection MLP and of z and p (2048 in SimSiam; {LOW_RESOURCE_PROJ_DIM} with --low_resource_mode).",
    )
    g.add_argument(
        "--pred_dim",
        type=int,
        default=512,
        help=f"Hidden width of the prediction MLP (512 in SimSiam; {LOW_RESOURCE_PRED_DIM} with --low_resource_mode).",
    )
    return parser


class SimSiamMethod(PretrainMethod):
    """SimSiam: SGD (momentum 0.9) on encoder + projector with a per-iteration cosine lr,
    the predictor at the fixed base lr, weight decay except on biases and norms; heads with
    synchronised BatchNorm across processes."""

    name = "simsiam"
    resume_keys = ("wd", "proj_dim", "pred_dim")

    @staticmethod
    def adjust_args(args: argparse.Namespace) -> None:
        if args.proj_dim < 1 or args.pred_dim < 1:
            raise UserError(f"--proj_dim and --pred_dim must be positive, got {args.proj_dim} and {args.pred_dim}")
        if args.wd < 0:
            raise UserError(f"--wd must be non-negative, got {args.wd}")
        if args.low_resource_mode:
            args.proj_dim = min(args.proj_dim, LOW_RESOURCE_PROJ_DIM)
            args.pred_dim = min(args.pred_dim, LOW_RESOURCE_PRED_DIM)

    def __init__(self, args: argparse.Namespace, cfg: dict[str, Any], info: engine.DistInfo, iters_per_epoch: int):
        super().__init__(args, cfg, info, iters_per_epoch)
        model = SimSiam(build_encoder(cfg), dim=args.proj_dim, pred_dim=args.pred_dim)
        if info.distributed:
            model = convert_sync_batchnorm(model, info.device)
        self.model = model.to(info.device)
        self.encoder = self.model.encoder
        self.train_module = engine.wrap_ddp(self.model, info)
        self.criterion = SimSiamLoss()
        self.base_lr = args.base_lr
        self.optimizer = engine.make_optimizer(
            torch.optim.SGD,
            engine.param_groups(self.model, fixed_lr_prefixes=("predictor.",)),
            args.fused_optimizer,
            lr=args.base_lr,
            momentum=0.9,
        )
        self.lr_schedule = engine.cosine_schedule(
            args.base_lr, args.end_lr, args.n_epochs, iters_per_epoch, args.warmup_epochs
        )
        self.wd_schedule = np.full(args.n_epochs * iters_per_epoch, args.wd)

    def loss_fn(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, Any]]:
        dev = self.info.device
        x1 = batch["image1"].to(dev, non_blocking=True)
        x2 = batch["image2"].to(dev, non_blocking=True)
        p1, p2, z1, z2 = self.train_module(x1, x2)
        loss = self.criterion(p1, p2, z1, z2)
        collapse = 0.5 * (collapse_coefficient(p1) + collapse_coefficient(p2))
        return loss, {"collapse": collapse}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run SimSiam pretraining; see :func:`pretrain.run_pretraining` for the returned dict."""
    return run_pretraining(args, SimSiamMethod)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
