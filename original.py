"""The original code's values: what ``dittohed/exploring-ssl-for-ct`` ran for the paper's table,
and where its script defaults were debugging values that ours do not copy. One table, read by
the tests and rendered into the README's "Fidelity to the original" section::

    python original.py            # the two Markdown tables of the README, on stdout

:data:`PAPER_RUN` lists every setting of the table's runs (preprocessing, SimSiam pretraining,
fine-tuning, the grid) with its value in the original and where that value comes from: the
original file and flag (its default or its ``README.md`` command), the code that hard-codes
it, or the thesis section. ``tests/test_fidelity.py`` parses the commands that
``reproduce_table.py --preset paper`` runs with the scripts' own parsers and compares each
setting with this table; a setting where ours differs on purpose names the difference, why,
and the flag that restores the original (the test applies that flag and compares again).

:data:`DEBUG_DEFAULTS` lists the original scripts' defaults that were debugging values (the
README command overrides them, or the paper used another value); ours keep the paper's
value as the default, and the test checks our parsers' defaults against this list.

This module imports nothing of the project (it is data), so any module or test may read it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

#: The original repository, its README command lines (with ``<...>`` placeholders), and the thesis.
REPOSITORY = "dittohed/exploring-ssl-for-ct"
README_PRETRAIN_COMMAND = (
    "python main_simsiam.py --data_dir <DIR_WITH_PREPROCESSED_2D_PNGS> --embedding_size 48 --batch_size 128 "
    "--n_epochs 100 --base_lr 0.025 --min_iou <I_MIN> --max_iou <I_MAX> --num_workers <NUM_WORKERS> --use_amp"
)
README_FINETUNE_COMMAND = (
    "python main_finetune.py --data_dir <DIR_WITH_PREPROCESSED_2D_PNGS> --chkpt_path <PATH_TO_PRETRAINED_CHKPT> "
    "--embedding_size 48 --batch_size 32 --n_epochs 225 --patience 20 --sw_batch_size 64 --ignore_user_warning "
    "--num_workers <NUM_WORKERS> --use_amp"
)

#: The seeds of the table's runs: the original's default seed and the second one its fine-tuning help names.
ORIGINAL_SEEDS = (4294967295, 381122412)
#: The table's rows: no pretraining, then the IoU intervals (the last is plain random cropping).
ORIGINAL_ROWS = ("none", "0-0", "0.0001-0.3", "0.3-0.6", "0.6-1", "0-1")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting of the table's runs.

    Attributes:
        stage: "preprocessing", "pretraining", "fine-tuning" or "grid".
        name: where ours holds it: the flag's ``dest`` in the stage's script (``a_min``,
            ``drop_path_rate``, ...), or ``module.Object:parameter`` for a constant of our code
            (the default of that parameter).
        value: the original's value.
        source: where the original's value comes from.
        differs: None when ours runs the same value; otherwise what ours does instead and why.
        restore: with ``differs``: the flag (of the stage's script, or of ``reproduce_table.py``
            for "grid") that restores the original's value.
    """

    stage: str
    name: str
    value: Any
    source: str
    differs: str | None = None
    restore: str | None = None


_CMD_PRE = "README command of main_simsiam.py"
_CMD_FT = "README command of main_finetune.py"

