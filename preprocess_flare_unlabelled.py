"""Preprocess unlabelled CT (FLARE 2022, any folder of NIfTI, the images of a labelled data set) into 2D PNG
slices (or 3D volumes) for pretraining.

Reads every ``*.nii.gz`` / ``*.nii`` under ``--data_dir`` (recursively; case id = file
name without extension and ``_0000``), or, when ``--data_dir`` is a labelled data set
(FLARE 2022 ``images/`` + ``labels/``, nnU-Net v2 raw or Decathlon with a ``dataset.json``;
see ``preprocess_flare_labelled.py``), its images only (training and test, never the label
maps; ``--channel k`` for a multi-channel nnU-Net data set), and writes ``<output_dir>/<case>_<zzzz>.png``
per z slice (``--spatial_dims 2``, the paper) or ``<output_dir>/<case>.nii.gz``, a
float32 volume in [0, 1] with its 1 x 1 x 2.5 mm spacing in the header
(``--spatial_dims 3``). Same steps as the labelled script: orient RAS, resample to
1 x 1 x 2.5 mm (bilinear), clip HU to [-500, 500] and scale to [0, 1], crop to the
foreground box, pad x and y to at least 96, 8-bit PNG of v * 255 truncated as the original
(237,449 slices from the 2,000 cases).

    # the paper's preprocessing of the 2,000 unlabelled FLARE 2022 cases
    python preprocess_flare_unlabelled.py --data_dir FLARE22_Unlabelled --output_dir flare_2d/unlabelled --num_workers 8

    # as the original: ./data/ssl -> ./data/ssl_preprocessed_2d (relative to the working directory)
    python preprocess_flare_unlabelled.py

    # 3D volumes for 3D pretraining
    python preprocess_flare_unlabelled.py --data_dir FLARE22_Unlabelled --output_dir flare_3d/unlabelled --spatial_dims 3

    # a SLURM array of 16 jobs writing one folder (each does every 16th case)
    python preprocess_flare_unlabelled.py --data_dir FLARE22_Unlabelled --output_dir flare_2d/unlabelled \
        --num_workers 8 --shard_index $SLURM_ARRAY_TASK_ID --num_shards 16

    # the synthetic data set of make_phantoms.py
    python preprocess_flare_unlabelled.py --data_dir phantoms/unlabelled --output_dir phantoms_2d/unlabelled

    # the images (imagesTr/ and imagesTs/) of an nnU-Net v2 raw data set, for pretraining
    python preprocess_flare_unlabelled.py --data_dir nnUNet_raw/Dataset003_Liver --output_dir liver_2d_unlabelled

A rerun skips finished cases and redoes interrupted ones (and, after a sharded run,
completes manifest.json). Cases with bad files are reported one line each, the others
are processed, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import data
from preprocessing import CaseTask, add_common_args, check_data_dir, config_from_args, run_from_args
from utils import run_cli

logger = logging.getLogger(__name__)

#: The original script's default folders (relative to the working directory, as there).
DEFAULT_DATA_DIR = "./data/ssl"
DEFAULT_OUTPUT_DIR = "./data/ssl_preprocessed_2d"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "preprocess_flare_unlabelled",
        description="Unlabelled FLARE 2022 NIfTI -> 2D PNG slices or 3D NIfTI volumes (the paper's preprocessing).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    groups = add_common_args(
        parser,
        output_help="folder for the slices (or volumes) and manifest.json; created if missing; must not be, lie "
        "inside or contain --data_dir. The default is the original's, relative to the working directory (also "
        "for --spatial_dims 3, as there)",
        data_default=DEFAULT_DATA_DIR,
        output_default=DEFAULT_OUTPUT_DIR,
    )
    groups["io"].add_argument(
        "--spatial_dims",
        type=int,
        default=2,
        choices=(2, 3),
        help="2: one PNG per z slice (the paper's 2D pretraining); 3: one float32 .nii.gz per case for 3D pretraining",
    )
    groups["io"].add_argument(
        "--layout",
        default="auto",
        choices=("auto", "tree", *data.LAYOUTS),
        help="'tree': every NIfTI under --data_dir; flare / nnunet / decathlon: the images of that labelled data "
        "set (label maps left out); 'auto': a labelled data set when --data_dir has a dataset.json or images/ "
        "beside labels/, else a tree",
    )
    groups["io"].add_argument(
        "--channel",
        type=int,
        default=None,
        help="nnU-Net v2 data sets with several image channels: which one to read (0-based); CT is one channel",
    )
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the unlabelled preprocessing; returns the summary (see preprocessing.run_preprocessing)."""
    check_data_dir(args, DEFAULT_DATA_DIR)
    cases, layout, channel = data.find_images(args.data_dir, args.layout, args.channel)  # checked before any write
    if layout == "tree":  # the layout is recorded only for a labelled data set's images: a tree's record is unchanged
        config = config_from_args(args, kind="unlabelled", spatial_dims=args.spatial_dims)
    else:
        config = config_from_args(
            args, kind="unlabelled", spatial_dims=args.spatial_dims, layout=layout, channel=channel
        )
    tasks = [CaseTask(case=c, image=p) for c, p in cases.items()]
    return run_from_args(tasks, args, config)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
