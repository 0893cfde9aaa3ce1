"""The IoU-interval table's results: collected from the run folders, rendered as tables and figures.

Each finished fine-tuning's ``result.json`` gives its Dice (``best_dice_paper``, the
thesis' Dice) and the path of its challenge-grade per-organ scores (Dice and NSD);
:func:`collect` gathers them per row of the plan (``runqueue.plan_grid``),
:func:`render_table` writes ``table.md`` / ``table.csv`` beside the paper's numbers
(:data:`PAPER_TABLE`), :func:`render_organs` writes ``organs.md`` / ``organs.csv``, and
:func:`make_figures` draws every figure of the table into ``figures/``::

    collapse.png        the collapse coefficient over pretraining epochs (the pretraining logs)
    organ_sharing.png   the fraction of positive pairs whose crops share an organ, pairs of two
                        background-only crops left out (the labelled slices; numbers in organ_sharing.json)
    crop_pairs.png      example crop pairs of each interval on one labelled slice
    label_budget.png    with a label-budget axis (reproduce_table.py --n_train_cases): Dice against the
                        number of labelled training cases per interval (:func:`plot_label_budget`;
                        the numbers in budget.md / budget.csv, :func:`render_budget`)

Nothing here runs a training; an unfinished run is a gap in the table.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from data import labelled_slice_layout, list_finetune_pairs, read_image_2d, read_label_2d
from engine import read_log, run_paths
from iou_crops import crop_iou, make_sampler
from runqueue import Row, Run, is_finished, read_result, result_path
from utils import UserError, atomic_write, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

#: Row keys of the paper's table, in the paper's order.
PAPER_ROW_KEYS: tuple[str, ...] = ("none", "0-0", "0.0001-0.3", "0.3-0.6", "0.6-1", "0-1")
#: The paper's table: mean, std and the four DSCs of each row.
PAPER_TABLE: dict[str, dict[str, Any]] = {
    "none": {"mean": 0.843, "std": 0.004, "dsc": [0.842, 0.848, 0.846, 0.836]},
    "0-0": {"mean": 0.838, "std": 0.007, "dsc": [0.836, 0.831, 0.834, 0.850]},
    "0.0001-0.3": {"mean": 0.839, "std": 0.012, "dsc": [0.847, 0.831, 0.855, 0.824]},
    "0.3-0.6": {"mean": 0.853, "std": 0.002, "dsc": [0.854, 0.851, 0.851, 0.857]},
    "0.6-1": {"mean": 0.843, "std": 0.013, "dsc": [0.850, 0.855, 0.848, 0.822]},
    "0-1": {"mean": 0.824, "std": 0.011, "dsc": [0.815, 0.841, 0.828, 0.812]},
}


# ---------------------------------------------------------------------------------------
# Collecting
# ---------------------------------------------------------------------------------------


def _scores_file(recorded: str, chkpt_dir: str, name: str) -> str:
    """The per-organ scores file of a run.

    The recorded path is used when it exists; otherwise (the results folder was moved
    or mounted elsewhere) the same path relative to the run's ``<run>_files`` folder.
    """
    if os.path.isfile(recorded):
        return recorded
    files = run_paths(chkpt_dir, name)["dir"]
    marker = f"{name}_files{os.sep}"
    if marker in recorded:
        moved = os.path.join(files, recorded.split(marker, 1)[1])
        if os.path.isfile(moved):
            return moved
    raise UserError(f"run {name}: its scores file {recorded!r} does not exist")


def collect(
    plan: Sequence[Run], rows: Sequence[Row], chkpt_dir: str, budget: int | None = None
) -> dict[str, dict[str, Any]]:
    """Read every finished fine-tuning's ``result.json`` (and per-organ scores) per row.

    ``budget``: only the fine-tunings of that label budget (``--n_train_cases``; None: the
    fine-tunings on every training case, the grid without a budget axis).

    Returns ``{row_key: {"label", "runs": [run names in DSC order], "dsc": [float or None],
    "summary": [summary dict or None], "organs": [per_organ dict or None]}}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        runs = [r for r in plan if r.kind == "finetune" and r.row == row.key and r.budget == budget]
        entry = {"label": row.label, "runs": [r.name for r in runs], "dsc": [], "summary": [], "organs": []}
        for r in runs:
            if not is_finished(chkpt_dir, r.name):
                entry["dsc"].append(None)
                entry["summary"].append(None)
                entry["organs"].append(None)
                continue
            res = read_result(chkpt_dir, r.name)
            path = result_path(chkpt_dir, r.name)
            dsc = res.get("best_dice_paper")
            if not isinstance(dsc, (int, float)) or isinstance(dsc, bool) or not math.isfinite(dsc):
                raise UserError(f"{path} has no finite 'best_dice_paper' (found {dsc!r})")
            entry["dsc"].append(float(dsc))
            entry["summary"].append(res.get("summary"))
            organs = None
            if res.get("scores"):
                sp = _scores_file(str(res["scores"]), chkpt_dir, r.name)
                try:
                    with open(sp) as f:
                        organs = json.load(f)["summary"]
                except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                    raise UserError(f"cannot read the per-organ scores {sp} of run {r.name}: {e}") from None
            entry["organs"].append(organs)
        out[row.key] = entry
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and POPULATION standard deviation (ddof=0), as the paper's ``±``."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=0))


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------