#: Every setting of the paper's table in the original, with its source. ``reproduce_table.py
#: --preset paper`` passes the same values except where ``differs`` says otherwise.
PAPER_RUN: tuple[Setting, ...] = (
    # preprocessing: "default args values were used for the experiments" (the original README, How to run 1.)
    Setting("preprocessing", "a_min", -500.0, "preprocess_flare_*.py --a_min default; thesis 4.3"),
    Setting("preprocessing", "a_max", 500.0, "preprocess_flare_*.py --a_max default; thesis 4.3"),
    Setting("preprocessing", "size_x", 1.0, "preprocess_flare_*.py --size_x default; thesis 4.3"),
    Setting("preprocessing", "size_y", 1.0, "preprocess_flare_*.py --size_y default; thesis 4.3"),
    Setting("preprocessing", "size_z", 2.5, "preprocess_flare_*.py --size_z default; thesis 4.3"),
    Setting(
        "preprocessing",
        "preprocessing.PreprocessConfig:min_xy",
        96,
        "src/transforms.py get_preprocess_transforms_2d: SpatialPadd(spatial_size=(96, 96, -1)); thesis 4.3",
    ),
    Setting("preprocessing", "png_bits", 8, "preprocess_flare_*.py: (v * 255).astype('uint8')"),
    Setting("preprocessing", "png_quantization", "truncate", "preprocess_flare_*.py: (v * 255).astype('uint8')"),
    # SimSiam pretraining
    Setting("pretraining", "spatial_dims", 2, "main_simsiam.py --spatial_dims default; thesis 4.3 (2D slices)"),
    Setting("pretraining", "arch", "swin", "src/models.py Backbone: MONAI SwinTransformer; thesis 4.2"),
    Setting("pretraining", "embedding_size", 48, f"{_CMD_PRE}: --embedding_size 48; thesis 4.2 (C = 48)"),
    Setting("pretraining", "low_resource_mode", False, "main_simsiam.py --low_resource_mode (off)"),
    Setting("pretraining", "use_gradient_checkpointing", False, "main_simsiam.py --use_gradient_checkpointing (off)"),
    Setting("pretraining", "drop_path_rate", 0.1, "main_simsiam.py --drop_path_rate default 0.1; thesis 4.5"),
    Setting("pretraining", "crop_size", 96, "src/transforms.py IoUCropd(crop_size=96)"),
    Setting(
        "pretraining",
        "iou_sampler",
        "original",
        "src/transforms.py IoUCropd: the thesis' Algorithm 1 (section 3.1)",
        differs="the exact sampler: every pair in the interval whenever the image admits one, pairs uniform over "
        "the valid ones (Algorithm 1 misses narrow and high intervals and favours first crops with many partners)",
        restore="--iou_sampler original",
    ),
    Setting("pretraining", "iou_crops.OriginalIoUSampler:r1", 30, "IoUCropd max_retries_existing=30; thesis 4.5"),
    Setting("pretraining", "iou_crops.OriginalIoUSampler:r2", 4, "IoUCropd max_retries_total=120 (= 4 x 30)"),
    Setting("pretraining", "strict_iou", False, "IoUCropd: a random pair when none is found (never refuses)"),
    Setting("pretraining", "batch_size", 128, f"{_CMD_PRE}: --batch_size 128; thesis Table 4.1"),
    Setting("pretraining", "accum_iters", 1, "main_simsiam.py --accum_iters default"),
    Setting("pretraining", "n_epochs", 100, f"{_CMD_PRE}: --n_epochs 100; thesis Table 4.1"),
    Setting("pretraining", "base_lr", 0.025, f"{_CMD_PRE}: --base_lr 0.025; thesis Table 4.1"),
    Setting("pretraining", "end_lr", 1e-6, "main_simsiam.py --end_lr default; thesis Table 4.1"),
    Setting("pretraining", "warmup_epochs", 0, "main_simsiam.py --warmup_epochs default; thesis Table 4.1"),
    Setting("pretraining", "wd", 1e-5, "main_simsiam.py --wd default; thesis Table 4.1"),
    Setting("pretraining", "proj_dim", 2048, "lightly SimSiamProjectionHead defaults; thesis 4.1 (d = 2048)"),
    Setting("pretraining", "pred_dim", 512, "lightly SimSiamPredictionHead defaults; thesis 4.1 (db = 512)"),
    Setting("pretraining", "use_amp", True, f"{_CMD_PRE}: --use_amp; thesis 4.5"),
    Setting("pretraining", "amp_dtype", "fp16", "torch.cuda.amp.autocast() (float16) with a GradScaler"),
    Setting("pretraining", "max_images", 0, "src/loaders.py get_ssl_data: every slice of --data_dir"),
    Setting("pretraining", "no_augment", False, "src/transforms.py get_ssl_rand_transforms (always on)"),
    # fine-tuning
    Setting("fine-tuning", "spatial_dims", 2, "main_finetune.py --spatial_dims default"),
    Setting("fine-tuning", "arch", "swin", "main_finetune.py: MONAI SwinUNETR"),
    Setting("fine-tuning", "embedding_size", 48, f"{_CMD_FT}: --embedding_size 48"),
    Setting("fine-tuning", "low_resource_mode", False, "main_finetune.py --low_resource_mode (off)"),
    Setting("fine-tuning", "use_gradient_checkpointing", False, "main_finetune.py --use_gradient_checkpointing (off)"),
    Setting(
        "fine-tuning",
        "drop_path_rate",
        0.0,
        "main_finetune.py: SwinUNETR(...) without dropout_path_rate, MONAI's default 0.0 (the thesis' drop path 0.1 "
        "belongs to pretraining, where main_simsiam.py passes it)",
    ),
    Setting("fine-tuning", "crop_size", 96, "main_finetune.py / src/transforms.py: 96 x 96 crops and windows"),
    Setting("fine-tuning", "n_classes", 14, "main_finetune.py --n_classes default"),
    Setting("fine-tuning", "n_crops_per_ct", 2, "main_finetune.py --n_crops_per_ct default; thesis 4.5"),
    Setting("fine-tuning", "batch_size", 32, f"{_CMD_FT}: --batch_size 32; thesis Table 4.1"),
    Setting("fine-tuning", "accum_iters", 1, "main_finetune.py: no gradient accumulation"),
    Setting(
        "fine-tuning",
        "drop_last",
        False,
        "main_finetune.py: DataLoader(batch_size=32, shuffle=True) keeps the last partial batch: ceil(N / 32) "
        "steps per epoch, the lr schedule counting them",
    ),
    Setting("fine-tuning", "n_epochs", 225, f"{_CMD_FT}: --n_epochs 225; thesis Table 4.1"),
    Setting("fine-tuning", "base_lr", 1e-3, "main_finetune.py --base_lr default; thesis Table 4.1"),
    Setting("fine-tuning", "end_lr", 5e-5, "main_finetune.py: cosine_scheduler(end_val=5e-5); thesis Table 4.1"),
    Setting("fine-tuning", "warmup_epochs", 10, "main_finetune.py --warmup_epochs default; thesis Table 4.1"),
    Setting("fine-tuning", "wd", 1e-5, "main_finetune.py --wd default; thesis Table 4.1"),
    Setting("fine-tuning", "eval_every", 10, "main_finetune.py: eval_schedule = range(9, 90, 10) + ...; thesis 4.5"),
    Setting("fine-tuning", "eval_every_from", 90, "main_finetune.py: ... + range(90, n_epochs); thesis 4.5"),
    Setting(
        "fine-tuning",
        "patience",
        20,
        f"{_CMD_FT}: --patience 20 (evaluations without improvement; the thesis says epochs, the code counts "
        "evaluations)",
    ),
    Setting("fine-tuning", "sw_batch_size", 64, f"{_CMD_FT}: --sw_batch_size 64"),
    Setting("fine-tuning", "sw_overlap", 0.25, "main_finetune.py --sw_overlap default; thesis 4.5"),
    Setting("fine-tuning", "use_amp", True, f"{_CMD_FT}: --use_amp; thesis 4.5"),
    Setting("fine-tuning", "amp_dtype", "fp16", "torch.cuda.amp.autocast() (float16) with a GradScaler"),
    Setting("fine-tuning", "ignore_user_warning", True, f"{_CMD_FT}: --ignore_user_warning"),
    Setting("fine-tuning", "eval_train", False, "main_finetune.py --eval_train (off)"),
    Setting("fine-tuning", "max_images", 0, "src/loaders.py get_finetune_data: every slice of the split"),
    # the grid
    Setting("grid", "rows", ORIGINAL_ROWS, "the original README's table (thesis Table 4.2)"),
    Setting("grid", "method", "simsiam", "the original README, Results (thesis 4.1)"),
    Setting(
        "grid",
        "pretrain_seeds",
        ORIGINAL_SEEDS,
        "main_simsiam.py --seed default; main_finetune.py --seed help ('another one could be 381122412'); "
        "thesis 4.6 (the same seeds for every interval)",
    ),
    Setting("grid", "finetune_seeds", ORIGINAL_SEEDS, "as pretrain_seeds: 2 pretrainings x 2 fine-tunings per row"),
)


