"""Fault injection (issue 18): no command destroys input data, silently changes a result, or
leaves a run that cannot continue. One test per mechanism:

1. inputs are never written (a pointed ``--save_predictions``, an output folder on its input);
2. every byte read is verified (a bit-flipped ``.nii.gz``, a cut or flipped PNG, image / label shapes);
3. what a run is made of is pinned (data folder, split contents, starting checkpoint);
4. folder walks follow links (with a loop);
5. scores cover the reference (a missing prediction);
6. a run is resumable at every instant (a SIGKILL inside the first state save, a full file
   system, two grids or two preprocessings started on one fresh folder);
7. outputs are checked before the work;
8. one line for every failure a user can cause (non-finite flags in every script, OSError,
   also from data-loader workers);
9. data sets of other layouts: a ``dataset.json`` that is cut or disagrees with its files, labels
   outside the declared set, a missing fold, a hand-edited split beside the output, a label set
   changed under a run.

The full-disk and read-only cases mount a tiny tmpfs; where that is impossible (no root, a
container that refuses ``mount``) they skip with the reason.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import importlib
import json
import multiprocessing
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import data
import main_finetune
import main_simsiam
import make_phantoms
import metrics
import models
import predict
import preprocess_flare_labelled
import preprocess_flare_unlabelled
import utils
from conftest import cli_errors, run_main, save_model, tree_hashes, wait_for
from transforms import LoadSliceAndLabel2d
from utils import TrainingError, UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SPLIT_CASES = {"train": ["FLARE22_Tr_0001"], "val": ["FLARE22_Tr_0002", "FLARE22_Tr_0003"]}


# ---------------------------------------------------------------------------------------
# Data and helpers
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ph(tmp_path_factory):
    """Three labelled and two unlabelled phantoms (48 x 48 x 8, raw FLARE layout), both
    preprocessed to 2D slices."""
    root = tmp_path_factory.mktemp("faults")
    made = make_phantoms.generate_dataset(
        root / "raw", n_labelled=3, n_unlabelled=2, size_xy=48, n_slices=8, n_train=1, num_workers=1
    )
    lab, unl = root / "lab", root / "unl"
    _call(preprocess_flare_labelled, made["labelled_dir"], lab, "--split_path", made["split_path"])
    _call(preprocess_flare_unlabelled, made["unlabelled_dir"], unl)
    return {
        "raw_lab": Path(made["labelled_dir"]),
        "raw_unl": Path(made["unlabelled_dir"]),
        "split": Path(made["split_path"]),
        "lab": lab,
        "unl": unl,
    }


def _call(mod, data_dir, out, *extra):
    """A preprocessing script's ``main`` on ``--data_dir data_dir --output_dir out`` and ``extra``."""
    return run_main(mod, ["--data_dir", data_dir, "--output_dir", out, *extra])


def _pt_argv(data_dir, chkpt_dir, *extra):
    return [
        "--data_dir",
        data_dir,
        "--chkpt_dir",
        chkpt_dir,
        "--low_resource_mode",
        "--crop_size",
        "32",
        "--batch_size",
        "4",
        "--max_images",
        "8",
        "--num_workers",
        "0",
        "--no-progress",
        "--device",
        "cpu",
        "--run_name",
        "r",
        *extra,
    ]


def _ft_argv(ph, chkpt_dir, *extra):
    return [
        "--data_dir",
        ph["lab"],
        "--split_path",
        ph["split"],
        "--chkpt_dir",
        chkpt_dir,
        "--low_resource_mode",
        "--crop_size",
        "64",
        "--batch_size",
        "2",
        "--warmup_epochs",
        "0",
        "--num_workers",
        "0",
        "--n_vis",
        "0",
        "--no-progress",
        "--device",
        "cpu",
        "--run_name",
        "f",
        *extra,
    ]


def _cfg():
    return models.encoder_config("swin", 2, 12, low_resource_mode=True, crop_size=64)


def _encoder_file(path: Path, seed: int) -> Path:
    """A pretrained-encoder file (random weights drawn with ``seed``) for ``--chkpt_path``."""
    torch.manual_seed(seed)
    torch.save(models.encoder_checkpoint(models.build_encoder(_cfg()), _cfg(), "simsiam", 1, {}), path)
    return path