STD_NOTE = (
    "Mean ± std over the row's runs; std is the population standard deviation (ddof=0), "
    "which reproduces the paper's ± from its four listed DSCs (to within their rounding)."
)


def _fmt(v: float | None, nd: int = 3) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


def table_rows(rows: Sequence[Row], collected: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per row: interval, mean, std, dsc list, paper numbers, runs finished."""
    out = []
    for row in rows:
        c = collected[row.key]
        got = [d for d in c["dsc"] if d is not None]
        mean, std = mean_std(got) if got else (None, None)
        paper = PAPER_TABLE.get(row.key)
        out.append(
            {
                "key": row.key,
                "interval": row.label,
                "min_iou": row.min_iou,
                "max_iou": row.max_iou,
                "mean": mean,
                "std": std,
                "dsc": list(c["dsc"]),
                "paper_mean": paper["mean"] if paper else None,
                "paper_std": paper["std"] if paper else None,
                "n_finished": len(got),
                "n_runs": len(c["dsc"]),
            }
        )
    return out


def render_table(
    rows: Sequence[Row],
    collected: dict[str, dict[str, Any]],
    out_dir: str,
    title: str = "",
    stem: str = "table",
    paper: bool = True,
) -> dict[str, str]:
    """Write ``<stem>.md`` and ``<stem>.csv`` (default ``table.*``; rows in the given order); return
    paths and the Markdown. ``paper``: the paper's numbers beside ours (left empty when False, e.g.
    for a label budget the paper did not run)."""
    trs = table_rows(rows, collected)
    if not paper:
        for t in trs:
            t["paper_mean"] = t["paper_std"] = None
    n = max(t["n_runs"] for t in trs)
    head = (
        ["IoU interval", "Mean DSC ± std"]
        + [f"DSC {i}" for i in range(1, n + 1)]
        + ["Paper: mean ± std", "Runs finished"]
    )
    md = []
    if title:
        md += [f"# {title}", ""]
    md += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for t in trs:
        ours = "—" if t["mean"] is None else f"{t['mean']:.3f} ± {t['std']:.3f}"
        dsc = [_fmt(d) for d in t["dsc"]] + [""] * (n - len(t["dsc"]))
        paper = "—" if t["paper_mean"] is None else f"{t['paper_mean']:.3f} ± {t['paper_std']:.3f}"
        md.append("| " + " | ".join([t["interval"], ours, *dsc, paper, f"{t['n_finished']}/{t['n_runs']}"]) + " |")
    md += ["", STD_NOTE, ""]
    text = "\n".join(md)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["interval", "min_iou", "max_iou", "mean_dsc", "std_dsc"]
        + [f"dsc_{i}" for i in range(1, n + 1)]
        + ["paper_mean", "paper_std", "n_finished", "n_runs"]
    )
    for t in trs:
        w.writerow(
            [t["interval"], _csv(t["min_iou"]), _csv(t["max_iou"]), _csv(t["mean"]), _csv(t["std"])]
            + [_csv(d) for d in t["dsc"]]
            + [""] * (n - len(t["dsc"]))
            + [_csv(t["paper_mean"]), _csv(t["paper_std"]), t["n_finished"], t["n_runs"]]
        )
    md_path, csv_path = os.path.join(out_dir, f"{stem}.md"), os.path.join(out_dir, f"{stem}.csv")
    atomic_write_text(md_path, text)
    atomic_write_text(csv_path, buf.getvalue())
    return {"md": md_path, "csv": csv_path, "text": text}


def _csv(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.6f}" if isinstance(v, float) else str(v)


def organ_means(rows: Sequence[Row], collected: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per row: per organ Dice and NSD averaged over the row's finished runs, and their means.

    Returns ``{row_key: {"n_runs", "organs": {name: {"organ_id", "dice", "nsd"}}, "dice_mean", "nsd_mean"}}``
    (rows without any per-organ scores are left out).
    """
    out = {}
    for row in rows:
        summaries = [s for s in collected[row.key]["organs"] if s]
        if not summaries:
            continue
        names = list(summaries[0]["per_organ"])
        organs = {}
        for name in names:
            vals = [s["per_organ"][name] for s in summaries if name in s["per_organ"]]
            organs[name] = {
                "organ_id": vals[0].get("organ_id"),
                "dice": float(np.mean([v["dice"] for v in vals])),
                "nsd": float(np.mean([v["nsd"] for v in vals])),
            }
        out[row.key] = {
            "n_runs": len(summaries),
            "organs": organs,
            "dice_mean": float(np.mean([s["dice_mean"] for s in summaries])),
            "nsd_mean": float(np.mean([s["nsd_mean"] for s in summaries])),
        }
    return out


