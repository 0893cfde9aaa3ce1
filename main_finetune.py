"""Fine-tune a Swin-UNETR (or UNETR) for organ segmentation (FLARE 2022's 13 organs, or any label set), and evaluate it.

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
    srun --ntasks 4 --gpus 4 python main_finetune.py --data_dir flare_2d/labelled --chkpt_path runs/dino.pt --batch_size 8   # SLURM

    # 3D on the raw labelled NIfTI (preprocessed on the fly, cached in --cache_dir)
    python main_finetune.py --spatial_dims 3 --data_dir FLARE22Train --batch_size 2 --embedding_size 48 --use_amp

    # evaluate a fine-tuned model only, write each predicted label volume as NIfTI, and score them again
    python main_finetune.py --eval_only --data_dir flare_2d/labelled --chkpt_path runs/scratch.pt \\
        --save_predictions preds/
    python metrics.py --pred_dir preds/ --label_dir preds/reference_labels

    # a CPU demo in a minute on phantoms (make_phantoms.py + preprocess_flare_labelled.py)
    python main_finetune.py --data_dir phantoms_2d/labelled --split_path phantoms/split.json \\
        --low_resource_mode --crop_size 64 --batch_size 2 --n_epochs 2 --warmup_epochs 0 --max_images 8 --num_workers 0

    # your own data (preprocess_labelled.py output of an nnU-Net / Decathlon data set): classes, names and the
    # split come from the folder; NSD tolerance 2 mm; the label budget: only the first 5 training cases
    python main_finetune.py --data_dir liver_2d --embedding_size 48 --nsd_tolerance_mm 2 --n_train_cases 5

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
from typing import Any

import data
import engine
import metrics
from finetune import run_finetuning
from utils import run_cli

_HELP = {
    "data_dir": "2D: output of preprocess_flare_labelled.py / preprocess_labelled.py (imgs/, labels/, manifest.json), "
    "or of the original code's script (imgs/<stem>_<i>.png, labels/<stem>_<i>.png, no manifest: --size_x/y/z give the "
    "voxel size of the scores). 3D: a raw labelled data set (FLARE 2022 images/ and labels/, nnU-Net v2 raw or "
    "Decathlon with a dataset.json). Required.",
    "max_images": "Use only the first N slices (2D) / volumes (3D) of the train list and of the val list; 0 = all. For "
    "demos and tests.",
    "batch_augment": "Apply the fine-tuning augmentations on the training device as batched tensor operations "
    "(batch_augment.BatchFinetuneAugment, same distributions as the MONAI chain); the workers then only "
    "load and crop. Use it on a GPU when the workers cannot keep up. It changes the random stream, so "
    "a run cannot be resumed with another value.",
    "cache_images": "2D: decode every training slice and label once at start-up and keep them in memory as stored "
    "(X*Y*2 bytes per slice: 0.8 GB for FLARE's 1,515 training slices of 512 x 512, per process); the "
    "workers then skip PNG decoding; refused before decoding when it would not fit in the available "
    "memory. Same numbers.",
    "crop_size": "Side of the training crops and sliding windows (Swin: multiple of 32, at least 64; UNETR: multiple of "
    "16, at least 32).",
    "embedding_size": "Swin feature size (multiple of 12); 48 in the paper (the original's default, 24, was a debugging "
    "value its README command overrides). Must match the pretrained checkpoint (a mismatch is refused).",
    "low_resource_mode": "A tiny network (embedding 12, Swin heads 3) for CPU demos and tests.",
    "drop_path_rate": "Stochastic depth rate in the Swin encoder.",
    "batch_size": "Slices (volumes) per batch and process; the batch holds batch_size x n_crops_per_ct crops.",
    "n_epochs": "Maximum number of epochs (early stopping may end sooner).",
    "base_lr": "AdamW learning rate after warm-up.",
    "run_name": "Name of the run's files in --chkpt_dir (default: finetune_<pretrained file or 'scratch'>_<dims>d_seed<seed>; "
    "with --eval_only <checkpoint>_eval).",
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "main_finetune.py",
        description="Fine-tune Swin-UNETR / UNETR for FLARE 2022 organ segmentation and score it (dice_paper + per-organ Dice/NSD).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    groups = engine.add_training_args(
        p,
        {
            "num_workers": 4,
            "embedding_size": 48,
            "drop_path_rate": 0.0,
            "batch_size": 32,
            "n_epochs": 225,
            "base_lr": 1e-3,
            "end_lr": 5e-5,
            "warmup_epochs": 10,
            "wandb_project": "ioupos-finetune",
        },
        _HELP,
    )
    g = groups["data"]
    g.add_argument(
        "--split_path",
        type=str,
        default=None,
        help="JSON {'train': [...], 'val': [...]} of case ids, or nnU-Net's splits_final.json with --fold. Default: "
        f"<data_dir>/{data.SPLIT_NAME} when the preprocessing wrote one (nnU-Net / Decathlon data, or --val_fraction); "
        "else for FLARE data the paper's 15 / 35 split (data/split.json); 3D nnU-Net data: its splits_final.json.",
    )
    g.add_argument(
        "--fold",
        type=int,
        default=None,
        help="The fold of an nnU-Net splits_final.json (--split_path, or the 3D data set's own; default 0 there).",
    )
    g.add_argument(
        "--val_fraction",
        type=float,
        default=None,
        help="Instead of a split file: split the cases of --data_dir here, deterministically, with this fraction of "
        f"validation cases (written to <run>_files/{data.SPLIT_NAME}); --split_seed chooses the split.",
    )
    g.add_argument(
        "--split_seed",
        type=int,
        default=0,
        help="Seed of the --val_fraction split (the same seed and cases give the same split everywhere).",
    )
    g.add_argument(
        "--n_train_cases",
        type=int,
        default=0,
        help="Train on the first N training cases of the split only (its order: the label-budget axis of "
        "reproduce_table.py); 0 = all. The validation cases stay the same.",
    )
    g.add_argument(
        "--n_classes",
        type=int,
        default=None,
        help="Output classes including background. Default: the label set of --data_dir (recorded in its manifest.json "
        "by the preprocessing; 3D: its dataset.json; FLARE 2022: 14); a different value is refused.",
    )
    g.add_argument(
        "--cache_dir",
        type=str,
        default=None,
        help="3D only: folder for MONAI's PersistentDataset cache of the preprocessed volumes (default <chkpt_dir>/cache). Reused across runs.",
    )
    g.add_argument(
        "--n_crops_per_ct",
        type=int,
        default=2,
        help="Crops per slice (volume) in a batch, from RandCropByPosNegLabeld (organ-centred with p 0.5).",
    )

    g = p.add_argument_group("pretrained weights")
    g.add_argument(
        "--chkpt_path",
        type=str,
        default=None,
        help="Training: encoder weights to start from (our SimSiam / DINO .pt, a bare encoder state dict, or MONAI's swinViT layout); loaded strictly. With --eval_only: the fine-tuned model to evaluate. Omit to train from scratch.",
    )
    g.add_argument(
        "--checkpoint_key",
        type=str,
        default="teacher",
        choices=("teacher", "student"),
        help="Which encoder of a DINO checkpoint to load (the teacher, as DINO recommends); ignored for other files.",
    )

    groups["optim"].add_argument(
        "--wd", type=float, default=1e-5, help="AdamW weight decay (not applied to biases and norm parameters)."
    )
    groups["optim"].add_argument(
        "--drop_last",
        action="store_true",
        help="Skip the last incomplete batch of every epoch (and a last incomplete --accum_iters step). By default "
        "it is trained on, as the original: ceil(slices / (batch_size x processes)) steps per epoch, the learning-rate "
        "schedule counting them.",
    )

    g = p.add_argument_group("evaluation and early stopping")
    g.add_argument(
        "--eval_every", type=int, default=10, help="Evaluate on the validation cases every this many epochs."
    )
    g.add_argument(
        "--eval_every_from",
        type=int,
        default=90,
        help="Evaluate every epoch from this epoch on. The last epoch is always evaluated.",
    )
    g.add_argument(
        "--patience",
        type=float,
        default=20,
        help="Stop after this many evaluations without a better validation dice_paper (20 in the paper). A whole "
        "number; written as a float too (20.0), as the original's flag is a float.",
    )
    g.add_argument(
        "--sw_batch_size",
        type=int,
        default=None,
        help="Windows per forward pass of the sliding-window inference. Default: 512 in 2D (about ten 512 x 512 "
        "slices per pass: large batches keep a GPU busy; under 1 GB of activations for Swin-UNETR at 96 x 96), "
        "64 in 3D (the original's value). Lower it if the GPU runs out of memory; the scores do not depend on it.",
    )
    g.add_argument("--sw_overlap", type=float, default=0.25, help="Overlap of neighbouring sliding windows (0..1).")
    g.add_argument(
        "--cache_eval",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="2D: keep the evaluated cases in memory after their first reading, as stored in the PNGs (X*Y*2 "
        "bytes per slice with its label: 1.9 GB for FLARE's 3,535 validation slices of 512 x 512; each "
        "process holds its own cases). Same scores; --no-cache_eval re-reads the PNGs at every evaluation "
        "(about 5 ms per slice). Refused at start-up when the cases would not fit in the available memory.",
    )
    g.add_argument(
        "--eval_train",
        action="store_true",
        help="Also evaluate on the training cases (logged as train_dice_paper; train_scores.* at the end).",
    )
    g.add_argument(
        "--eval_only",
        action="store_true",
        help="Do not train: evaluate the fine-tuned model given by --chkpt_path (a <run>.pt) on the validation cases; the model's configuration and crop size come from that file.",
    )
    g.add_argument(
        "--save_predictions",
        type=str,
        default=None,
        help="Write each validation case's predicted label volume to DIR/<case>.nii.gz, with its label and image in "
        "DIR/reference_labels/ and DIR/reference_images/ (same preprocessed geometry), for a viewer or metrics.py "
        "(for labels in each scan's own geometry use predict.py). Checked at start-up: it must be writable and "
        "apart from the inputs, and files there that this project did not write are refused (see --overwrite).",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="Let --save_predictions replace files that this project did not write there (by default they are "
        "refused, so that a folder of raw data or a user's files is never overwritten).",
    )
    g.add_argument(
        "--nsd_tolerance_mm",
        type=metrics.number_or_json,
        default=None,
        help="NSD tolerance in mm: one number for every class (1.0 = FLARE 2021), or a JSON object (or .json file) of "
        "label id -> mm. Default for FLARE 2022's organs: the per-organ tolerances of the official evaluation; "
        "required for any other label set. Recorded with the scores.",
    )
    g.add_argument(
        "--n_vis",
        type=int,
        default=4,
        help="Validation slices in the figure <run>_files/predictions.png (0: no figure).",
    )

    groups["run"].add_argument(
        "--ignore_user_warning",
        action="store_true",
        help="Silence Python UserWarnings (MONAI's, as the original did) during the run.",
    )
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune (or with ``--eval_only`` evaluate); see :func:`finetune.run_finetuning` for the returned dict."""
    return run_finetuning(args)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