def _crc_flipped_gzip(path: Path) -> None:
    """Damage 200 bytes in the middle of a ``.nii.gz``'s data as a flipped-bit disk would: the
    deflate stream stays valid, only the gzip trailer's CRC-32 no longer matches."""
    sound = gzip.decompress(path.read_bytes())
    bad = bytearray(sound)
    mid = len(bad) // 2
    for i in range(mid, mid + 200):
        bad[i] ^= 0xFF
    co = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = co.compress(bytes(bad)) + co.flush()
    head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    path.write_bytes(head + body + struct.pack("<II", zlib.crc32(sound), len(sound) & 0xFFFFFFFF))


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A tiny tmpfs mounted at ``path`` (skips the test where ``mount`` is refused)."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here: a full or read-only file system cannot be simulated")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and a container that allows mount): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _remount(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


# ---------------------------------------------------------------------------------------
# 1. Inputs are never written
# ---------------------------------------------------------------------------------------


def test_inputs_are_never_written(ph, tmp_path, capsys, monkeypatch):
    model = save_model(tmp_path / "model.pt", dice_paper=0.0)  # untrained weights
    evaluate = ["--eval_only", "--data_dir", ph["lab"], "--split_path", ph["split"], "--chkpt_path", model]
    evaluate += ["--chkpt_dir", tmp_path / "runs", "--no-progress", "--device", "cpu", "--n_vis", "0"]

    # --save_predictions pointed at a raw labelled FLARE folder: every raw file keeps its bytes
    raw = tmp_path / "raw_copy"
    shutil.copytree(ph["raw_lab"], raw)
    before = tree_hashes(raw)
    code, errors = cli_errors(main_finetune, [*evaluate, "--save_predictions", raw], capsys, monkeypatch)
    assert code == 0, errors
    after = tree_hashes(raw)
    assert {k: after[k] for k in before} == before
    new = sorted(set(after) - set(before))
    assert new and not [n for n in new if n.startswith(("images/", "labels/"))], new  # never the raw layout

    # a file of the user's where a prediction goes: refused without --overwrite, kept
    preds = tmp_path / "preds"
    preds.mkdir()
    mine = preds / "FLARE22_Tr_0002.nii.gz"
    mine.write_bytes(b"my own notes")
    code, errors = cli_errors(main_finetune, [*evaluate, "--save_predictions", preds], capsys, monkeypatch)
    assert code == 2 and len(errors) == 1 and str(mine) in errors[0] and "--overwrite" in errors[0], errors
    assert mine.read_bytes() == b"my own notes"
    code, errors = cli_errors(
        main_finetune, [*evaluate, "--save_predictions", preds, "--overwrite"], capsys, monkeypatch
    )
    assert code == 0 and mine.read_bytes() != b"my own notes"

    # predict.py with -o at the raw data set's labels/: refused; its labels are neither overwritten nor
    # taken for finished predictions
    before = tree_hashes(raw)
    argv = ["-i", raw / "images", "-o", raw / "labels", "--chkpt_path", model, "--device", "cpu", "--no-progress"]
    code, errors = cli_errors(predict, argv, capsys, monkeypatch)
    assert code == 2 and len(errors) == 1 and "--overwrite" in errors[0] and str(raw / "labels") in errors[0], errors
    assert tree_hashes(raw) == before

    # the labelled preprocessing into (or inside) its own raw folder: refused, nothing written
    for out in (raw, raw / "labels" / "slices"):
        before = tree_hashes(raw)
        argv = ["--data_dir", raw, "--output_dir", out, "--split_path", ph["split"]]
        code, errors = cli_errors(preprocess_flare_labelled, argv, capsys, monkeypatch)
        assert code == 2 and len(errors) == 1 and "--data_dir" in errors[0], errors
        assert tree_hashes(raw) == before and not (raw / "labels" / "slices").exists()

    # a fine-tuning whose run file would be the checkpoint it starts from: refused, checkpoint kept
    enc = _encoder_file(tmp_path / "f.pt", seed=1)
    enc_bytes = enc.read_bytes()
    code, errors = cli_errors(
        main_finetune, _ft_argv(ph, tmp_path, "--chkpt_path", enc, "--n_epochs", "1"), capsys, monkeypatch
    )
    assert code == 2 and len(errors) == 1 and "--chkpt_path" in errors[0], errors
    assert enc.read_bytes() == enc_bytes


# ---------------------------------------------------------------------------------------
# 2. Every byte read is verified
# ---------------------------------------------------------------------------------------


def test_every_byte_read_is_verified(ph, tmp_path, capsys, monkeypatch, caplog):
    # a .nii.gz with 200 bytes flipped mid-stream (gzip CRC wrong): the case is named and skipped
    raw = tmp_path / "raw"
    shutil.copytree(ph["raw_unl"], raw)
    bad = sorted(raw.glob("*.nii.gz"))[1]
    _crc_flipped_gzip(bad)
    code, errors = cli_errors(
        preprocess_flare_unlabelled, ["--data_dir", raw, "--output_dir", tmp_path / "o"], capsys, monkeypatch
    )
    case = data.case_id_from_path(bad)
    assert code == 1 and len(errors) == 1 and case in errors[0], errors
    assert f"{case} failed: corrupt or truncated NIfTI {bad}" in caplog.text
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["n_cases"] == 1 and case not in manifest["cases"]
    assert not list((tmp_path / "o").glob(f"{case}_*.png"))
    with pytest.raises(UserError, match=f"corrupt or truncated NIfTI {bad}.*CRC"):
        data.load_nifti(bad)
    # metrics.py refuses such a label too
    lab = tmp_path / "lab.nii.gz"
    shutil.copy(ph["raw_lab"] / "labels" / "FLARE22_Tr_0002.nii.gz", lab)
    _crc_flipped_gzip(lab)
    with pytest.raises(UserError, match="CRC"):
        run_main(metrics, ["--pred", ph["raw_lab"] / "labels" / "FLARE22_Tr_0002.nii.gz", "--label", lab])

    # a PNG slice with its tail cut, or one byte flipped in its pixel data: refused, named
    png = sorted((ph["unl"]).glob("*.png"))[3]
    sound = png.read_bytes()
    cut, flipped = tmp_path / "cut_0000.png", tmp_path / "flipped_0000.png"
    cut.write_bytes(sound[:-20])
    blob = bytearray(sound)
    blob[sound.index(b"IDAT") + 20] ^= 0x01
    flipped.write_bytes(bytes(blob))
    for p in (cut, flipped):
        with pytest.raises(UserError, match=f"cannot read PNG {p}"):
            data.read_image_2d(p)

    # the fine-tuning loader pairs an image with a label 10 pixels shorter: refused, both named
    img = sorted((ph["lab"] / "imgs").glob("*.png"))[2]
    short = tmp_path / img.name
    Image.fromarray(np.asarray(Image.open(ph["lab"] / "labels" / img.name))[:-10]).save(short)
    with pytest.raises(UserError, match=f"image slice {img} has shape .*its label {short}"):
        LoadSliceAndLabel2d()({"image": str(img), "label": str(short)})


def _as_original_folder(lab: Path, out: Path) -> Path:
    """Our labelled slices rewritten as the original code's script writes them: ``imgs/<case>_0000_<i>.png``
    and ``labels/<case>_<i>.png``, each PNG the raw (X, Y) array."""
    for sub in ("imgs", "labels"):
        (out / sub).mkdir(parents=True)
    for p in sorted((lab / "imgs").glob("*.png")):
        case, z = data.parse_slice_name(p)
        Image.fromarray(data.read_image_2d_stored(p)).save(out / "imgs" / f"{case}_0000_{z}.png")
        Image.fromarray(data.read_label_2d(lab / "labels" / p.name)).save(out / "labels" / f"{case}_{z}.png")
    return out


def test_the_originals_artifacts_fail_in_one_line(ph, tmp_path, capsys, monkeypatch):
    """Inputs of issue 13 (folders and checkpoints of the original code, its flags and default
    folders): every fault is one line naming the file or value, exit code 2, nothing written."""
    olab = _as_original_folder(ph["lab"], tmp_path / "olab")
    label = olab / "labels" / "FLARE22_Tr_0002_3.png"
    blob = bytearray(label.read_bytes())
    blob[blob.index(b"IDAT") + 12] ^= 0x01  # a flipped bit in an original-layout label
    label.write_bytes(bytes(blob))
    argv = _ft_argv(ph, tmp_path / "runs", "--n_epochs", "1")
    argv[argv.index("--data_dir") + 1] = olab
    code, errors = cli_errors(main_finetune, argv, capsys, monkeypatch)
    assert code == 2 and errors == [f"error: cannot read PNG {label}: " + errors[0].split(": ", 2)[2]], errors
    assert "CRC" in errors[0]
    assert not (tmp_path / "runs" / "f_last.pt").exists()
    # a truncated checkpoint in the original's SimSiam layout
    torch.manual_seed(0)
    swin = models.build_encoder(_cfg()).backbone.state_dict()
    ck = tmp_path / "simsiam.pt"
    torch.save({"backbone.model." + k: v for k, v in swin.items()}, ck)
    ck.write_bytes(ck.read_bytes()[:-100])
    argv = _ft_argv(ph, tmp_path / "runs2", "--n_epochs", "1", "--chkpt_path", ck)
    code, errors = cli_errors(main_finetune, argv, capsys, monkeypatch)
    assert code == 2 and len(errors) == 1 and str(ck) in errors[0], errors
    # the original's preprocessing flags against the data's manifest.json
    argv = _ft_argv(ph, tmp_path / "runs3", "--n_epochs", "1", "--size_z", "3")
    code, errors = cli_errors(main_finetune, argv, capsys, monkeypatch)
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: --size_z 3 differs from the 2.5"), errors
    code, errors = cli_errors(
        main_simsiam, _pt_argv(ph["unl"], tmp_path / "runs4", "--a_max", "400"), capsys, monkeypatch
    )
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: --a_max 400 differs from the 500"), errors
    # the preprocessing scripts' default folders, missing: one line, nothing created
    monkeypatch.chdir(tmp_path)
    code, errors = cli_errors(preprocess_flare_unlabelled, [], capsys, monkeypatch)
    assert code == 2 and len(errors) == 1 and f"--data_dir {tmp_path / 'data' / 'ssl'} does not exist" in errors[0]
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------------------------------
# 3. What a run is made of is pinned
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_refuses_changed_inputs(ph, tmp_path):
    # pretraining: the data folder preprocessed again (one case fewer) under the same path
    d = tmp_path / "unl"
    shutil.copytree(ph["unl"], d)
    out = tmp_path / "pre"
    run_main(main_simsiam, _pt_argv(d, out, "--n_epochs", "1"))
    shutil.rmtree(d)
    one = tmp_path / "one_case"
    one.mkdir()
    first = sorted(ph["raw_unl"].glob("*.nii.gz"))[0]
    shutil.copy(first, one / first.name)
    _call(preprocess_flare_unlabelled, one, d)
    with pytest.raises(
        UserError, match=r"cannot resume .*the (data folder --data_dir|manifest\.json of --data_dir) changed"
    ):
        run_main(main_simsiam, _pt_argv(d, out, "--n_epochs", "1", "--resume"))

    # fine-tuning: the split file's contents, then the starting checkpoint, changed
    split = tmp_path / "split.json"
    split.write_text(json.dumps(SPLIT_CASES))
    enc = _encoder_file(tmp_path / "enc.pt", seed=1)
    ft = [*_ft_argv(ph, tmp_path / "ft", "--n_epochs", "1", "--chkpt_path", enc)]
    ft[ft.index("--split_path") + 1] = split
    run_main(main_finetune, ft)
    split.write_text(
        json.dumps({"train": SPLIT_CASES["val"][:1], "val": SPLIT_CASES["train"] + SPLIT_CASES["val"][1:]})
    )
    with pytest.raises(UserError, match=r"the split --split_path changed since the run started"):
        run_main(main_finetune, [*ft, "--resume"])
    split.write_text(json.dumps(SPLIT_CASES, indent=4))  # the same lists, formatted differently: accepted
    _encoder_file(enc, seed=2)
    with pytest.raises(UserError, match=r"the checkpoint --chkpt_path the run started from changed"):
        run_main(main_finetune, [*ft, "--resume"])
    _encoder_file(enc, seed=1)
    assert run_main(main_finetune, [*ft, "--resume"])["epochs_done"] == 1  # everything as recorded: it resumes


# ---------------------------------------------------------------------------------------
# 4. Folder walks follow links
# ---------------------------------------------------------------------------------------


def test_walks_follow_links_and_survive_loops(ph, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(ph["raw_unl"], elsewhere)
    first = sorted(elsewhere.glob("*.nii.gz"))[0]
    shutil.move(first, raw / first.name)
    (raw / "more").symlink_to(elsewhere, target_is_directory=True)
    (raw / "loop").symlink_to(raw, target_is_directory=True)
    assert sorted(data.find_unlabelled_cases(raw)) == ["Case_00001", "Case_00002"]

    slices = tmp_path / "slices"
    slices.mkdir()
    pngs = sorted(ph["unl"].glob("Case_00002_*.png"))
    for p in pngs:
        shutil.copy(p, slices / p.name)
    linked = tmp_path / "linked"
    linked.mkdir()
    for p in sorted(ph["unl"].glob("Case_00001_*.png")):
        shutil.copy(p, linked / p.name)
    (slices / "sub").symlink_to(linked, target_is_directory=True)
    (slices / "sub_again").symlink_to(linked, target_is_directory=True)  # one folder reached twice: listed once
    (slices / "loop").symlink_to(slices, target_is_directory=True)
    listed = data.list_pretrain_images(slices, 2)
    n_all = len(list(ph["unl"].glob("*.png")))
    assert len(listed) == n_all and len({os.path.basename(p) for p in listed}) == n_all


# ---------------------------------------------------------------------------------------
# 5. Scores cover the reference
# ---------------------------------------------------------------------------------------


def test_metrics_scores_every_labelled_case(ph, tmp_path):
    labels, preds = tmp_path / "labels", tmp_path / "preds"
    labels.mkdir()
    preds.mkdir()
    for c in ("FLARE22_Tr_0001", "FLARE22_Tr_0002"):
        shutil.copy(ph["raw_lab"] / "labels" / f"{c}.nii.gz", labels)
    shutil.copy(ph["raw_lab"] / "labels" / "FLARE22_Tr_0001.nii.gz", preds)  # a perfect prediction of one case
    argv = ["--pred_dir", preds, "--label_dir", labels]
    with pytest.raises(UserError, match=f"'FLARE22_Tr_0002' of --label_dir has no prediction {preds}"):
        run_main(metrics, argv)
    summary = run_main(metrics, [*argv, "--missing_as_zero", "--out_dir", tmp_path / "scores"])
    assert summary["n_cases"] == 2
    assert summary["per_case"]["FLARE22_Tr_0001"]["dice_mean"] == 1.0
    assert summary["per_case"]["FLARE22_Tr_0002"] == {"dice_mean": 0.0, "nsd_mean": 0.0}
    assert summary["dice_mean"] == pytest.approx(0.5)
    # a prediction without a label is an error too
    shutil.copy(ph["raw_lab"] / "labels" / "FLARE22_Tr_0003.nii.gz", preds)
    with pytest.raises(UserError, match="FLARE22_Tr_0003.nii.gz has no label"):
        run_main(metrics, [*argv, "--missing_as_zero"])


# ---------------------------------------------------------------------------------------
# 6. A run is resumable at every instant
# ---------------------------------------------------------------------------------------


def _die_in_first_state_save(argv):
    """Child process: the run, killed (SIGKILL) inside its first ``<run>_last.pt`` write, after
    the bytes went to the temporary file and before it is renamed."""
    original = utils.atomic_write

    @contextlib.contextmanager
    def dying(path, mode="wb"):
        with original(path, mode) as f:
            yield f
            if str(path).endswith("_last.pt"):
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)

    utils.atomic_write = dying
    torch.set_num_threads(1)
    run_main(main_simsiam, argv)


@pytest.mark.parametrize("again", ["--resume", "plain rerun"])
def test_kill_inside_the_first_state_save(again, ph, tmp_path):
    argv = _pt_argv(ph["unl"], tmp_path / "cut", "--n_epochs", "1")
    child = multiprocessing.get_context("fork").Process(target=_die_in_first_state_save, args=(argv,))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL
    cut = tmp_path / "cut"
    assert list(cut.glob(".r_last.pt.*.tmp")) and (cut / "r.pt").exists()
    assert not (cut / "r_last.pt").exists() and not (cut / "r_log.jsonl").exists()

    resumed = run_main(main_simsiam, argv + (["--resume"] if again == "--resume" else []))
    assert resumed["epochs_done"] == 1 and not list(cut.glob(".*.tmp"))
    assert [r["epoch"] for r in map(json.loads, (cut / "r_log.jsonl").read_text().splitlines())] == [1]
    full = run_main(main_simsiam, _pt_argv(ph["unl"], tmp_path / "full", "--n_epochs", "1"))
    a, b = torch.load(full["weights"], weights_only=True), torch.load(resumed["weights"], weights_only=True)
    assert all(torch.equal(a["encoder"][k], b["encoder"][k]) for k in a["encoder"])


def test_full_file_system(ph, tmp_path, capsys, monkeypatch):
    # a training run whose checkpoint folder fills up: one line naming the file, nothing half-written,
    # and the same command continues once there is room
    with tmpfs(tmp_path / "mnt", "600k") as mnt:
        argv = _pt_argv(ph["unl"], mnt / "runs", "--n_epochs", "2")
        code, errors = cli_errors(main_simsiam, argv, capsys, monkeypatch)
        assert code == 1 and len(errors) == 1, errors
        assert "No space left on device (ENOSPC)" in errors[0] and str(mnt / "runs" / "r") in errors[0], errors
        assert not [p for p in mnt.rglob("*") if p.name.endswith(".tmp")]
        _remount(mnt, "50m")
        code, errors = cli_errors(main_simsiam, [*argv, "--resume"], capsys, monkeypatch)
        assert code == 0, errors
        assert json.loads((mnt / "runs" / "r_files" / "result.json").read_text())["epochs_done"] == 2

    # the preprocessing: stops at once with one line (not one failure per case), partial case removed
    with tmpfs(tmp_path / "mnt2", "64k") as mnt:
        argv = ["--data_dir", ph["raw_unl"], "--output_dir", mnt / "out"]
        code, errors = cli_errors(preprocess_flare_unlabelled, argv, capsys, monkeypatch)
        assert code == 1 and len(errors) == 1 and "No space left on device (ENOSPC)" in errors[0], errors
        assert not [p for p in mnt.rglob("*") if p.name.endswith((".tmp", ".inprogress"))]
        _remount(mnt, "50m")
        code, errors = cli_errors(preprocess_flare_unlabelled, argv, capsys, monkeypatch)
        assert code == 0, errors
        written = tree_hashes(mnt / "out")
        assert written == {k: v for k, v in tree_hashes(ph["unl"]).items() if k in written}
        assert json.loads((mnt / "out" / "manifest.json").read_text())["n_cases"] == 2


# A command started with a pause inside one of its atomic writes of a slice (the temporary file
# written, not yet renamed), until the test lets it go: the moment at which a second command on
# the same folder used to delete the first one's live files.
PAUSED = """
import os, runpy, sys, time
sys.path.insert(0, {root!r})
import preprocessing, utils
calls = {{"n": 0}}
original = preprocessing.write_bytes
def paused_write(path, payload):
    calls["n"] += 1
    if calls["n"] != 3:
        return original(path, payload)
    with utils.atomic_write(path, "wb") as f:
        f.write(payload)
        f.flush()
        open({paused!r}, "w").close()
        deadline = time.time() + 240
        while not os.path.exists({go!r}) and time.time() < deadline:
            time.sleep(0.05)
preprocessing.write_bytes = paused_write
sys.argv = [{script!r}] + sys.argv[1:]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("command", ["reproduce_table", "preprocessing"])
def test_two_commands_on_one_fresh_folder_cooperate(command, ph, tmp_path):
    out = tmp_path / "grid"
    if command == "reproduce_table":
        script = ROOT / "reproduce_table.py"
        argv = ["--preset", "paper", "--output_dir", out, "--raw_labelled_dir", ph["raw_lab"]]
        argv += ["--raw_unlabelled_dir", ph["raw_unl"], "--labelled_dir", out / "lab", "--unlabelled_dir", out / "unl"]
        argv += ["--split", ph["split"], "--rows", "none,0.3-0.6"]
        argvs = [argv + ["--write_scripts", tmp_path / f"jobs{i}"] for i in range(2)]
        waiting = "is preparing the data"
    else:
        script = ROOT / "preprocess_flare_labelled.py"
        argvs = [["--data_dir", ph["raw_lab"], "--output_dir", out / "lab", "--split_path", ph["split"]]] * 2
        waiting = "that another process is preprocessing"
    paused, go = tmp_path / "paused", tmp_path / "go"
    wrapper = tmp_path / "paused.py"
    wrapper.write_text(PAUSED.format(root=str(ROOT), paused=str(paused), go=str(go), script=str(script)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    first = subprocess.Popen(
        [PY, wrapper, *map(str, argvs[0])], env=env, stderr=logs[0].open("w"), stdout=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: paused.exists() or first.poll() is not None, 240, "the first command to pause")
        assert first.poll() is None, logs[0].read_text()[-3000:]
        second = subprocess.Popen(
            [PY, script, *map(str, argvs[1])], env=env, stderr=logs[1].open("w"), stdout=subprocess.DEVNULL
        )
        wait_for(lambda: second.poll() is not None or waiting in logs[1].read_text(), 240, "the second command to wait")
        go.touch()
        codes = [first.wait(timeout=300), second.wait(timeout=300)]
    finally:
        go.touch()
        first.kill()
    texts = [p.read_text() for p in logs]
    assert codes == [0, 0], [t[-3000:] for t in texts]
    assert not any("Traceback" in t for t in texts)
    manifest = json.loads((out / "lab" / "manifest.json").read_text())
    assert manifest["n_cases"] == 3
    assert tree_hashes(out / "lab" / "imgs") == tree_hashes(ph["lab"] / "imgs")
    assert tree_hashes(out / "lab" / "labels") == tree_hashes(ph["lab"] / "labels")


# ---------------------------------------------------------------------------------------
# 7. Outputs are checked before the work
# ---------------------------------------------------------------------------------------


def test_outputs_are_checked_before_the_work(ph, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    # fine-tuning with --save_predictions on a file: refused before the first epoch
    runs = tmp_path / "runs"
    code, errors = cli_errors(
        main_finetune, _ft_argv(ph, runs, "--n_epochs", "1", "--save_predictions", a_file), capsys, monkeypatch
    )
    assert code == 2 and len(errors) == 1 and str(a_file) in errors[0], errors
    assert not (runs / "f_log.jsonl").exists() and not (runs / "f.pt").exists()
    # visualize_crops and metrics.py: an output under a file
    code, errors = cli_errors(
        importlib.import_module("visualize_crops"),
        ["--input_dir", ph["unl"], "--crop_size", "32", "--output", a_file / "crops.png"],
        capsys,
        monkeypatch,
    )
    assert code == 2 and len(errors) == 1 and str(a_file) in errors[0], errors
    label = ph["raw_lab"] / "labels" / "FLARE22_Tr_0001.nii.gz"
    code, errors = cli_errors(metrics, ["--pred", label, "--label", label, "--out_dir", a_file], capsys, monkeypatch)
    assert code == 2 and len(errors) == 1 and "is a file" in errors[0], errors
    # read-only file systems: every command stops at start-up with one line
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        commands = [
            (main_finetune, _ft_argv(ph, runs, "--n_epochs", "1", "--save_predictions", ro / "preds")),
            (main_simsiam, _pt_argv(ph["unl"], ro / "runs", "--n_epochs", "1")),
            (preprocess_flare_unlabelled, ["--data_dir", ph["raw_unl"], "--output_dir", ro / "out"]),
        ]
        for mod, argv in commands:
            code, errors = cli_errors(mod, argv, capsys, monkeypatch)
            assert code == 2 and len(errors) == 1 and "Read-only file system (EROFS)" in errors[0], (mod, errors)
        assert not (runs / "f_log.jsonl").exists()


# ---------------------------------------------------------------------------------------
# 8. One line for every failure a user can cause
# ---------------------------------------------------------------------------------------

SCRIPTS = [
    "main_simsiam",
    "main_dino",
    "main_finetune",
    "preprocess_flare_labelled",
    "preprocess_flare_unlabelled",
    "visualize_crops",
    "metrics",
    "reproduce_table",
    "predict",
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_non_finite_flag_values_are_refused_by_every_script(script, capsys, monkeypatch):
    mod = importlib.import_module(script)
    parser = mod.get_args_parser()
    required = [a for a in parser._actions if a.required]
    # number_or_json: the NSD tolerance flags (a number, or a JSON object of label id -> mm)
    floats = [a for a in parser._actions if a.type in (float, metrics.number_or_json) and a.option_strings]
    assert floats, f"{script} has no float flag"
    monkeypatch.setattr(utils, "setup_logging", lambda **kw: None)
    called = []
    for action in floats:
        for value in ("nan", "inf", "-inf"):
            argv = [x for a in required for x in (a.option_strings[0], "x")]
            if action.nargs in (None, "?"):
                argv.append(f"{action.option_strings[0]}={value}")  # "=": argparse takes "-inf" for a flag otherwise
            else:
                argv += [action.option_strings[0], "1.0", value]
            capsys.readouterr()
            with pytest.raises(SystemExit) as exc:
                utils.run_cli(called.append, parser, argv)
            err = capsys.readouterr().err.strip().splitlines()
            assert exc.value.code == 2 and len(err) == 1, (action.dest, value, err)
            assert err[0].startswith(f"error: --{action.dest} {float(value)}"), err
    assert not called  # main never ran


# ---------------------------------------------------------------------------------------
# 9. Data sets of other layouts: dataset.json, the label set, the splits (issue 15)
# ---------------------------------------------------------------------------------------


def _nnunet_copy(ph, root: Path) -> Path:
    """The three labelled phantoms as an nnU-Net v2 raw data set (FLARE's ids 1..13 folded into
    3 classes: liver 1, kidneys 2, the other organs 0)."""
    for i in range(1, 4):
        src = f"FLARE22_Tr_{i:04d}"
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        (root / "labelsTr").mkdir(parents=True, exist_ok=True)
        shutil.copy(ph["raw_lab"] / "images" / f"{src}_0000.nii.gz", root / "imagesTr" / f"c_{i}_0000.nii.gz")
        img = data.load_nifti(ph["raw_lab"] / "labels" / f"{src}.nii.gz")
        lab = np.asarray(img.dataobj)
        out = np.where(lab == 1, 1, np.where(np.isin(lab, (2, 13)), 2, 0)).astype(np.uint8)
        nib.save(nib.Nifti1Image(out, img.affine), str(root / "labelsTr" / f"c_{i}.nii.gz"))
    desc = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "kidney": 2}, "numTraining": 3}
    (root / "dataset.json").write_text(json.dumps({**desc, "file_ending": ".nii.gz"}))
    return root


def test_data_set_descriptions_labels_and_splits(ph, tmp_path, capsys, monkeypatch):
    raw = _nnunet_copy(ph, tmp_path / "nn")
    dj = raw / "dataset.json"
    good = dj.read_text()
    out = tmp_path / "out"

    def prep(*extra, data_dir=raw, output=out):
        return cli_errors(
            preprocess_flare_labelled, ["--data_dir", data_dir, "--output_dir", output, *extra], capsys, monkeypatch
        )

    # a dataset.json that is cut, disagrees with its folders, or declares regions: one line naming it, nothing written
    for text, needle in (
        (good[: len(good) // 2], f"cannot read {dj}"),
        (good.replace('"numTraining": 3', '"numTraining": 4'), "declares numTraining 4, but"),
        (good.replace('"kidney": 2', '"kidney": [1, 2]'), "is a region"),
    ):
        dj.write_text(text)
        code, errors = prep()
        assert code == 2 and len(errors) == 1 and needle in errors[0] and str(dj) in errors[0], errors
        assert not out.exists()
    dj.write_text(good)
    (tmp_path / "nothing").mkdir()
    code, errors = prep(data_dir=tmp_path / "nothing")
    assert code == 2 and "unknown layout" in errors[0]
    # nnU-Net's folds: a fold that is not there
    folds = tmp_path / "splits_final.json"
    folds.write_text(json.dumps([{"train": ["c_1"], "val": ["c_2", "c_3"]}]))
    code, errors = prep("--split_path", folds, "--fold", "3")
    assert code == 2 and "--fold 3" in errors[0] and not out.exists()

    # labels outside the declared set: the case is named and skipped (exit 1), the others are written
    lab = data.load_nifti(raw / "labelsTr" / "c_2.nii.gz")
    arr = np.asarray(lab.dataobj).copy()
    arr[1, 1, 1] = 3
    nib.save(nib.Nifti1Image(arr, lab.affine), str(raw / "labelsTr" / "c_2.nii.gz"))
    code, errors = prep("--split_path", folds, "--fold", "0")
    assert code == 1 and "1 of 3 cases failed: c_2" in errors[0]
    assert {data.case_id_from_path(p, is_slice=True) for p in os.listdir(out / "imgs")} == {"c_1", "c_3"}
    assert data.load_split(out / "split.json") == {"train": ["c_1"], "val": ["c_2", "c_3"]}  # fold 0, kept beside
    # the split beside the output, edited by hand, is not replaced silently
    split_file = out / "split.json"
    split_file.write_text(json.dumps({"train": ["c_2"], "val": ["c_1", "c_3"]}))
    code, errors = prep("--split_path", folds, "--fold", "0")
    assert code == 2 and "holds another split" in errors[0]
    assert data.load_split(split_file)["train"] == ["c_2"]
    nib.save(nib.Nifti1Image(np.minimum(arr, 2), lab.affine), str(raw / "labelsTr" / "c_2.nii.gz"))
    code, errors = prep("--split_path", folds, "--fold", "0", "--overwrite")
    assert code == 0 and data.load_split(split_file)["train"] == ["c_1"]

    # a fine-tuning run pins the label set: its manifest changed since the run started -> no resume
    ft = ["--data_dir", out, "--chkpt_dir", tmp_path / "ft", "--low_resource_mode", "--crop_size", "64",
          "--batch_size", "2", "--warmup_epochs", "0", "--num_workers", "0", "--n_vis", "0", "--no-progress",
          "--device", "cpu", "--run_name", "f", "--n_epochs", "1", "--max_images", "4", "--nsd_tolerance_mm", "2"]  # fmt: skip
    assert run_main(main_finetune, ft)["epochs_done"] == 1
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["args"]["labels"]["2"] = "kidneys"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"cannot resume .*the manifest\.json of --data_dir changed"):
        run_main(main_finetune, [*ft, "--resume"])


class _FullDiskDataset(torch.utils.data.Dataset):
    def __init__(self, path: str):
        self.path = path

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        raise OSError(errno.ENOSPC, "No space left on device", self.path)


def test_os_errors_end_in_one_line(tmp_path, capsys, monkeypatch):
    target = str(tmp_path / "runs" / "r_last.pt")

    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device", target)

    monkeypatch.setattr(utils, "setup_logging", lambda **kw: None)
    with pytest.raises(SystemExit) as exc:
        utils.run_cli(full_disk, main_simsiam.get_args_parser(), [])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and err == [f"error: {target}: No space left on device (ENOSPC)"]

    # raised inside a data-loader worker: the path and the reason survive the re-raise
    loader = torch.utils.data.DataLoader(_FullDiskDataset(target), batch_size=2, num_workers=1)
    with pytest.raises(Exception) as caught:
        next(iter(loader))
    found = utils.cli_error_in(caught.value)
    assert isinstance(found, TrainingError) and str(found) == f"{target}: No space left on device (ENOSPC)"