def render_organs(
    rows: Sequence[Row],
    collected: dict[str, dict[str, Any]],
    out_dir: str,
    stem: str = "organs",
    title: str = "Challenge-grade scores per organ",
    intro: str = "Per-organ Dice and normalised surface Dice (NSD) on the validation cases (as FLARE 2022 computes "
    "them; the NSD tolerances are recorded in each run's val_scores.json), each the mean over cases, then averaged "
    "over the row's finished fine-tunings.",
) -> dict[str, str]:
    """Write ``<stem>.md`` (a Dice table and an NSD table: organs x intervals) and ``<stem>.csv``
    (default ``organs.*``; ``collected[row]["organs"]`` lists per-organ summaries, one per run)."""
    means = organ_means(rows, collected)
    present = [r for r in rows if r.key in means]
    md = [f"# {title}", "", intro, ""]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["interval", "organ_id", "organ", "dice", "nsd", "n_runs"])
    if not present:
        md.append("(no finished fine-tuning yet)")
    else:
        organ_names: list[str] = []
        for r in present:
            for name in means[r.key]["organs"]:
                if name not in organ_names:
                    organ_names.append(name)
        for metric, title in (("dice", "Dice"), ("nsd", "NSD")):
            md += [
                f"## {title}",
                "",
                "| Organ | " + " | ".join(r.label for r in present) + " |",
                "|" + "|".join(["---"] * (len(present) + 1)) + "|",
            ]
            for name in organ_names:
                vals = [means[r.key]["organs"].get(name, {}).get(metric) for r in present]
                md.append(f"| {name} | " + " | ".join(_fmt(v) for v in vals) + " |")
            md.append("| **mean** | " + " | ".join(_fmt(means[r.key][f"{metric}_mean"]) for r in present) + " |")
            md.append("| runs | " + " | ".join(str(means[r.key]["n_runs"]) for r in present) + " |")
            md.append("")
        for r in present:
            m = means[r.key]
            for name, o in m["organs"].items():
                w.writerow([r.label, o["organ_id"], name, _csv(o["dice"]), _csv(o["nsd"]), m["n_runs"]])
            w.writerow([r.label, "", "mean", _csv(m["dice_mean"]), _csv(m["nsd_mean"]), m["n_runs"]])
    md_path, csv_path = os.path.join(out_dir, f"{stem}.md"), os.path.join(out_dir, f"{stem}.csv")
    atomic_write_text(md_path, "\n".join(md) + "\n")
    atomic_write_text(csv_path, buf.getvalue())
    return {"md": md_path, "csv": csv_path}


