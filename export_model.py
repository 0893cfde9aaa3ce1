"""Export our weights in the layouts MONAI users load, with a model card.

Two formats (``--format``)::

    # a pretrained Swin encoder (SimSiam, or DINO's teacher / student) -> MONAI's self-supervised
    # Swin-UNETR weights layout, for SwinUNETR(...).load_from(torch.load(PATH))
    python export_model.py --chkpt_path runs/simsiam_iou03_06.pt --format monai_ssl -o simsiam_swinvit.pt
    python export_model.py --chkpt_path runs/dino.pt --checkpoint_key student --format monai_ssl -o dino_student.pt

    # a fine-tuned model -> a plain state_dict of MONAI's SwinUNETR (or UNETR) + PATH.json, the model card
    python export_model.py --chkpt_path runs/finetune_x_swin2d_seed0.pt --format swinunetr -o flare_swinunetr.pt

``monai_ssl`` writes ``{"state_dict": {"module.<key>": tensor}}``, the layout of MONAI's
published self-supervised Swin-UNETR weights (``model_swinvit.pt``: Swin blocks' MLP layers
named ``fc1`` / ``fc2``): every tensor of the encoder, so that ::

    model = SwinUNETR(**card["architecture"]["args"])       # or your own arguments, same encoder sizes
    model.load_from(torch.load("simsiam_swinvit.pt"))        # MONAI's own method: every encoder tensor

A fine-tuned model's encoder exports the same way. Swin only (UNETR has no such layout).

``swinunetr`` writes a fine-tuned model as ``model.state_dict()`` of
``monai.networks.nets.SwinUNETR`` (or ``UNETR``), loadable with ``load_state_dict(...,
strict=True)``; a pretrained encoder as the state dict of the model's encoder alone
(``SwinUNETR.swinViT`` / ``UNETR.vit``). The model card ``PATH.json`` holds everything
needed to use it without this project: the MONAI class and its arguments, the label ids and
names, the input (CT in HU; the preprocessing: orientation, voxel size, HU window, crop,
padding, 2D slices or 3D volumes, sliding-window size), the training data and run, the
validation scores, the intended use and the limits. ``monai_ssl`` gets a card too.
Both files are written atomically; an existing file is kept unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import platform
from typing import Any

import monai
import torch

import data
import finetune
import models
import runqueue
from utils import UserError, atomic_write, atomic_write_json, prepare_output_file, run_cli, torch_load

logger = logging.getLogger(__name__)

FORMATS = ("monai_ssl", "swinunetr")
CARD_FORMAT = "ioupos-model-card-v1"

INTENDED_USE = (
    "Research: segmentation of the 13 abdominal organs of FLARE 2022 (liver, kidneys, spleen, pancreas, aorta, "
    "inferior vena cava, adrenal glands, gallbladder, esophagus, stomach, duodenum) in adult abdominal CT, "
    "and as a starting point for fine-tuning on other CT segmentation tasks. Not for clinical use."
)
LIMITATIONS = [
    "Not validated for clinical use; not a medical device.",
    "Trained on FLARE 2022 abdominal CT (or the data named under 'training'); other scanners, contrast phases, "
    "pathologies, children or other body regions may give worse results.",
    "The input must be CT in Hounsfield units, preprocessed exactly as under 'input.preprocessing'; predictions "
    "are made on that grid and must be resampled back to the scan (predict.py does this).",
    "'dice_paper' (per-slice Dice including background) runs high; the challenge-grade per-organ Dice and NSD are "
    "the scores to compare with other work.",
]


# ---------------------------------------------------------------------------------------
# Reading our files
# ---------------------------------------------------------------------------------------


def read_checkpoint(path: str, checkpoint_key: str) -> dict[str, Any]:
    """What an export needs from one of our files.

    Returns:
        ``{"kind": "finetuned" | "encoder", "cfg", "encoder" (bare encoder keys), "model"
        (the segmenter's state dict, fine-tuned only), "n_classes", "ckpt"}``.

    Raises:
        UserError: unreadable, not one of this project's checkpoints, or a DINO key that is absent.
    """
    ckpt = torch_load(path)
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt == finetune.FINETUNE_FORMAT:
        model, cfg, ckpt = finetune.load_finetuned(path, ckpt)  # checks that the weights fit the configuration
        enc, _ = models.extract_encoder_state(ckpt, path)
        return {
            "kind": "finetuned",
            "cfg": cfg,
            "encoder": enc,
            "model": model.state_dict(),
            "n_classes": int(ckpt["n_classes"]),
            "ckpt": ckpt,
        }
    if fmt == models.ENCODER_FORMAT:
        if checkpoint_key == "student" and "student_encoder" not in ckpt:
            raise UserError(f"--checkpoint_key student: {path} (a {ckpt.get('method')} checkpoint) has no student")
        enc, cfg = models.extract_encoder_state(ckpt, path, checkpoint_key)
        # the encoder must load strictly into the network its configuration describes
        seg = models.build_segmenter(cfg, data.N_CLASSES)
        try:
            models.segmenter_encoder(seg).load_state_dict(enc, strict=True)
        except RuntimeError as e:
            raise UserError(
                f"encoder weights in {path} do not fit their configuration: {str(e).splitlines()[0]}"
            ) from None
        return {"kind": "encoder", "cfg": cfg, "encoder": enc, "model": None, "n_classes": None, "ckpt": ckpt}
    raise UserError(
        f"--chkpt_path {path} is not a checkpoint of this project (format {fmt!r}; expected "
        f"{models.ENCODER_FORMAT!r} from main_simsiam.py / main_dino.py or {finetune.FINETUNE_FORMAT!r} from "
        "main_finetune.py)"
    )


# ---------------------------------------------------------------------------------------
# The layouts
# ---------------------------------------------------------------------------------------


def to_monai_ssl(encoder: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Our Swin encoder keys (``SwinUNETR.swinViT``'s) -> MONAI's self-supervised weights layout:
    ``module.`` prefix, the Swin blocks' MLP layers ``linear1`` / ``linear2`` named ``fc1`` / ``fc2``.

    Example: ``layers1.0.blocks.0.mlp.linear1.weight`` -> ``module.layers1.0.blocks.0.mlp.fc1.weight``.
    """
    out = {}
    for k, v in encoder.items():
        k2 = k.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
        out["module." + k2] = v.detach().cpu().clone()
    return {"state_dict": out}


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _run_name(path: str) -> str:
    """The name of the run that wrote ``<chkpt_dir>/<run>.pt``."""
    name = os.path.basename(path)
    return name[:-3] if name.endswith(".pt") else os.path.splitext(name)[0]


def _validation(path: str, ckpt: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuned model's validation scores: ``dice_paper`` of the checkpoint and, when its
    run's ``<run>_files/result.json`` is still next to it, the challenge-grade summary."""
    out: dict[str, Any] = {
        "dice_paper": float(ckpt.get("dice_paper", float("nan"))),
        "dice_paper_note": "the paper's score: per-slice Dice including background, mean over validation slices",
        "epoch": int(ckpt.get("epoch", 0)),
    }
    chkpt_dir, run = os.path.dirname(path), _run_name(path)
    result = runqueue.result_path(chkpt_dir, run)
    if runqueue.is_finished(chkpt_dir, run):
        res = runqueue.read_result(chkpt_dir, run)
        summary, scoring = res.get("summary"), res.get("scoring")
        if summary:
            out["challenge_grade"] = {
                "source": result,
                "note": "per organ (background excluded) volumetric Dice and NSD, FLARE 2022 conventions and "
                "tolerances (for another label set: the NSD tolerances under 'scoring'), on the preprocessed "
                "validation volumes; mean over organs, then cases",
                **summary,
            }
            if scoring:
                out["challenge_grade"]["scoring"] = scoring
    else:
        out["challenge_grade"] = None
        out["challenge_grade_note"] = f"{result} not found (the run's folder was moved or deleted)"
    return out


def model_card(
    src: dict[str, Any], path: str, fmt: str, checkpoint_key: str, weights_file: str, sha256: str
) -> dict[str, Any]:
    """The JSON model card of an export (see the module docstring)."""
    cfg, ckpt = src["cfg"], src["ckpt"]
    n_classes = src["n_classes"] or data.N_CLASSES
    name, kwargs = models.segmenter_spec(cfg, n_classes)
    saved = dict(ckpt.get("args") or {})
    finetuned = src["kind"] == "finetuned"
    enc = "swinViT" if name == "SwinUNETR" else "vit"  # the encoder's attribute in the segmenter
    component = "whole model" if finetuned else enc
    if fmt == "monai_ssl":
        component = "swinViT"
        layout = (
            "MONAI self-supervised Swin-UNETR weights: {'state_dict': {'module.<swinViT key, mlp fc1/fc2>': tensor}}"
        )
        load = "model = SwinUNETR(**card['architecture']['args']); model.load_from(torch.load(PATH))"
    elif finetuned:
        layout = f"state_dict of monai.networks.nets.{name}"
        load = f"model = {name}(**card['architecture']['args']); model.load_state_dict(torch.load(PATH), strict=True)"
    else:
        layout = f"state_dict of monai.networks.nets.{name}.{enc} (the encoder alone; the decoder is not trained)"
        load = f"model = {name}(**card['architecture']['args']); model.{enc}.load_state_dict(torch.load(PATH), strict=True)"
    labels = finetune.checkpoint_labels(ckpt, path) if finetuned else None
    card: dict[str, Any] = {
        "format": CARD_FORMAT,
        "weights": {
            "file": os.path.basename(weights_file),
            "sha256": sha256,
            "export_format": fmt,
            "layout": layout,
            "component": component,
            "load": load,
        },
        "architecture": {
            "class": f"monai.networks.nets.{name}",
            "args": kwargs,
            "args_note": None
            if finetuned
            else f"out_channels {kwargs['out_channels']} is a choice: the encoder fits a {name} with any number "
            "of output classes",
            "built_with": {"monai": monai.__version__, "torch": torch.__version__, "python": platform.python_version()},
        },
        "labels": labels.to_json() if labels is not None else None,
    }
    if finetuned:
        pre = finetune.checkpoint_preprocessing(ckpt, path)
        crop = int(saved.get("crop_size", 0))
        d = int(cfg["spatial_dims"])
        card["input"] = {
            "channels": 1,
            "modality": "CT, Hounsfield units",
            "spatial_dims": d,
            "axes": "(X, Y) axial slices of the preprocessed volume, the batch over z"
            if d == 2
            else "(X, Y, Z) volumes of the preprocessed grid",
            "preprocessing": pre,
            "sliding_window": {"roi_size": [crop] * d, "overlap": 0.25, "mode": "constant"},
            "output": f"{n_classes} logits per voxel; the label is the argmax (softmax for probabilities)",
        }
        card["training"] = {
            "method": "fine-tuning (main_finetune.py)",
            "run": _run_name(path),
            "checkpoint": path,
            "epoch": int(ckpt.get("epoch", 0)),
            "data_dir": saved.get("data_dir"),
            "split_path": saved.get("split_path"),
            "pretrained_encoder": saved.get("chkpt_path"),
            "pretrained_checkpoint_key": saved.get("checkpoint_key") if saved.get("chkpt_path") else None,
            "seed": saved.get("seed"),
            "crop_size": crop,
            "n_epochs": saved.get("n_epochs"),
        }
        card["validation"] = _validation(path, ckpt)
    else:
        method = ckpt.get("method")
        card["input"] = {
            "channels": 1,
            "modality": "CT, Hounsfield units",
            "spatial_dims": int(cfg["spatial_dims"]),
            "preprocessing_note": "pretrained on preprocess_flare_unlabelled.py output: orient RAS, 1 x 1 x 2.5 mm, "
            "HU [-500, 500] scaled to [0, 1] (see the training args' data_dir)",
        }
        card["training"] = {
            "method": f"{method} self-supervised pretraining with IoU-based positives",
            "encoder": checkpoint_key if method == "dino" else "encoder",
            "run": _run_name(path),
            "checkpoint": path,
            "epoch": int(ckpt.get("epoch", 0)),
            "data_dir": saved.get("data_dir"),
            "min_iou": saved.get("min_iou"),
            "max_iou": saved.get("max_iou"),
            "crop_size": saved.get("crop_size"),
            "seed": saved.get("seed"),
        }
        card["validation"] = None
    card["intended_use"] = INTENDED_USE
    card["limitations"] = LIMITATIONS
    if labels is not None and not labels.is_flare:  # a model of another data set's label set (preprocess_labelled.py)
        card["intended_use"] = (
            f"Research: segmentation of {', '.join(labels.names[1:])} in CT (the label set of the training data, "
            f"{labels.source}), and as a starting point for fine-tuning on other CT segmentation tasks. "
            "Not for clinical use."
        )
        card["limitations"] = [
            x.replace("Trained on FLARE 2022 abdominal CT (or", "Trained on the data") for x in LIMITATIONS
        ]
    card["exported_by"] = "export_model.py (IoU-based positives)"
    return card


def export(
    path: str, fmt: str, output: str, checkpoint_key: str = "teacher", overwrite: bool = False
) -> dict[str, str]:
    """Write ``output`` (the weights) and ``output + ".json"`` (the model card).

    Returns:
        ``{"weights": path, "card": path, "n_tensors": int}``.

    Raises:
        UserError: unknown format, a UNETR encoder for ``monai_ssl``, an unreadable or foreign
            checkpoint, an existing output without ``overwrite``.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    path = os.path.abspath(os.path.expanduser(path))
    output = os.path.abspath(os.path.expanduser(output))
    card_path = output + ".json"
    if os.path.realpath(output) == os.path.realpath(path):
        raise UserError(f"-o {output} is the checkpoint itself; choose another file")
    for p in (output, card_path):
        if os.path.exists(p) and not overwrite:
            raise UserError(f"{p} exists; pass --overwrite to replace it")
        if os.path.isdir(p):
            raise UserError(f"{p} is a folder; -o names the weights file")
    prepare_output_file(output, "-o")  # a read-only or missing folder: one line now, not after the conversion
    src = read_checkpoint(path, checkpoint_key)
    if fmt == "monai_ssl":
        if src["cfg"]["arch"] != "swin":
            raise UserError(
                f"--format monai_ssl is the layout of MONAI's Swin-UNETR self-supervised weights; {path} holds a "
                f"{src['cfg']['arch']} encoder (use --format swinunetr)"
            )
        obj: Any = to_monai_ssl(src["encoder"])
        n = len(obj["state_dict"])
    elif src["kind"] == "finetuned":
        obj = {k: v.detach().cpu().clone() for k, v in src["model"].items()}
        n = len(obj)
    else:
        obj = {k: v.detach().cpu().clone() for k, v in src["encoder"].items()}
        n = len(obj)
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    card = model_card(src, path, fmt, checkpoint_key, output, _sha256(payload))
    with atomic_write(output, "wb") as f:
        f.write(payload)
    atomic_write_json(card_path, card)
    logger.info("%s: %d tensors (%s, %s) -> %s (card %s)", path, n, src["kind"], fmt, output, card_path)
    return {"weights": output, "card": card_path, "n_tensors": n}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "export_model.py",
        description="Export a pretrained encoder or a fine-tuned model in MONAI's layouts, with a JSON model card.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--chkpt_path",
        required=True,
        help="Our checkpoint: a pretrained encoder <run>.pt (main_simsiam.py / main_dino.py) or a fine-tuned "
        "<run>.pt (main_finetune.py). Required.",
    )
    p.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="monai_ssl: {'state_dict': {'module.<key>': tensor}} for SwinUNETR(...).load_from (Swin encoders, "
        "also the encoder of a fine-tuned model); swinunetr: a plain state_dict of MONAI's SwinUNETR / UNETR "
        "(a pretrained encoder: of its swinViT / vit). Required.",
    )
    p.add_argument(
        "-o", "--output", required=True, help="The weights file to write; the model card goes to OUTPUT.json. Required."
    )
    p.add_argument(
        "--checkpoint_key",
        default="teacher",
        choices=("teacher", "student"),
        help="Which encoder of a DINO checkpoint to export (the teacher, as DINO recommends); ignored for others.",
    )
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output file and card.")
    return p


def main(args: argparse.Namespace) -> dict[str, str]:
    """Export; prints the two paths written. Returns :func:`export`'s dict."""
    out = export(args.chkpt_path, args.format, args.output, args.checkpoint_key, args.overwrite)
    print(out["weights"])
    print(out["card"])
    return out


if __name__ == "__main__":
    run_cli(main, get_args_parser())
