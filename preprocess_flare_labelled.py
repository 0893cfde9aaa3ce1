"""Preprocess the labelled FLARE 2022 cases into 2D PNG slices for fine-tuning.

Reads the FLARE layout ``<data_dir>/images/<case>_0000.nii.gz`` (or ``imgs/``) and
``<data_dir>/labels/<case>.nii.gz``, takes the cases of the split (train and val),
and writes every z slice of image and label with the same file name:
``<output_dir>/imgs/<case>_<zzzz>.png`` and ``<output_dir>/labels/<case>_<zzzz>.png``.
The paper's steps: orient RAS, resample to 1 x 1 x 2.5 mm (bilinear image, nearest
label), clip HU to [-500, 500] and scale to [0, 1], crop to the foreground box, pad x
and y to at least 96, save as 8-bit PNG, v * 255 truncated as the original
(``--png_quantization round`` rounds) (5,050 slices from the 50 FLARE cases).

    # the paper's preprocessing of FLARE 2022 (50 labelled cases, data/split.json)
    python preprocess_flare_labelled.py --data_dir FLARE22Train --output_dir flare_2d/labelled

    # as the original: ./data/finetune -> ./data/finetune_preprocessed_2d (relative to the working directory)
    python preprocess_flare_labelled.py

    # faster: 8 processes; lossless 16-bit slices
    python preprocess_flare_labelled.py --data_dir FLARE22Train --output_dir flare_2d/labelled --num_workers 8
    python preprocess_flare_labelled.py --data_dir FLARE22Train --output_dir flare_2d/labelled16 --png_bits 16

    # the synthetic data set of make_phantoms.py (it writes its own split)
    python preprocess_flare_labelled.py --data_dir phantoms/labelled --output_dir phantoms_2d/labelled \
        --split_path phantoms/split.json

A rerun skips finished cases and redoes interrupted ones. Cases with bad files are
reported one line each, the others are processed, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import data
from preprocessing import CaseTask, add_common_args, check_data_dir, config_from_args, run_from_args
from utils import run_cli

logger = logging.getLogger(__name__)

#: The original script's default folders (relative to the working directory, as there).
DEFAULT_DATA_DIR = "./data/finetune"
DEFAULT_OUTPUT_DIR = "./data/finetune_preprocessed_2d"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "preprocess_flare_labelled",
        description="Labelled FLARE 2022 NIfTI -> 2D PNG image and label slices (the paper's preprocessing).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    groups = add_common_args(
        parser,
        output_help="folder for imgs/, labels/ and manifest.json; created if missing; must not be, lie inside or "
        "contain --data_dir. The default is the original's, relative to the working directory",
        data_default=DEFAULT_DATA_DIR,
        output_default=DEFAULT_OUTPUT_DIR,
    )
    groups["io"].add_argument(
        "--split_path",
        default=data.DEFAULT_SPLIT_PATH,
        help="JSON {'train': [...], 'val': [...]} naming the cases to preprocess; the default is the "
        "paper's 15 / 35 split of FLARE 2022. Change it for another data set (e.g. phantoms/split.json)",
    )
    return parser


def build_tasks(data_dir: str, split: dict[str, list[str]], split_path: str) -> list[CaseTask]:
    """One task per split case; split cases without files become tasks that fail with a clear message."""
    found = data.find_labelled_cases(data_dir)
    img_dir = data.raw_image_dir(os.path.abspath(data_dir))
    lab_dir = os.path.join(os.path.abspath(data_dir), data.RAW_LABEL_DIR)
    wanted = sorted(set(split["train"]) | set(split["val"]))
    tasks = []
    for case in wanted:
        entry = found.get(case, {"image": None, "label": None})
        missing = None
        if entry["image"] is None and entry["label"] is None:
            missing = f"case {case} of split {split_path} has no files: no {img_dir}/{case}_0000.nii.gz and no {lab_dir}/{case}.nii.gz"
        elif entry["image"] is None:
            missing = f"case {case} has label {entry['label']} but no image {img_dir}/{case}_0000.nii.gz"
        elif entry["label"] is None:
            missing = f"case {case} has image {entry['image']} but no label {lab_dir}/{case}.nii.gz"
        tasks.append(CaseTask(case=case, image=entry["image"], label=entry["label"], missing=missing))
    extra = sorted(set(found) - set(wanted))
    if extra:
        logger.warning(
            "%d case(s) in %s are not in the split %s and are not preprocessed (first: %s)",
            len(extra),
            data_dir,
            split_path,
            extra[0],
        )
    return tasks


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the labelled preprocessing; returns the summary (see preprocessing.run_preprocessing)."""
    config = config_from_args(args, kind="labelled", spatial_dims=2)
    check_data_dir(args, DEFAULT_DATA_DIR)
    split = data.load_split(args.split_path)
    tasks = build_tasks(args.data_dir, split, os.path.abspath(args.split_path))
    return run_from_args(tasks, args, config)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