def budget_rows(rows: Sequence[Row], per_budget: dict[int, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The label-budget axis as rows: one dict per (IoU interval, budget) with the mean and the
    population std over the finished fine-tunings of ``dice_paper`` (the table's Dice) and of the
    challenge-grade Dice (mean over organs), and the runs finished.

    Args:
        per_budget: ``{n_train_cases: collect(..., budget=n_train_cases)}``.
    """
    out = []
    for row in rows:
        for n in sorted(per_budget):
            c = per_budget[n][row.key]
            got = [d for d in c["dsc"] if d is not None]
            organs = [s["dice_mean"] for s in c["organs"] if s]
            mean, std = mean_std(got) if got else (None, None)
            o_mean, o_std = mean_std(organs) if organs else (None, None)
            out.append(
                {
                    "key": row.key,
                    "interval": row.label,
                    "n_train_cases": int(n),
                    "mean": mean,
                    "std": std,
                    "organ_dice_mean": o_mean,
                    "organ_dice_std": o_std,
                    "n_finished": len(got),
                    "n_runs": len(c["dsc"]),
                }
            )
    return out


def render_budget(
    rows: Sequence[Row], per_budget: dict[int, dict[str, dict[str, Any]]], out_dir: str, title: str = ""
) -> dict[str, str]:
    """``budget.md`` (Dice per IoU interval and number of labelled training cases: one column per
    budget) and ``budget.csv`` (one line per interval and budget); returns the paths and the Markdown."""
    brs = budget_rows(rows, per_budget)
    budgets = sorted(per_budget)
    md = [f"# {title}", ""] if title else []
    md += [
        "Dice (dice_paper, the table's score) against the number of labelled training cases: the first N cases "
        "of the split's training list, the same for every row; mean ± std over the row's finished fine-tunings "
        "(runs finished in brackets).",
        "",
        "| IoU interval | " + " | ".join(f"N = {n}" for n in budgets) + " |",
        "|" + "|".join(["---"] * (len(budgets) + 1)) + "|",
    ]
    for row in rows:
        cells = []
        for n in budgets:
            b = next(x for x in brs if x["key"] == row.key and x["n_train_cases"] == n)
            v = "—" if b["mean"] is None else f"{b['mean']:.3f} ± {b['std']:.3f}"
            cells.append(f"{v} ({b['n_finished']}/{b['n_runs']})")
        md.append(f"| {row.label} | " + " | ".join(cells) + " |")
    md += ["", STD_NOTE, ""]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "interval",
            "n_train_cases",
            "mean_dsc",
            "std_dsc",
            "organ_dice_mean",
            "organ_dice_std",
            "n_finished",
            "n_runs",
        ]
    )
    for b in brs:
        w.writerow(
            [
                b["interval"],
                b["n_train_cases"],
                _csv(b["mean"]),
                _csv(b["std"]),
                _csv(b["organ_dice_mean"]),
                _csv(b["organ_dice_std"]),
                b["n_finished"],
                b["n_runs"],
            ]
        )
    md_path, csv_path = os.path.join(out_dir, "budget.md"), os.path.join(out_dir, "budget.csv")
    text = "\n".join(md)
    atomic_write_text(md_path, text)
    atomic_write_text(csv_path, buf.getvalue())
    return {"md": md_path, "csv": csv_path, "text": text}


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------


def plot_label_budget(rows: Sequence[Row], per_budget: dict[int, dict[str, dict[str, Any]]], path: str) -> str | None:
    """``label_budget.png``: Dice against the number of labelled training cases, one line per IoU
    interval (mean ± std over its finished fine-tunings as error bars); left ``dice_paper`` (the
    table's Dice), right the challenge-grade Dice (mean over organs)."""
    brs = budget_rows(rows, per_budget)
    if not any(b["mean"] is not None for b in brs):
        return None
    fig = Figure(figsize=(10.0, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (key, err, ylabel) in zip(
        axes,
        (
            ("mean", "std", "Dice (dice_paper, the table's score)"),
            ("organ_dice_mean", "organ_dice_std", "challenge-grade Dice (mean over organs)"),
        ),
    ):
        for k, row in enumerate(rows):
            pts = [b for b in brs if b["key"] == row.key and b[key] is not None]
            if not pts:
                continue
            x = [b["n_train_cases"] * (1.0 + 0.015 * (k - (len(rows) - 1) / 2)) for b in pts]  # dodge the bars
            ax.errorbar(
                x,
                [b[key] for b in pts],
                yerr=[b[err] for b in pts],
                marker="o",
                capsize=3,
                label=row.label,
            )
        budgets = sorted(per_budget)
        ax.set_xscale("log")
        ax.set_xticks(budgets, [str(n) for n in budgets])
        ax.minorticks_off()
        ax.set_xlabel("labelled training cases (first N of the split)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title="IoU interval", title_fontsize=8)
    fig.suptitle("Fine-tuning Dice against the label budget, per IoU interval (mean ± std over runs)", fontsize=10)
    _save_fig(fig, path)
    return path


def _save_fig(fig: Figure, path: str) -> None:
    """Write ``fig`` as a PNG, atomically. Figures are plain ``Figure`` objects (no pyplot,
    so no global backend or figure list is touched)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


def collapse_curves(
    plan: Sequence[Run], rows: Sequence[Row], chkpt_dir: str, key: str = "collapse"
) -> dict[str, dict[str, list[float]]]:
    """Per pretrained row: epochs and the collapse coefficient averaged over its pretrainings.

    Only epochs logged by every pretraining of the row are kept. Returns
    ``{row_key: {"epoch": [...], "mean": [...], "n_runs": k}}``.
    """
    out = {}
    for row in rows:
        runs = [r for r in plan if r.kind == "pretrain" and r.row == row.key]
        series = []
        for r in runs:
            recs = [rec for rec in read_log(run_paths(chkpt_dir, r.name)["log"]) if key in rec and "epoch" in rec]
            if recs:
                series.append({int(rec["epoch"]): float(rec[key]) for rec in recs})
        if not series:
            continue
        epochs = sorted(set.intersection(*(set(s) for s in series)))
        if not epochs:
            continue
        out[row.key] = {
            "epoch": epochs,
            "mean": [float(np.mean([s[e] for s in series])) for e in epochs],
            "n_runs": len(series),
        }
    return out


def plot_collapse(curves: dict[str, dict[str, list[float]]], rows: Sequence[Row], path: str) -> str | None:
    """``collapse.png``: the collapse coefficient over pretraining epochs, one line per interval."""
    present = [r for r in rows if r.key in curves]
    if not present:
        return None
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    for r in present:
        c = curves[r.key]
        ax.plot(
            c["epoch"], c["mean"], marker="o" if len(c["epoch"]) < 15 else None, label=f"{r.label} (n={c['n_runs']})"
        )
    ax.set_xlabel("pretraining epoch")
    ax.set_ylabel("collapse coefficient  max(0, 1 - sqrt(d) s)")
    ax.set_title("Collapse of the SimSiam predictor output (mean over pretrainings)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_fig(fig, path)
    return path


def organ_sharing(
    label_paths: Sequence[str],
    rows: Sequence[Row],
    crop_size: int,
    n_pairs: int = 2000,
    seed: int = 0,
    strict: bool = False,
    iou_sampler: str = "exact",
    layout: str = "ioupos",
) -> dict[str, dict[str, Any]]:
    """Per interval: the fraction of positive pairs whose two crops share at least one organ
    (the thesis' Figure 3.2). ``layout``: the label slices' ``data.SLICE_LAYOUTS``.

    ``n_pairs`` pairs are drawn per interval on the labelled 2D slices that contain at least
    one organ and are at least ``crop_size`` on both axes: a slice uniformly at random, then
    a crop pair from ``iou_crops.make_sampler(iou_sampler, ...)`` (same sampler and ``strict``
    as pretraining), all from one numpy generator seeded with ``seed``. As in the thesis'
    figure ("cases where both views contained background only were excluded"), pairs whose
    two crops both hold background only are left out; of the others, a pair shares an organ
    when some organ id > 0 occurs in both crops.

    Returns:
        ``{row_key: {"fraction", "n_pairs_considered", "n_pairs_left_out", "n_pairs"
        (drawn = considered + left out), "n_shared", "n_slices", "mean_iou", "iou_sampler"}}``;
        ``fraction`` = n_shared / n_pairs_considered (None when every pair was left out).

    Raises:
        UserError: no labelled slice is usable.
    """
    labels = []
    for p in label_paths:
        lab = read_label_2d(p, layout)
        if lab.max() > 0 and min(lab.shape) >= crop_size:
            labels.append(lab)
    if not labels:
        raise UserError(
            f"none of the {len(label_paths)} labelled slices has an organ and is at least {crop_size} pixels on both axes"
        )
    out = {}
    for row in rows:
        if not row.pretrained:
            continue
        sampler = make_sampler(iou_sampler, crop_size, row.min_iou, row.max_iou, strict)
        rng = np.random.default_rng(seed)
        shared = left_out = 0
        ious = []
        for _ in range(n_pairs):
            lab = labels[int(rng.integers(len(labels)))]
            a, b = sampler.sample(lab.shape, rng)
            ca = lab[a[0] : a[0] + crop_size, a[1] : a[1] + crop_size]
            cb = lab[b[0] : b[0] + crop_size, b[1] : b[1] + crop_size]
            oa = np.unique(ca)
            ob = np.unique(cb)
            oa, ob = oa[oa > 0], ob[ob > 0]
            ious.append(crop_iou(a, b, crop_size))
            if oa.size == 0 and ob.size == 0:
                left_out += 1  # both views background only: not counted (thesis, Fig. 3.2)
            elif np.intersect1d(oa, ob).size:
                shared += 1
        considered = n_pairs - left_out
        out[row.key] = {
            "fraction": shared / considered if considered else None,
            "n_pairs_considered": considered,
            "n_pairs_left_out": left_out,
            "n_pairs": n_pairs,
            "n_shared": shared,
            "n_slices": len(labels),
            "mean_iou": float(np.mean(ious)),
            "iou_sampler": iou_sampler,
        }
    return out


def plot_organ_sharing(
    fractions: dict[str, dict[str, Any]], rows: Sequence[Row], path: str, crop_size: int
) -> str | None:
    """``organ_sharing.png``: bars of the organ-sharing fraction, the interval on x."""
    present = [r for r in rows if r.key in fractions]
    if not present:
        return None
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    vals = [fractions[r.key]["fraction"] for r in present]
    bars = ax.bar(range(len(present)), [0.0 if v is None else v for v in vals], color="tab:blue")
    for b, v, r in zip(bars, vals, present):
        text = "n/a" if v is None else f"{v:.2f}\n({fractions[r.key]['n_pairs_considered']})"
        ax.text(b.get_x() + b.get_width() / 2, (v or 0.0) + 0.01, text, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(present)), [r.label for r in present], rotation=15, fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_xlabel("IoU interval of the positive pairs")
    ax.set_ylabel("fraction of pairs sharing an organ")
    f0 = fractions[present[0].key]
    sampler = "" if f0.get("iou_sampler", "exact") == "exact" else f", {f0['iou_sampler']} sampler"
    ax.set_title(
        f"Positive pairs whose crops share at least one organ\n({f0['n_pairs']} pairs per interval drawn, pairs "
        f"with both views background only left out (pairs kept in brackets);\n{crop_size}x{crop_size} crops, "
        f"{f0['n_slices']} labelled slices with organs{sampler})",
        fontsize=8,
    )
    ax.grid(axis="y", alpha=0.3)
    _save_fig(fig, path)
    return path


def plot_crop_pairs(
    image_path: str,
    label_path: str | None,
    rows: Sequence[Row],
    path: str,
    crop_size: int,
    n_examples: int = 3,
    seed: int = 0,
    strict: bool = False,
    iou_sampler: str = "exact",
    layout: str = "ioupos",
) -> str | None:
    """``crop_pairs.png``: example crop pairs of each interval on one labelled slice (drawn with
    ``iou_sampler``, as the pretraining; ``layout``: the slices' ``data.SLICE_LAYOUTS``).

    One row of panels per interval: the slice (organ outlines when a label is given) with
    the two crops of a pair as a red and a blue square and their IoU in the title.
    """
    present = [r for r in rows if r.pretrained]
    if not present:
        return None
    img = read_image_2d(image_path, layout)
    lab = read_label_2d(label_path, layout) if label_path else None
    if min(img.shape) < crop_size:
        raise UserError(f"slice {image_path} ({img.shape}) is smaller than the crop size {crop_size}")
    fig = Figure(figsize=(2.2 * n_examples + 0.4, 2.3 * len(present) + 0.4), layout="constrained")
    axes = fig.subplots(len(present), n_examples, squeeze=False)
    for i, r in enumerate(present):
        sampler = make_sampler(iou_sampler, crop_size, r.min_iou, r.max_iou, strict)
        rng = np.random.default_rng(seed)
        for j in range(n_examples):
            ax = axes[i][j]
            a, b = sampler.sample(img.shape, rng)
            # arrays are (X, Y); show x horizontally and y vertically (anterior up)
            ax.imshow(img.T, cmap="gray", origin="lower", vmin=0, vmax=1)
            if lab is not None and lab.max() > 0:
                ax.contour((lab.T > 0).astype(float), levels=[0.5], colors="yellow", linewidths=0.5, origin="lower")
            for start, color in ((a, "red"), (b, "deepskyblue")):
                ax.add_patch(
                    Rectangle(
                        (start[0] - 0.5, start[1] - 0.5),
                        crop_size,
                        crop_size,
                        fill=False,
                        edgecolor=color,
                        linewidth=1.5,
                    )
                )
            ax.set_title(f"IoU {crop_iou(a, b, crop_size):.2f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(r.label, fontsize=8)
    fig.suptitle(f"Example positive pairs per IoU interval ({crop_size}x{crop_size} crops)", fontsize=9)
    _save_fig(fig, path)
    return path


def make_figures(
    plan: Sequence[Run],
    rows: Sequence[Row],
    chkpt_dir: str,
    fig_dir: str,
    labelled_dir: str,
    split: dict[str, list[str]],
    crop_size: int,
    spatial_dims: int = 2,
    n_pairs: int = 2000,
    iou_sampler: str = "exact",
) -> dict[str, str]:
    """Every figure of the table: ``collapse.png`` from the pretraining logs; ``organ_sharing.png``
    (with its numbers in ``organ_sharing.json``) and ``crop_pairs.png`` from the labelled slices.

    Args:
        labelled_dir: the fine-tuning's preprocessed labelled slices; ``split`` names its cases.
        crop_size: the pretraining crop size.
        spatial_dims: 3 draws only ``collapse.png`` (the pair figures are for 2D slices).
        n_pairs: crop pairs per interval for ``organ_sharing.png``.
        iou_sampler: the pretraining's crop-pair sampler (``"exact"`` or ``"original"``).

    Returns:
        ``{figure name: path}`` of the figures drawn.
    """
    made = {}
    curves = collapse_curves(plan, rows, chkpt_dir)
    p = plot_collapse(curves, rows, os.path.join(fig_dir, "collapse.png"))
    if p:
        made["collapse"] = p
    else:
        logger.info("collapse.png: no pretraining log has a 'collapse' value yet")
    if spatial_dims != 2:
        logger.info("organ_sharing.png and crop_pairs.png are drawn for 2D slices only")
        return made
    layout = labelled_slice_layout(labelled_dir)
    pairs = list_finetune_pairs(labelled_dir, split, 2, layout)
    items = pairs["train"] + pairs["val"]
    frac = organ_sharing(
        [it["label"] for it in items], rows, crop_size, n_pairs=n_pairs, seed=0, iou_sampler=iou_sampler, layout=layout
    )
    p = plot_organ_sharing(frac, rows, os.path.join(fig_dir, "organ_sharing.png"), crop_size)
    if p:
        made["organ_sharing"] = p
        atomic_write_json(os.path.join(fig_dir, "organ_sharing.json"), frac)
    # the example slice: the one with the most organs (first such slice of the validation cases)
    best, best_n = None, -1
    for it in pairs["val"] or pairs["train"]:
        n = len(set(read_label_2d(it["label"], layout).ravel().tolist()) - {0})
        if n > best_n:
            best, best_n = it, n
    if best is not None:
        p = plot_crop_pairs(
            best["image"],
            best["label"],
            rows,
            os.path.join(fig_dir, "crop_pairs.png"),
            crop_size,
            iou_sampler=iou_sampler,
            layout=layout,
        )
        if p:
            made["crop_pairs"] = p
    return made
