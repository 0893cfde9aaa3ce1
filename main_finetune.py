"""Fine-tune a Swin-UNETR (or UNETR) for 13-organ segmentation on FLARE 2022, and evaluate it.

The paper's recipe: DiceCE loss, AdamW lr 1e-3 after 10 warm-up epochs, cosine to 5e-5,
weight decay 1e-5 (not on biases and norms), 32 slices x 2 crops of 96 x 96 per batch
(centred on an organ with p 0.5), evaluation every 10 epochs and every epoch from epoch
90, early stopping after 20 evaluations without improvement, the best model kept.

    # the paper (README of the original), from a pretrained encoder (SimSiam or DINO .pt)
    python main_finetune.py --data_dir flare_2d/labelled --chkpt_path runs/simsiam_iou03_06.pt \\
        --embedding_size 48 --batch_size 32 --n_epochs 225 --patience 20 \\
        --ignore_user_warning --num_workers 8 --use_amp

    # the same, fastest on one GPU: bf16, augmentations on the GPU, decoded slices in memory
    python main_finetune.py --data_dir flare_2d/labelled --chkpt_path runs/simsiam_iou03_06.pt \
        --embedding_size 48 --num_workers 16 --use_amp --amp_dtype bf16 --batch_augment --cache_images --fused_optimizer

    # the table's first row: no pretraining
    python main_finetune.py --data_dir flare_2d/labelled --embedding_size 48 --use_amp --run_name scratch

    # several GPUs (evaluation is split across them; scores identical to one GPU)
    torchrun --nproc_per_node 4 main_finetune.py --data_dir flare_2d/labelled --chkpt_path runs/dino.pt --batch_size 8

    # 3D on the raw labelled NIfTI (preprocessed on the fly, cached in --cache_dir)
    python main_finetune.py --spatial_dims 3 --data_dir FLARE22Train --batch_size 2 --embedding_size 48 --use_amp

    # evaluate a fine-tuned model only, and write each predicted label volume as NIfTI
    python main_finetune.py --eval_only --data_dir flare_2d/labelled --chkpt_path runs/scratch.pt \\
        --save_predictions preds/

    # a CPU demo in a minute on phantoms (make_phantoms.py + preprocess_flare_labelled.py)
    python main_finetune.py --data_dir phantoms_2d/labelled --split_path phantoms/split.json \\
        --low_resource_mode --crop_size 64 --batch_size 2 --n_epochs 2 --warmup_epochs 0 --max_images 8 --num_workers 0

    # continue an interrupted run: the same command plus --resume (changed model / data flags are refused)
    python main_finetune.py --data_dir flare_2d/labelled --embedding_size 48 --use_amp --run_name scratch --resume

A run writes (``<chkpt_dir>/``): ``<run>.pt`` the best model (format "ioupos-finetune-v1"),
``<run>_last.pt`` the training state for ``--resume``, ``<run>_log.jsonl`` one line per
epoch (``val_dice_paper`` on evaluation epochs), ``<run>_args.json``, and in ``<run>_files/``
``val_scores.csv`` / ``val_scores.json`` (challenge-grade Dice and NSD per case and organ),
``predictions.png`` and ``result.json`` (written last: the run is finished).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import data
import engine
import finetune
import metrics
import models
from utils import TrainingError, UserError, append_jsonl, atomic_torch_save, atomic_write_json, check_fits_in_memory, run_cli

logger = logging.getLogger(__name__)

METHOD = "finetune"
#: args that must be equal to resume a run (anything that changes the model, data or schedule)
RESUME_KEYS = (
    "data_dir", "split_path", "spatial_dims", "arch", "embedding_size", "low_resource_mode", "crop_size", "n_classes",
    "n_crops_per_ct", "batch_size", "n_epochs", "base_lr", "end_lr", "warmup_epochs", "wd", "accum_iters",
    "drop_path_rate", "seed", "chkpt_path", "checkpoint_key", "max_images", "eval_every", "eval_every_from", "patience",
    "batch_augment",
)
RESUME_KEY_DEFAULTS = {"batch_augment": False}  # runs saved before the flag existed


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "main_finetune.py",
        description="Fine-tune Swin-UNETR / UNETR for FLARE 2022 organ segmentation and score it (dice_paper + per-organ Dice/NSD).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", type=str, required=True,
                   help="2D: output of preprocess_flare_labelled.py (imgs/, labels/, manifest.json). 3D: the raw labelled FLARE folder (images/ or imgs/, labels/).")
    g.add_argument("--split_path", type=str, default=data.DEFAULT_SPLIT_PATH,
                   help="JSON {'train': [...], 'val': [...]} of case ids; the default is the paper's 15 / 35 split. Change for another data set (e.g. phantoms/split.json).")
    g.add_argument("--spatial_dims", type=int, default=2, choices=(2, 3), help="2: slices (the paper); 3: volumes. Must match --data_dir.")
    g.add_argument("--n_classes", type=int, default=14, help="Output classes including background (14 for FLARE 2022); change only for another label set.")
    g.add_argument("--cache_dir", type=str, default=None,
                   help="3D only: folder for MONAI's PersistentDataset cache of the preprocessed volumes (default <chkpt_dir>/cache). Reused across runs.")
    g.add_argument("--max_images", type=int, default=0,
                   help="Use only the first N slices (2D) / volumes (3D) of the train list and of the val list; 0 = all. For demos and tests.")
    g.add_argument("--batch_augment", action="store_true",
                   help="Apply the fine-tuning augmentations on the training device as batched tensor operations "
                        "(batch_augment.BatchFinetuneAugment, same distributions as the MONAI chain); the workers then only "
                        "load and crop. Use it on a GPU when the workers cannot keep up. It changes the random stream, so "
                        "a run cannot be resumed with another value.")
    g.add_argument("--cache_images", action="store_true",
                   help="2D: decode every training slice and label once at start-up and keep them in memory as stored "
                        "(X*Y*2 bytes per slice: 0.8 GB for FLARE's 1,515 training slices of 512 x 512, per process); "
                        "the workers then skip PNG decoding; refused before decoding when it would not fit in the available memory. Same numbers.")
    g.add_argument("--num_workers", type=int, default=4,
                   help="Data loader processes; -1 measures the fastest count (engine.pick_num_workers). The crops depend on it: keep it fixed to reproduce or resume a run exactly.")

    g = p.add_argument_group("model")
    g.add_argument("--arch", type=str, default="swin", choices=models.ARCHS, help="swin: SwinUNETR (the paper); unetr: UNETR.")
    g.add_argument("--embedding_size", type=int, default=24,
                   help="Swin feature size (multiple of 12). The original's fine-tuning default is 24, pretraining 48: pass 48 with the paper's pretrained checkpoints (a mismatch is refused).")
    g.add_argument("--low_resource_mode", action="store_true", help="A tiny network (embedding 12, Swin heads 3) for CPU demos and tests.")
    g.add_argument("--drop_path_rate", type=float, default=0.0, help="Stochastic depth rate in the Swin encoder.")
    g.add_argument("--use_gradient_checkpointing", action="store_true", help="Trade compute for memory in the Swin blocks (large 3D crops).")

    g = p.add_argument_group("pretrained weights")
    g.add_argument("--chkpt_path", type=str, default=None,
                   help="Training: encoder weights to start from (our SimSiam / DINO .pt, a bare encoder state dict, or MONAI's swinViT layout); loaded strictly. With --eval_only: the fine-tuned model to evaluate. Omit to train from scratch.")
    g.add_argument("--checkpoint_key", type=str, default="teacher", choices=("teacher", "student"),
                   help="Which encoder of a DINO checkpoint to load (the teacher, as DINO recommends); ignored for other files.")

    g = p.add_argument_group("training (the paper's values)")
    g.add_argument("--crop_size", type=int, default=96, help="Side of the training crops and sliding windows (Swin: multiple of 32, at least 64).")
    g.add_argument("--n_crops_per_ct", type=int, default=2, help="Crops per slice (volume) in a batch, from RandCropByPosNegLabeld (organ-centred with p 0.5).")
    g.add_argument("--batch_size", type=int, default=32, help="Slices (volumes) per batch and process; the batch holds batch_size x n_crops_per_ct crops.")
    g.add_argument("--n_epochs", type=int, default=225, help="Maximum number of epochs (early stopping may end sooner).")
    g.add_argument("--base_lr", type=float, default=1e-3, help="AdamW learning rate after warm-up.")
    g.add_argument("--end_lr", type=float, default=5e-5, help="Learning rate at the end of the cosine schedule.")
    g.add_argument("--warmup_epochs", type=int, default=10, help="Epochs of linear learning-rate warm-up from 0.")
    g.add_argument("--wd", type=float, default=1e-5, help="AdamW weight decay (not applied to biases and norm parameters).")
    g.add_argument("--accum_iters", type=int, default=1, help="Batches accumulated per optimizer step (a larger effective batch on a small GPU).")
    g.add_argument("--seed", type=int, default=4294967295, help="Random seed (the paper's; its second seed is 381122412).")

    g = p.add_argument_group("evaluation and early stopping")
    g.add_argument("--eval_every", type=int, default=10, help="Evaluate on the validation cases every this many epochs.")
    g.add_argument("--eval_every_from", type=int, default=90, help="Evaluate every epoch from this epoch on. The last epoch is always evaluated.")
    g.add_argument("--patience", type=int, default=20, help="Stop after this many evaluations without a better validation dice_paper.")
    g.add_argument("--sw_batch_size", type=int, default=None,
                   help="Windows per forward pass of the sliding-window inference. Default: 512 in 2D (about ten 512 x 512 "
                        "slices per pass: large batches keep a GPU busy; under 1 GB of activations for Swin-UNETR at 96 x 96), "
                        "64 in 3D (the original's value). Lower it if the GPU runs out of memory; the scores do not depend on it.")
    g.add_argument("--sw_overlap", type=float, default=0.25, help="Overlap of neighbouring sliding windows (0..1).")
    g.add_argument("--cache_eval", action=argparse.BooleanOptionalAction, default=True,
                   help="2D: keep the evaluated cases in memory after their first reading, as stored in the PNGs (X*Y*2 "
                        "bytes per slice with its label: 1.9 GB for FLARE's 3,535 validation slices of 512 x 512; each "
                        "process holds its own cases). Same scores; --no-cache_eval re-reads the PNGs at every evaluation "
                        "(about 5 ms per slice). Refused at start-up when the cases would not fit in the available memory.")
    g.add_argument("--eval_train", action="store_true", help="Also evaluate on the training cases (logged as train_dice_paper; train_scores.* at the end).")
    g.add_argument("--eval_only", action="store_true",
                   help="Do not train: evaluate the fine-tuned model given by --chkpt_path (a <run>.pt) on the validation cases; the model's configuration and crop size come from that file.")
    g.add_argument("--save_predictions", type=str, default=None,
                   help="Write each evaluated case's predicted label volume to DIR/<case>.nii.gz (with DIR/labels/ and DIR/images/) in the preprocessed geometry, for a viewer or metrics.py.")
    g.add_argument("--nsd_tolerance_mm", type=float, default=None,
                   help="One NSD tolerance in mm for every organ (1.0 = FLARE 2021). Default: the per-organ tolerances of the official FLARE 2022 evaluation.")
    g.add_argument("--n_vis", type=int, default=4, help="Validation slices in the figure <run>_files/predictions.png (0: no figure).")

    g = p.add_argument_group("run, checkpoints and logging")
    g.add_argument("--run_name", type=str, default=None,
                   help="Name of the run's files in --chkpt_dir (default: finetune_<pretrained file or 'scratch'>_<dims>d_seed<seed>; with --eval_only <checkpoint>_eval).")
    g.add_argument("--chkpt_dir", type=str, default=engine.DEFAULT_CHKPT_DIR, help="Folder for every file the run writes.")
    g.add_argument("--resume", type=str, nargs="?", const="auto", default=None,
                   help="Continue a run: alone, from this run's <run>_last.pt; with a path, from that file.")
    g.add_argument("--use_wandb", action="store_true", help="Also log the epoch records to Weights & Biases.")
    g.add_argument("--wandb_project", type=str, default="ioupos-finetune", help="W&B project name.")
    g.add_argument("--ignore_user_warning", action="store_true", help="Silence Python UserWarnings (MONAI's, as the original did) during the run.")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="Show tqdm progress bars.")

    g = p.add_argument_group("hardware")
    g.add_argument("--device", type=str, default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when available.")
    engine.add_speed_args(g)
    return p


# ---------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------


def _check_args(args: argparse.Namespace) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise UserError(msg)

    need(args.n_classes >= 2, f"--n_classes must be at least 2, got {args.n_classes}")
    need(args.batch_size >= 1, f"--batch_size must be at least 1, got {args.batch_size}")
    need(args.n_crops_per_ct >= 1, f"--n_crops_per_ct must be at least 1, got {args.n_crops_per_ct}")
    need(args.n_epochs >= 1, f"--n_epochs must be at least 1, got {args.n_epochs}")
    need(0 <= args.warmup_epochs <= args.n_epochs, f"--warmup_epochs {args.warmup_epochs} must be in 0..--n_epochs ({args.n_epochs}); lower it for short runs")
    need(args.accum_iters >= 1, f"--accum_iters must be at least 1, got {args.accum_iters}")
    need(args.patience >= 1, f"--patience must be at least 1, got {args.patience}")
    need(args.eval_every >= 1, f"--eval_every must be at least 1, got {args.eval_every}")
    if args.sw_batch_size is None:
        args.sw_batch_size = 512 if args.spatial_dims == 2 else 64
    need(args.sw_batch_size >= 1, f"--sw_batch_size must be at least 1, got {args.sw_batch_size}")
    need(0 <= args.sw_overlap < 1, f"--sw_overlap must be in [0, 1), got {args.sw_overlap}")
    need(args.max_images >= 0, f"--max_images must be 0 (all) or positive, got {args.max_images}")
    need(args.n_vis >= 0, f"--n_vis must be 0 or positive, got {args.n_vis}")
    need(args.num_workers >= -1, f"--num_workers must be -1 (measure) or at least 0, got {args.num_workers}")
    need(min(args.base_lr, args.end_lr, args.wd) >= 0, "--base_lr, --end_lr and --wd must not be negative")
    need(args.nsd_tolerance_mm is None or args.nsd_tolerance_mm >= 0, f"--nsd_tolerance_mm must not be negative, got {args.nsd_tolerance_mm}")
    if args.arch == "swin":
        need(args.crop_size % 32 == 0 and args.crop_size >= 64,
             f"--crop_size {args.crop_size}: Swin-UNETR needs a multiple of 32 of at least 64 (at 32 its bottleneck is one voxel, which its InstanceNorm cannot train on)")
    else:
        need(args.crop_size % 16 == 0 and args.crop_size >= 32, f"--crop_size {args.crop_size}: UNETR needs a multiple of 16 (its patch size) of at least 32")
    if args.eval_only:
        need(args.chkpt_path is not None, "--eval_only needs --chkpt_path, the fine-tuned model to evaluate")
        need(args.resume is None, "--eval_only and --resume cannot be used together")
    engine.check_speed_args(args)
    if args.cache_images:
        need(args.spatial_dims == 2, "--cache_images keeps decoded 2D slices in memory; it is not available with --spatial_dims 3")
        need(not args.eval_only, "--cache_images caches the training slices; --eval_only does not train (--cache_eval caches evaluated cases)")


def _default_run_name(args: argparse.Namespace) -> str:
    stem = "scratch"
    if args.chkpt_path:
        stem = os.path.basename(args.chkpt_path)
        stem = stem[:-3] if stem.endswith(".pt") else stem.rsplit(".", 1)[0]
    if args.eval_only:
        return f"{stem}_eval"
    return f"finetune_{stem}_{args.arch}{args.spatial_dims}d_seed{args.seed}"


class _Data:
    """Everything the run reads: training set, evaluation cases and how to load them."""

    def __init__(self, args: argparse.Namespace, info: engine.DistInfo, need_train: bool):
        split = data.load_split(args.split_path)
        if not split["val"]:
            raise UserError(f"the split {args.split_path} has no validation cases ('val' is empty)")
        pairs = data.list_finetune_pairs(args.data_dir, split, args.spatial_dims)
        n = args.max_images
        train_items = pairs["train"][:n] if n else pairs["train"]
        val_items = pairs["val"][:n] if n else pairs["val"]
        if not val_items:
            raise UserError(f"no validation slices in {args.data_dir} for the split {args.split_path}")
        if need_train and not train_items:
            raise UserError(f"no training slices in {args.data_dir} for the split {args.split_path} ('train' is empty)")
        self.spatial_dims = args.spatial_dims
        self.n_classes = args.n_classes
        self.train_items = train_items if need_train else []
        self.eval_train = args.eval_train
        self.case_cache = None
        if args.spatial_dims == 2 and args.cache_eval:
            self.case_cache = data.CaseCache(lambda ref: data.load_case_2d(ref, args.n_classes, stored=True))
        if args.spatial_dims == 2:
            spacing = data.read_manifest_spacing(args.data_dir)
            checked = list(val_items) + (train_items if need_train or args.eval_train else [])
            data.check_label_slices(checked, args.n_classes, progress=args.progress and info.is_main)
            self.val_cases = data.group_cases_2d(val_items, spacing, args.data_dir)
            self.train_cases = data.group_cases_2d(train_items, spacing, args.data_dir) if args.eval_train else []
            self.train_ds = None
            if need_train:
                cache = None
                if args.cache_images:
                    paths = [p for it in self.train_items for p in (it["image"], it["label"])]
                    cache = data.SliceCache.build(paths, f"{len(self.train_items):,} training slices and their labels", "--cache_images",
                                             copies=info.local_world_size, progress=args.progress and info.is_main)
                self.train_ds = finetune.train_dataset_2d(self.train_items, args.crop_size, args.n_crops_per_ct,
                                                          augment=not args.batch_augment, cache=cache)
            if self.case_cache is not None:  # filled at the first evaluation; refused now if it cannot fit
                evaluated = list(val_items) + (list(train_items) if args.eval_train else [])
                need = data.SliceCache.planned_nbytes([p for it in evaluated for p in (it["image"], it["label"])],
                                                 progress=args.progress and info.is_main)
                check_fits_in_memory(need, f"--cache_eval: {len(evaluated):,} evaluated slices and their labels",
                                     "pass --no-cache_eval to read them from the PNGs at every evaluation")
        else:
            config = finetune.preprocess_config_3d()
            folder = finetune.prepare_cache_3d(args.cache_dir, config)
            logger.info("3D preprocessing cache: %s", folder)
            eval_train_items = train_items if args.eval_train else []
            all_items = list({it["case"]: it for it in (list(self.train_items) + eval_train_items + list(val_items))}.values())
            self.pre_ds = finetune.preprocessed_dataset_3d(all_items, folder, config)
            self.index = {it["case"]: i for i, it in enumerate(all_items)}
            from tqdm import tqdm

            for i, it in enumerate(tqdm(all_items, desc="preprocessing (cached)", disable=not (args.progress and info.is_main), leave=False)):
                finetune.load_preprocessed_3d(self.pre_ds, i, it, args.n_classes)  # fills the cache, checks labels
            pixdim = tuple(config["pixdim"])
            self._items = all_items
            self.val_cases = [data.CaseRef(case=it["case"], spacing=pixdim, index=self.index[it["case"]]) for it in val_items]
            self.train_cases = [data.CaseRef(case=it["case"], spacing=pixdim, index=self.index[it["case"]]) for it in eval_train_items]
            self.train_ds = finetune.train_dataset_3d(self.train_items, folder, config, args.crop_size, args.n_crops_per_ct,
                                                      augment=not args.batch_augment) if need_train else None

    def load_case(self, ref: data.CaseRef) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.spatial_dims == 2:
            if self.case_cache is not None:
                return self.case_cache.load(ref)
            return data.load_case_2d(ref, self.n_classes)
        d = finetune.load_preprocessed_3d(self.pre_ds, ref.index, self._items[ref.index], self.n_classes)
        image = np.asarray(d["image"][0], dtype=np.float32)
        label = np.asarray(d["label"][0]).round().astype(np.uint8)
        return image, label, np.asarray(d["affine"], dtype=np.float64)


# ---------------------------------------------------------------------------------------
# Evaluation and outputs
# ---------------------------------------------------------------------------------------


def _eval(model: nn.Module, cases, dat: _Data, args, info, amp: engine.Amp, full: bool, desc: str, save_dir: str | None = None) -> finetune.EvalResult:
    tol = metrics.FLARE22_TOLERANCE_MM if args.nsd_tolerance_mm is None else float(args.nsd_tolerance_mm)
    n_cached = len(dat.case_cache.cases) if dat.case_cache is not None else 0
    res = finetune.evaluate(
        model, cases, dat.load_case, spatial_dims=args.spatial_dims, n_classes=args.n_classes, crop_size=args.crop_size,
        sw_batch_size=args.sw_batch_size, sw_overlap=args.sw_overlap, device=info.device, autocast=amp.autocast, info=info,
        full=full, tolerance_mm=tol, n_vis=args.n_vis if desc == "val" else 0, save_dir=save_dir, progress=args.progress, desc=desc,
    )
    if dat.case_cache is not None and len(dat.case_cache.cases) > n_cached:
        logger.info("--cache_eval: %d cases in memory (%.2f GB)", len(dat.case_cache.cases), dat.case_cache.nbytes / 1e9)
    return res


def _final_outputs(model: nn.Module, dat: _Data, args, info, amp, paths: dict[str, str], val_result: finetune.EvalResult | None = None) -> dict[str, Any]:
    """Challenge-grade scores, figure and summary of ``model`` on the validation (and train) cases.

    ``val_result``: a full evaluation of this very model done during training (the last
    epoch's, when it was the best; it also wrote ``--save_predictions``), used instead of
    predicting the validation cases again.
    """
    if args.save_predictions and info.is_main:
        os.makedirs(args.save_predictions, exist_ok=True)
    if info.distributed:
        torch.distributed.barrier()
    res = val_result
    if res is None or res.per_case is None:
        res = _eval(model, dat.val_cases, dat, args, info, amp, full=True, desc="val", save_dir=args.save_predictions)
    out: dict[str, Any] = {"dice_paper": res.dice_paper, "n_val_items": res.n_items}
    summary = metrics.summarize_case_scores(res.per_case)
    out["summary"] = {k: v for k, v in summary.items() if k != "per_case"}
    out["summary"]["dice_paper"] = res.dice_paper
    if info.is_main:
        files = metrics.write_scores(res.per_case, paths["dir"], prefix="val")
        out["scores"], out["scores_csv"] = files["json"], files["csv"]
        if res.vis:
            img, lab, prd, titles = zip(*res.vis)
            out["figure"] = metrics.plot_predictions(img, lab, prd, os.path.join(paths["dir"], "predictions.png"), titles=titles, n_classes=args.n_classes)
        print(f"dice_paper (the paper's score: per-slice Dice incl. background, mean over {res.n_items} slices/volumes): {res.dice_paper:.4f}")
        print(metrics.format_summary(summary))
    else:
        out["scores"] = os.path.join(paths["dir"], "val_scores.json")
    if args.eval_train and dat.train_cases:
        tr = _eval(model, dat.train_cases, dat, args, info, amp, full=True, desc="train")
        out["train_dice_paper"] = tr.dice_paper
        out["train_summary"] = {k: v for k, v in metrics.summarize_case_scores(tr.per_case).items() if k != "per_case"}
        if info.is_main:
            out["train_scores"] = metrics.write_scores(tr.per_case, paths["dir"], prefix="train")["json"]
    if args.save_predictions:
        out["predictions_dir"] = os.path.abspath(args.save_predictions)
    return out


def _load_pretrained(model: nn.Module, args, cfg) -> int:
    n = models.load_pretrained_encoder(model, args.chkpt_path, cfg, args.checkpoint_key)
    logger.info("loaded %d encoder tensors from %s (--checkpoint_key %s)", n, args.chkpt_path, args.checkpoint_key)
    return n


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune (or with ``--eval_only`` evaluate) and return the run's result dict.

    Returns:
        ``{"run_name", "weights", "log", "epochs_done", "best_dice_paper", "best_epoch",
        "scores", "summary": {"dice_mean", "nsd_mean", "dice_paper", ...}, ...}``, also
        written to ``<run>_files/result.json``.

    Raises:
        UserError: bad input (exit code 2 from the command line).
        TrainingError: a non-finite loss.
    """
    args = argparse.Namespace(**vars(args))
    _check_args(args)
    for key in ("data_dir", "split_path", "chkpt_path", "chkpt_dir", "save_predictions", "cache_dir"):
        if getattr(args, key, None):
            setattr(args, key, os.path.abspath(getattr(args, key)))
    if args.cache_dir is None:
        args.cache_dir = os.path.join(args.chkpt_dir, "cache")
    if args.run_name is None:
        args.run_name = _default_run_name(args)
    with warnings.catch_warnings():
        if args.ignore_user_warning:
            warnings.simplefilter("ignore", UserWarning)
        info = engine.init_distributed(args.device)
        try:
            if args.eval_only:
                return _eval_only(args, info)
            return _train(args, info)
        finally:
            if info.distributed:
                engine.cleanup_distributed()


def _eval_only(args, info) -> dict[str, Any]:
    paths = engine.run_paths(args.chkpt_dir, args.run_name)
    logger.info("evaluating %s; outputs in %s", args.chkpt_path, paths["dir"])
    model, cfg, ckpt = finetune.load_finetuned(args.chkpt_path)
    if cfg["spatial_dims"] != args.spatial_dims:
        raise UserError(f"--chkpt_path {args.chkpt_path!r} is a {cfg['spatial_dims']}D model but --spatial_dims is {args.spatial_dims}")
    if int(ckpt["n_classes"]) != args.n_classes:
        raise UserError(f"--chkpt_path {args.chkpt_path!r} predicts {ckpt['n_classes']} classes but --n_classes is {args.n_classes}")
    saved_crop = int(ckpt.get("args", {}).get("crop_size", args.crop_size))
    if saved_crop != args.crop_size:
        logger.info("using the model's training crop size %d for the sliding window (not --crop_size %d)", saved_crop, args.crop_size)
        args.crop_size = saved_crop
    if info.is_main:
        os.makedirs(paths["dir"], exist_ok=True)
    model.to(info.device)
    amp = engine.Amp(info.device, args.use_amp, args.amp_dtype)
    dat = _Data(args, info, need_train=False)
    out = _final_outputs(model, dat, args, info, amp, paths)
    result = {
        "run_name": args.run_name, "weights": args.chkpt_path, "log": None, "epochs_done": 0,
        "best_dice_paper": out["dice_paper"], "best_epoch": int(ckpt.get("epoch", 0)), **out,
    }
    if info.is_main:
        atomic_write_json(os.path.join(paths["dir"], "result.json"), result)
    return result


def _repair_log(path: str, epochs_done: int, record: dict[str, Any] | None) -> None:
    """After a resume: drop log lines of epochs to be redone; add the last epoch's line if the kill came before it."""
    engine.truncate_log(path, epochs_done)
    logged = []
    if os.path.exists(path):
        with open(path) as f:
            logged = [json.loads(ln).get("epoch", 0) for ln in f if ln.strip()]
    if record is not None and int(record.get("epoch", 0)) == epochs_done and epochs_done not in logged:
        append_jsonl(path, record)


def _should_eval(epoch: int, args) -> bool:
    """Evaluate after ``epoch`` (1-based): every ``eval_every`` epochs, every epoch from ``eval_every_from``, and the last."""
    return epoch % args.eval_every == 0 or epoch >= args.eval_every_from or epoch == args.n_epochs


def _train(args, info) -> dict[str, Any]:
    paths = engine.run_paths(args.chkpt_dir, args.run_name)
    logger.info("run %r: files in %s", args.run_name, paths["chkpt_dir"])
    resume_path = engine.resolve_resume(args.resume, paths)
    engine.prepare_run_dir(paths, resume=resume_path is not None, info=info)
    cfg = models.encoder_config_from_args(args)
    state = None
    if resume_path is not None:
        state = engine.load_training_state(resume_path)
        if state.get("method") != METHOD:
            raise UserError(f"--resume {resume_path!r} is a {state.get('method')!r} training state, not a fine-tuning one")
        engine.check_resume_args({**RESUME_KEY_DEFAULTS, **state["args"]}, engine.args_dict(args), RESUME_KEYS, resume_path)

    engine.fix_random_seeds(args.seed)
    model = models.build_segmenter(cfg, args.n_classes)
    n_loaded = _load_pretrained(model, args, cfg) if args.chkpt_path and state is None else None
    if state is not None and args.chkpt_path:
        n_loaded = state.get("pretrained_tensors")
    model.to(info.device)
    dat = _Data(args, info, need_train=True)
    n_workers = args.num_workers if args.num_workers >= 0 else engine.pick_num_workers(dat.train_ds, args.batch_size)
    per_step = args.batch_size * info.world_size * args.accum_iters
    iters_per_epoch = len(dat.train_ds) // per_step
    if iters_per_epoch == 0:
        raise UserError(f"{len(dat.train_ds)} training slices are fewer than one optimizer step needs ({per_step} = batch_size x processes x accum_iters)")
    logger.info("%d training slices/volumes (x %d crops), %d validation cases, %d steps per epoch",
                len(dat.train_ds), args.n_crops_per_ct, len(dat.val_cases), iters_per_epoch)

    optimizer = engine.make_optimizer(torch.optim.AdamW, engine.param_groups(model), args.fused_optimizer, lr=args.base_lr)
    amp = engine.Amp(info.device, args.use_amp, args.amp_dtype)
    lr_schedule = engine.cosine_schedule(args.base_lr, args.end_lr, args.n_epochs, iters_per_epoch, args.warmup_epochs)
    wd_schedule = np.full(args.n_epochs * iters_per_epoch, args.wd)
    from monai.losses import DiceCELoss

    criterion = DiceCELoss(to_onehot_y=True, softmax=True)
    best = {"dice_paper": -math.inf, "epoch": 0, "bad_evals": 0, "stopped": False}
    best_result: finetune.EvalResult | None = None  # the best evaluation, when it was a full one
    start_epoch, wandb_id = 0, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        amp.load_state_dict(state.get("amp", {}))
        engine.set_rng_state(state["rng"])
        best = dict(state["best"])
        start_epoch, wandb_id = int(state["epoch"]), state.get("wandb_id")
        if info.is_main:
            _repair_log(paths["log"], start_epoch, state.get("record"))
        logger.info("resumed %s after epoch %d (best dice_paper %.4f at epoch %d)", resume_path, start_epoch, best["dice_paper"], best["epoch"])
    engine.write_args(paths, engine.args_dict(args), info)
    train_model: nn.Module = model
    if info.distributed:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    train_model = engine.maybe_compile(train_model, args)  # --compile: the training forward only (evaluation stays eager)

    aug = None  # --batch_augment: the augmentations on the device, seeded per (seed, epoch, rank)

    def loss_fn(batch):
        x = batch["image"].to(info.device, non_blocking=True)
        y = batch["label"].to(info.device, non_blocking=True)
        if aug is not None:
            with torch.no_grad(), torch.autocast(device_type=info.device.type, enabled=False):
                x, y = aug(x, y)
        return criterion(train_model(x), y), {}

    elog = engine.EpochLogger(paths, info, args.use_wandb, args.wandb_project, engine.args_dict(args), wandb_id)
    try:
        epoch = start_epoch
        while epoch < args.n_epochs and not best["stopped"]:
            t0 = time.time()
            engine.fix_random_seeds(engine.derived_seed(args.seed, epoch, info.rank))  # drop path etc.: a function of the epoch
            loader = engine.build_loader(dat.train_ds, args.batch_size, n_workers, args.seed, epoch, info, pin_memory=info.device.type == "cuda")
            if args.batch_augment:
                from batch_augment import BatchFinetuneAugment

                gen = torch.Generator(device=info.device)
                gen.manual_seed(engine.derived_seed(args.seed, epoch, info.rank, 2))
                aug = BatchFinetuneAugment(args.spatial_dims, gen)
            stats = engine.train_one_epoch(
                train_model, loader, optimizer, loss_fn, epoch=epoch, n_epochs=args.n_epochs, iters_per_epoch=iters_per_epoch,
                lr_schedule=lr_schedule, base_lr=args.base_lr, wd_schedule=wd_schedule, amp=amp, accum_iters=args.accum_iters,
                info=info, progress=args.progress, check_every=args.check_every,
            )
            del loader
            epoch += 1
            record: dict[str, Any] = {"epoch": epoch, "train_loss": stats["loss"], "lr": stats["lr"]}
            if _should_eval(epoch, args):
                # the last epoch gets the full scores at once: if it is the best, they are the final ones
                full = epoch == args.n_epochs
                if full and args.save_predictions and info.is_main:
                    os.makedirs(args.save_predictions, exist_ok=True)
                if full and info.distributed:
                    torch.distributed.barrier()
                res = _eval(model, dat.val_cases, dat, args, info, amp, full=full, desc="val", save_dir=args.save_predictions if full else None)
                record["val_dice_paper"] = res.dice_paper
                if args.eval_train and dat.train_cases:
                    record["train_dice_paper"] = _eval(model, dat.train_cases, dat, args, info, amp, full=False, desc="train").dice_paper
                if res.dice_paper > best["dice_paper"]:
                    best.update(dice_paper=res.dice_paper, epoch=epoch, bad_evals=0)
                    best_result = res if full else None
                    if info.is_main:
                        atomic_torch_save(finetune.finetuned_checkpoint(model, cfg, args.n_classes, engine.args_dict(args), epoch, res.dice_paper), paths["weights"])
                else:
                    best["bad_evals"] += 1
                    best["stopped"] = best["bad_evals"] >= args.patience
                record.update(best_dice_paper=best["dice_paper"], best_epoch=best["epoch"])
                logger.info("epoch %d: val dice_paper %.4f (best %.4f at epoch %d)", epoch, res.dice_paper, best["dice_paper"], best["epoch"])
            record["time_s"] = round(time.time() - t0, 3)
            # the state first, then the log line: a kill in between is repaired on resume from the record in the state
            engine.save_training_state(paths["last"], {
                "method": METHOD, "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "amp": amp.state_dict(), "rng": engine.rng_state(), "best": dict(best), "wandb_id": elog.wandb_id,
                "args": engine.args_dict(args), "pretrained_tensors": n_loaded, "record": record,
            }, info)
            elog.log(record)
            if best["stopped"]:
                logger.info("early stopping after epoch %d: %d evaluations without improvement", epoch, best["bad_evals"])
        if info.distributed:
            torch.distributed.barrier()
        if not os.path.isfile(paths["weights"]):
            raise TrainingError(f"the best model {paths['weights']!r} is missing; the run cannot be evaluated")
        model.load_state_dict(models.torch_load(paths["weights"])["model"])
        out = _final_outputs(model, dat, args, info, amp, paths, val_result=best_result)
        if abs(out["dice_paper"] - best["dice_paper"]) > 1e-6:
            logger.warning("the final dice_paper %.6f differs from the best one during training %.6f", out["dice_paper"], best["dice_paper"])
        result = {
            "run_name": args.run_name, "weights": paths["weights"], "log": paths["log"], "epochs_done": epoch,
            "best_dice_paper": best["dice_paper"], "best_epoch": best["epoch"], "stopped_early": bool(best["stopped"]),
            "pretrained": args.chkpt_path, "pretrained_tensors": n_loaded, **out,
        }
        if info.is_main:
            atomic_write_json(os.path.join(paths["dir"], "result.json"), result)
        return result
    finally:
        elog.finish()


if __name__ == "__main__":
    run_cli(main, get_args_parser())