_TRAIN_COMMON: dict[str, Any] = {
    "--embedding_size": int,
    "--use_gradient_checkpointing": "store_true",
    "--spatial_dims": int,
    "--a_min": float,
    "--a_max": float,
    "--size_x": float,
    "--size_y": float,
    "--size_z": float,
    "--use_amp": "store_true",
    "--batch_size": int,
    "--n_epochs": int,
    "--base_lr": float,
    "--warmup_epochs": int,
    "--run_name": str,
    "--data_dir": str,
    "--chkpt_dir": str,
    "--seed": int,
    "--num_workers": int,
    "--use_wandb": "store_true",
    "--low_resource_mode": "store_true",
}
_PRETRAIN_COMMON: dict[str, Any] = {
    **_TRAIN_COMMON,
    "--drop_path_rate": float,
    "--min_iou": float,
    "--max_iou": float,
    "--end_lr": float,
    "--accum_iters": int,
}
_PREPROCESS_COMMON: dict[str, Any] = {
    "--a_min": float,
    "--a_max": float,
    "--size_x": float,
    "--size_y": float,
    "--size_z": float,
    "--data_dir": str,
    "--output_dir": str,
}

#: Every flag of the original's five scripts with its type ("store_true" for switches), read
#: from their ``get_args_parser()``; ours accept each with that name and type.
ORIGINAL_FLAGS: dict[str, dict[str, Any]] = {
    "main_simsiam.py": {**_PRETRAIN_COMMON, "--wd": float},
    "main_dino.py": {
        **_PRETRAIN_COMMON,
        "--out_dim": int,
        "--init_teacher_temp": float,
        "--teacher_temp": float,
        "--teacher_temp_warmup_epochs": int,
        "--base_wd": float,
        "--end_wd": float,
        "--base_momentum": float,
        "--freeze_last_layer": int,
        "--clip_grad": float,
    },
    "main_finetune.py": {
        **_TRAIN_COMMON,
        "--n_classes": int,
        "--n_crops_per_ct": int,
        "--sw_batch_size": int,
        "--wd": float,
        "--sw_overlap": float,
        "--patience": float,
        "--eval_train": "store_true",
        "--split_path": str,
        "--chkpt_path": str,
        "--cache_dir": str,
        "--ignore_user_warning": "store_true",
    },
    "preprocess_flare_labelled.py": {**_PREPROCESS_COMMON, "--split_path": str},
    "preprocess_flare_unlabelled.py": {**_PREPROCESS_COMMON, "--spatial_dims": int},
}


