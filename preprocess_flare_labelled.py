"""Preprocess a labelled CT data set into 2D PNG slices for fine-tuning: FLARE 2022, nnU-Net v2 raw or
the Medical Segmentation Decathlon (``preprocess_labelled.py`` is the same script under a neutral name).

Layouts, recognised from their files (or ``--layout``)::

    FLARE 2022      <data_dir>/images/<case>_0000.nii.gz (or imgs/), <data_dir>/labels/<case>.nii.gz;
                    the 13 FLARE organs
    nnU-Net v2 raw  <data_dir>/dataset.json (channel_names, labels, numTraining, file_ending),
                    imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz; several channels: --channel k
    Decathlon       <data_dir>/dataset.json (labels, a "training" list of {"image", "label"}),
                    e.g. imagesTr/<case>.nii.gz, labelsTr/<case>.nii.gz

The label ids and names come from ``dataset.json`` (FLARE's 13 organs for the FLARE layout)
and are recorded in ``<output_dir>/manifest.json``: fine-tuning, the scores, the figures and
``predict.py`` take the number of classes and the names from there. A label id outside the
declared set makes its case fail.

Which cases (the split)::

    --split_path FILE               the cases of FILE's train and val lists (for FLARE by default the
                                    paper's 15 / 35 split, data/split.json); nnU-Net's
                                    splits_final.json with --fold k
    <data_dir>/splits_final.json    (nnU-Net v2) fold --fold k (default 0), when present
    --val_fraction F --split_seed S every complete case, split deterministically (the default for
                                    nnU-Net and Decathlon data without splits_final.json: F 0.2, S 0)

A split that was not given as a file (automatic, or a fold of ``splits_final.json``) is
written to ``<output_dir>/split.json``; fine-tuning on the folder reads it by default, so
every later run uses the same cases.

Every z slice of image and label is written with the same file name:
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

    # an nnU-Net v2 raw data set (20 % validation cases, written to my_2d/split.json), a Decathlon task
    python preprocess_labelled.py --data_dir nnUNet_raw/Dataset003_Liver --output_dir liver_2d --val_fraction 0.2
    python preprocess_labelled.py --data_dir Task09_Spleen --output_dir spleen_2d --num_workers 8

A rerun skips finished cases and redoes interrupted ones. Cases with bad files (and cases
listed in ``dataset.json`` whose files are missing) are reported one line each, the others
are processed, and the exit code is 1; a ``dataset.json`` that disagrees with the files, an
unknown layout or a bad split stop the command with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import data
from preprocessing import (
    CaseTask,
    add_common_args,
    check_data_dir,
    config_from_args,
    prepare_output_dir,
    record_split,
    run_from_args,
)
from utils import UserError, run_cli

logger = logging.getLogger(__name__)

#: The original script's default folders (relative to the working directory, as there).
DEFAULT_DATA_DIR = "./data/finetune"
DEFAULT_OUTPUT_DIR = "./data/finetune_preprocessed_2d"


def get_args_parser(prog: str = "preprocess_flare_labelled") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog,
        description="Labelled CT (FLARE 2022, nnU-Net v2 raw, Medical Segmentation Decathlon) NIfTI -> 2D PNG image "
        "and label slices (the paper's preprocessing).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    groups = add_common_args(
        parser,
        output_help="folder for imgs/, labels/, manifest.json (and split.json when the split is made here); created "
        "if missing; must not be, lie inside or contain --data_dir. The default is the original's, relative to the "
        "working directory",
        data_default=DEFAULT_DATA_DIR,
        output_default=DEFAULT_OUTPUT_DIR,
    )
    io_g = groups["io"]
    io_g.add_argument(
        "--layout",
        default="auto",
        choices=("auto", *data.LAYOUTS),
        help="how --data_dir is laid out: 'auto' recognises it from its files (dataset.json: nnU-Net v2 raw or "
        "Decathlon; images/ and labels/: FLARE 2022); name one when the folder is ambiguous",
    )
    io_g.add_argument(
        "--channel",
        type=int,
        default=None,
        help="nnU-Net v2 data sets with several image channels: which one to read (<case>_<XXXX>.nii.gz, 0-based); "
        "CT is one channel, so a multi-channel data set is refused without it",
    )
    io_g.add_argument(
        "--split_path",
        default=None,
        help="JSON {'train': [...], 'val': [...]} naming the cases to preprocess, or nnU-Net's splits_final.json "
        "with --fold. Default: the paper's 15 / 35 split for FLARE 2022 (data/split.json); for nnU-Net the data "
        "set's splits_final.json when present; else a split made with --val_fraction / --split_seed",
    )
    sp = parser.add_argument_group("a split made here (no --split_path; written to <output_dir>/split.json)")
    sp.add_argument(
        "--val_fraction",
        type=float,
        default=None,
        help=f"make a deterministic split of every complete case with this fraction of validation cases (default "
        f"{data.DEFAULT_VAL_FRACTION} for nnU-Net and Decathlon data without splits_final.json; give it for FLARE to "
        "replace the paper's split)",
    )
    sp.add_argument(
        "--split_seed",
        type=int,
        default=0,
        help="seed of that split (cases are ordered by a hash of seed and case id); change it for another split",
    )
    sp.add_argument(
        "--fold",
        type=int,
        default=None,
        help="the fold of nnU-Net's splits_final.json (--split_path, or the data set's own); default 0 for the "
        "data set's own file",
    )
    return parser


def dataset_tasks(ds: data.LabelledDataSet, split: dict[str, list[str]], split_desc: str) -> list[CaseTask]:
    """One task per split case of the data set; a case whose files are missing (or that the data
    set does not have) becomes a task that fails with its one line."""
    wanted = sorted(set(split["train"]) | set(split["val"]))
    tasks = []
    for case in wanted:
        entry = ds.cases.get(case, {"image": None, "label": None})
        if case in ds.cases:
            missing = ds.missing.get(case)
        elif ds.layout == "flare":  # the files it would have
            img_dir, lab_dir = data.raw_image_dir(ds.root), os.path.join(ds.root, data.RAW_LABEL_DIR)
            missing = (
                f"case {case} of split {split_desc} has no files: no {img_dir}/{case}{data.MODALITY_SUFFIX}.nii.gz "
                f"and no {lab_dir}/{case}.nii.gz"
            )
        else:
            missing = f"case {case} of split {split_desc} is not in the {ds.layout} data set {ds.root}"
        tasks.append(CaseTask(case=case, image=entry["image"], label=entry["label"], missing=missing))
    extra = sorted(set(ds.cases) - set(wanted))
    if extra:
        logger.warning(
            "%d case(s) of %s are not in the split %s and are not preprocessed (first: %s)",
            len(extra),
            ds.root,
            split_desc,
            extra[0],
        )
    return tasks


def resolve_split(
    args: argparse.Namespace, ds: data.LabelledDataSet
) -> tuple[dict[str, list[str]], str, dict[str, Any] | None]:
    """The cases to preprocess: ``(split, description, made_by)``; ``made_by`` (how the split was
    made) is None when the split is a file the user gives (FLARE's default included), else the
    split is written to ``<output_dir>/split.json``.

    Raises:
        UserError: contradicting flags, or a split file that cannot be read.
    """
    if args.split_path is not None and args.val_fraction is not None:
        raise UserError("--split_path names the split; --val_fraction makes one: give one of them")
    if args.split_path is not None:
        path = os.path.abspath(args.split_path)
        split = data.load_split(path, args.fold)
        desc = path if args.fold is None else f"{path} (fold {args.fold})"
        made_by = None if ds.layout == "flare" else {"split_path": path, "fold": args.fold}
        return split, desc, made_by
    own = os.path.join(ds.root, data.NNUNET_SPLITS)
    if args.val_fraction is None and ds.layout == "nnunet" and os.path.isfile(own):
        fold = 0 if args.fold is None else args.fold
        logger.info("split: fold %d of %s (--fold)", fold, own)
        return data.load_split(own, fold), f"{own} (fold {fold})", {"split_path": own, "fold": fold}
    if args.fold is not None:
        raise UserError(f"--fold {args.fold} picks a fold of nnU-Net's splits_final.json, and there is none here")
    if args.val_fraction is None and ds.layout == "flare":
        return data.load_split(data.DEFAULT_SPLIT_PATH), data.DEFAULT_SPLIT_PATH, None
    fraction = data.DEFAULT_VAL_FRACTION if args.val_fraction is None else float(args.val_fraction)
    cases = ds.complete_cases
    split = data.make_split(cases, fraction, args.split_seed)
    made_by = {"val_fraction": fraction, "split_seed": int(args.split_seed), "n_cases": len(cases)}
    desc = f"automatic split (--val_fraction {fraction:g} --split_seed {args.split_seed})"
    return split, desc, made_by


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the labelled preprocessing; returns the summary (see preprocessing.run_preprocessing)."""
    check_data_dir(args, DEFAULT_DATA_DIR)
    ds = data.find_labelled_dataset(args.data_dir, args.layout, args.channel)
    if ds.layout == "flare":
        config = config_from_args(args, kind="labelled", spatial_dims=2)
    else:
        config = config_from_args(
            args, kind="labelled", spatial_dims=2, labels=ds.labels.names, layout=ds.layout, channel=ds.channel
        )
        logger.info("%s data set %s: labels %s (%s)", ds.layout, ds.root, ds.labels.describe(), ds.labels.source)
    split, desc, made_by = resolve_split(args, ds)
    tasks = dataset_tasks(ds, split, desc)
    if made_by is not None:  # written beside the output, for fine-tuning to reuse
        inputs = {"--data_dir": args.data_dir, "--split_path": args.split_path}
        out = prepare_output_dir(args.output_dir, config, inputs, args.overwrite)
        path = record_split(out, split, made_by, args.overwrite)
        logger.info("split %s: %d train / %d val cases -> %s", desc, len(split["train"]), len(split["val"]), path)
    return run_from_args(tasks, args, config)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