@dataclasses.dataclass(frozen=True)
class DebugDefault:
    """A default of an original script that was a debugging value; ours keeps the paper's.

    Attributes:
        script: the script (ours has the same name).
        name: the flag's ``dest`` in our parser.
        original: the original script's default.
        ours: our default (None: none, or computed at run time; see ``why``).
        why: where the paper's value comes from, or why ours differs.
    """

    script: str
    name: str
    original: Any
    ours: Any
    why: str


#: Defaults of the original scripts that ours do not copy.
DEBUG_DEFAULTS: tuple[DebugDefault, ...] = (
    DebugDefault("main_dino.py", "embedding_size", 24, 48, "the paper's encoder (C = 48), as main_simsiam.py"),
    DebugDefault("main_dino.py", "batch_size", 2, 128, "the paper's pretraining batch, as main_simsiam.py"),
    DebugDefault("main_dino.py", "n_epochs", 300, 100, "the paper's pretraining length, as main_simsiam.py"),
    DebugDefault("main_finetune.py", "embedding_size", 24, 48, f"{_CMD_FT}: --embedding_size 48"),
    DebugDefault("main_finetune.py", "batch_size", 2, 32, f"{_CMD_FT}: --batch_size 32"),
    DebugDefault("main_finetune.py", "patience", 10, 20, f"{_CMD_FT}: --patience 20"),
    DebugDefault(
        "main_finetune.py",
        "sw_batch_size",
        4,
        None,
        "512 windows in 2D (a full batch for a GPU; the README command's 64 gives the same scores), 64 in 3D",
    ),
    DebugDefault("main_finetune.py", "num_workers", 10, 4, "a count most machines have; -1 measures the best"),
    DebugDefault(
        "main_simsiam.py",
        "data_dir",
        "./data/ssl_preprocessed_2d",
        None,
        "required (also main_dino.py; main_finetune.py's ./data/finetune_preprocessed_2d): a run never reads a "
        "folder it was not pointed at; the preprocessing scripts keep the original's default folders",
    ),
    DebugDefault(
        "main_simsiam.py",
        "chkpt_dir",
        "./chkpts",
        None,
        "the project's runs/ folder (all three training scripts): nothing lands in the working directory by accident",
    ),
    DebugDefault(
        "main_simsiam.py",
        "run_name",
        "test_ssl",
        None,
        "named after the method, dimensions and interval (main_finetune.py: after the checkpoint and seed; the "
        "original's test_finetune), so two runs never share files",
    ),
    DebugDefault(
        "main_finetune.py", "cache_dir", "./cache", None, "3D cache in cache/ of --chkpt_dir, beside the run's files"
    ),
)


def flag_of(name: str) -> str:
    """``--name`` for a flag's ``dest``; the constant's path for a code constant."""
    return name if ":" in name else f"--{name}"


def _fmt(v: Any) -> str:
    if isinstance(v, tuple):
        return ", ".join(_fmt(x) for x in v)
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def render_markdown() -> str:
    """The README's two tables: every setting of the paper's runs in the original and ours
    (:data:`PAPER_RUN`), and the original's debugging defaults (:data:`DEBUG_DEFAULTS`)."""
    lines = [
        "| stage | setting | original | source | ours |",
        "|---|---|---|---|---|",
    ]
    for s in PAPER_RUN:
        ours = "same" if s.differs is None else f"{s.differs}; `{s.restore}` restores the original"
        lines.append(f"| {s.stage} | `{flag_of(s.name)}` | {_fmt(s.value)} | {s.source} | {ours} |")
    lines += [
        "",
        "| script | flag | original default | our default | why |",
        "|---|---|---|---|---|",
    ]
    for d in DEBUG_DEFAULTS:
        ours = "see why" if d.ours is None else _fmt(d.ours)
        lines.append(f"| {d.script} | `--{d.name}` | {_fmt(d.original)} | {ours} | {d.why} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
