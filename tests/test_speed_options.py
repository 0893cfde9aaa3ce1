"""The speed options of pretraining (issue 7): ``--batch_augment`` (view augmentations on the
training device, seeded per epoch so resume stays exact) and ``--cache_images`` (decoded
slices kept in memory, same numbers). Tiny phantom data, a few optimizer steps per run."""

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Compose, DeleteItemsd, EnsureTyped, SpatialPadd
from torch._dynamo.utils import counters

import data
import engine
import main_dino
import main_simsiam
import pretrain
import utils
from conftest import write_unlabelled_phantoms
from data import SliceCache, encode_png_2d, read_image_2d
from iou_crops import IoUCropd
from pretrain import augment_views, make_batch_augment
from transforms import LoadSlice2Dd, LoadVolume3Dd, pretrain_transforms, view_augmentations
from utils import MEMORY_RESERVE_MIN, TrainingError, UserError, available_memory, check_fits_in_memory, format_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Stop(Exception):
    """Raised to interrupt a run right after its first checkpoint."""


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """Phantom cases of 48 x 48 x 8: the first as 8 PNG slices, both as NIfTI volumes (3D)."""
    return write_unlabelled_phantoms(tmp_path_factory.mktemp("speed_phantoms"), png_cases=(0,))


def _argv(data_dir, chkpt_dir, *extra):
    return [
        "--data_dir",
        str(data_dir),
        "--chkpt_dir",
        str(chkpt_dir),
        "--low_resource_mode",
        "--crop_size",
        "32",
        "--no-progress",
        "--device",
        "cpu",
        "--min_iou",
        "0.3",
        "--max_iou",
        "0.6",
        *map(str, extra),
    ]


def _run(data_dir, chkpt_dir, *extra):
    return main_simsiam.main(main_simsiam.get_args_parser().parse_args(_argv(data_dir, chkpt_dir, *extra)))


def _log(path):
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["method_state"]["model"]


def _same_weights(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _interrupt_after_first_epoch(monkeypatch):
    original = engine.save_training_state

    def save_then_stop(path, state, info):
        original(path, state, info)
        if state["epoch"] == 1:
            raise _Stop()

    monkeypatch.setattr(engine, "save_training_state", save_then_stop)


def test_batch_augment_2d_trains_and_resumes_exactly(phantoms, tmp_path, monkeypatch):
    common = ("--batch_size", 4, "--n_epochs", 2, "--batch_augment", "--run_name", "ba")
    full = _run(phantoms["2d"], tmp_path / "full", *common)
    log_full = _log(full["log"])
    assert [r["epoch"] for r in log_full] == [1, 2] and all(np.isfinite(r["loss"]) for r in log_full)
    assert all(r["audit_pairs"] == 8 for r in log_full)
    assert torch.load(full["last"], weights_only=True)["args"]["batch_augment"] is True

    # killed after the first epoch's checkpoint, then resumed: the same weights and losses
    with monkeypatch.context() as m:
        _interrupt_after_first_epoch(m)
        with pytest.raises(_Stop):
            _run(phantoms["2d"], tmp_path / "split", *common)
    resumed = _run(phantoms["2d"], tmp_path / "split", *common, "--resume")
    assert [r["loss"] for r in _log(resumed["log"])] == [r["loss"] for r in log_full]
    assert _same_weights(_state(resumed["last"]), _state(full["last"]))

    # the flag changes the random stream: resuming without it is refused, naming it
    with pytest.raises(UserError, match=r"batch_augment: True -> False"):
        _run(phantoms["2d"], tmp_path / "split", "--batch_size", 4, "--n_epochs", 2, "--run_name", "ba", "--resume")


def test_batch_augment_applies_the_views_on_the_device(phantoms, tmp_path):
    """Same crops as --no_augment (the workers stop after IoUCropd), different losses
    (the views are augmented in the step)."""
    plain = _run(phantoms["2d"], tmp_path / "a", "--batch_size", 4, "--n_epochs", 1, "--no_augment")["final"]
    batched = _run(phantoms["2d"], tmp_path / "b", "--batch_size", 4, "--n_epochs", 1, "--batch_augment")["final"]
    assert batched["audit_iou_hist"] == plain["audit_iou_hist"]
    assert batched["audit_iou_mean"] == plain["audit_iou_mean"]
    assert batched["loss"] != plain["loss"]


def test_augment_views_draws_each_view_independently():
    args = main_simsiam.get_args_parser().parse_args(["--data_dir", "x", "--batch_augment", "--spatial_dims", "2"])
    info = engine.DistInfo()
    x = torch.rand(16, 1, 32, 32)
    batch = {"image1": x, "image2": x.clone(), "iou_value": torch.ones(16)}
    out = augment_views(batch, make_batch_augment(args, 0, info), info.device)
    assert out["image1"].shape == x.shape and out["image1"].dtype == torch.float32
    assert not torch.equal(out["image1"], out["image2"])  # two draws, not one
    assert torch.equal(batch["image1"], x)  # the input batch is left alone
    again = augment_views(batch, make_batch_augment(args, 0, info), info.device)
    assert torch.equal(again["image1"], out["image1"]) and torch.equal(again["image2"], out["image2"])
    other_epoch = augment_views(batch, make_batch_augment(args, 1, info), info.device)
    assert not torch.equal(other_epoch["image1"], out["image1"])
    args.batch_augment = False
    assert make_batch_augment(args, 0, info) is None
    assert torch.equal(augment_views(batch, None, info.device)["image1"], x)


def test_batch_augment_3d_trains(phantoms, tmp_path):
    res = _run(
        phantoms["3d"], tmp_path / "r", "--spatial_dims", 3, "--batch_size", 2, "--n_epochs", 1, "--batch_augment"
    )
    rec = res["final"]
    assert np.isfinite(rec["loss"]) and rec["audit_pairs"] == 2


def test_cache_images_gives_identical_runs(phantoms, tmp_path):
    a = _run(phantoms["2d"], tmp_path / "a", "--batch_size", 4, "--n_epochs", 2)
    b = _run(phantoms["2d"], tmp_path / "b", "--batch_size", 4, "--n_epochs", 2, "--cache_images")
    la, lb = _log(a["log"]), _log(b["log"])
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert [r["audit_iou_hist"] for r in la] == [r["audit_iou_hist"] for r in lb]
    assert _same_weights(_state(a["last"]), _state(b["last"]))


def test_slice_cache_reads_what_the_png_holds(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (shape, bits) in enumerate([((40, 33), 8), ((50, 64), 16), ((7, 9), 8)]):
        p = tmp_path / f"s{i}.png"
        p.write_bytes(encode_png_2d(rng.random(shape).astype(np.float32), bits=bits))
        paths.append(str(p))
    cache = SliceCache(paths, progress=False)
    assert len(cache) == 3 and paths[1] in cache and "other.png" not in cache
    assert cache.nbytes == 40 * 33 + 2 * 50 * 64 + 7 * 9
    assert SliceCache.planned_nbytes(paths) == cache.nbytes  # from the headers alone
    for p in paths:
        got, want = cache.read(p), read_image_2d(p)
        assert got.dtype == np.float32 and got.shape == want.shape and np.array_equal(got, want)
    with pytest.raises(KeyError, match="other.png"):
        cache.read("other.png")
    with pytest.raises(ValueError, match="2D"):
        pretrain_transforms(3, 32, 0.0, 1.0, cache=cache)

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(UserError, match="bad.png"):
        SliceCache([paths[0], str(bad)], progress=False)
    with pytest.raises(UserError, match="bad.png"):
        SliceCache.planned_nbytes([paths[0], str(bad)])


def test_check_fits_in_memory():
    gb = 10**9
    check_fits_in_memory(7 * gb, "x", "hint", available=10 * gb)  # reserve max(2 GiB, 15 %) = 2.15 GB: room 7.85 GB
    with pytest.raises(
        UserError, match=r"--cache_images: 9 slices need 8\.00 GB .* 10\.00 GB is available .*7\.85 GB.*; run without"
    ):
        check_fits_in_memory(8 * gb, "--cache_images: 9 slices", "run without --cache_images", available=10 * gb)
    check_fits_in_memory(84 * gb, "x", "h", available=100 * gb)  # the 15 % share is the reserve above 2 GiB
    with pytest.raises(UserError, match="86.00 GB"):
        check_fits_in_memory(86 * gb, "x", "h", available=100 * gb)
    with pytest.raises(UserError, match="at most 0 B of it"):
        check_fits_in_memory(1, "x", "h", available=MEMORY_RESERVE_MIN)
    free = available_memory()
    assert free is None or free > 0
    assert [format_bytes(n) for n in (512, 18432, 3.4e6, 1.25e9)] == ["512 B", "18.4 kB", "3.4 MB", "1.25 GB"]


def test_cache_images_refused_when_it_cannot_fit(phantoms, tmp_path, monkeypatch):
    """A cache larger than the free memory is refused before decoding, with both sizes, exit
    code 2 and no run files; the header estimate counts one copy per local process."""
    need = 8 * 48 * 48
    decoded = []
    original = data.SliceCache.__init__

    def counted(self, *a, **k):
        decoded.append(1)
        original(self, *a, **k)

    monkeypatch.setattr(data.SliceCache, "__init__", counted)
    monkeypatch.setattr(utils, "available_memory", lambda: utils.MEMORY_RESERVE_MIN + need // 2)
    with pytest.raises(
        UserError,
        match=r"--cache_images: 8 slices need 18\.4 kB of memory, but 2\.15 GB is available and at most 9\.2 kB",
    ):
        _run(phantoms["2d"], tmp_path / "r", "--batch_size", 4, "--n_epochs", 1, "--cache_images")
    assert not decoded and not any((tmp_path / "r").iterdir())  # the run folder: created at start-up, left empty
    # the same check through SliceCache.build, with the room just enough for one copy, not two
    monkeypatch.setattr(utils, "available_memory", lambda: utils.MEMORY_RESERVE_MIN + need)
    paths = sorted(str(p) for p in phantoms["2d"].glob("*.png"))
    assert data.SliceCache.build(paths, "8 slices", "--cache_images", copies=1, progress=False).nbytes == need
    assert decoded == [1]
    with pytest.raises(UserError, match="in each of 2 processes"):
        data.SliceCache.build(paths, "8 slices", "--cache_images", copies=2, progress=False)


def test_speed_flags_refuse_bad_combinations(phantoms, tmp_path):
    with pytest.raises(UserError, match="--cache_images"):
        _run(phantoms["3d"], tmp_path / "r", "--spatial_dims", 3, "--cache_images")
    with pytest.raises(UserError, match="--batch_augment and --no_augment"):
        _run(phantoms["2d"], tmp_path / "r", "--batch_augment", "--no_augment")
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_fast_padding_gives_what_monai_spatialpadd_gave(phantoms, tmp_path):
    """pretrain_transforms pads with PadToAtLeastd (plain numpy, crops by slicing); the pairs
    must equal, bit for bit, those of the chain with MONAI's SpatialPadd and MetaTensor crops."""

    def reference(dims, crop, lo, hi, augment):
        k = ["image"]
        chain = [
            LoadSlice2Dd(k) if dims == 2 else LoadVolume3Dd(k),
            SpatialPadd(k, spatial_size=[crop] * dims, mode="constant"),
            IoUCropd(k, dims, crop_size=crop, min_iou=lo, max_iou=hi, store_boxes=True),
            DeleteItemsd(["iou_start1", "iou_start2"]),
        ]
        if augment:
            chain += [view_augmentations("image1", dims), view_augmentations("image2", dims)]
        chain.append(EnsureTyped(["image1", "image2"], data_type="tensor", dtype=torch.float32, track_meta=False))
        return Compose(chain)

    small = tmp_path / "small.png"  # narrower than the crop on one axis: padded
    small.write_bytes(
        encode_png_2d(np.random.default_rng(3).random((21, 50)).astype(np.float32))
    )  # odd padding: 5 before, 6 after
    pngs = [str(p) for p in sorted(phantoms["2d"].glob("*.png"))[:3]] + [str(small)]
    nii = [str(sorted(phantoms["3d"].glob("*.nii.gz"))[0])]
    for dims, paths in ((2, pngs), (3, nii)):
        for augment in (False, True):
            ref, new = reference(dims, 32, 0.3, 0.6, augment), pretrain_transforms(dims, 32, 0.3, 0.6, augment=augment)
            for seed in range(4):
                ref.set_random_state(seed)
                new.set_random_state(seed)
                for p in paths:
                    a, b = ref({"image": p}), new({"image": p})
                    assert set(a) == set(b) and a["iou_value"] == b["iou_value"]
                    for k in ("image1", "image2"):
                        assert type(b[k]) is torch.Tensor and torch.equal(a[k], b[k]), (dims, augment, seed, p, k)


# ---------------------------------------------------------------------------------------
# Loss reads every --check_every batches, fused optimizers, torch.compile
# ---------------------------------------------------------------------------------------


def test_loss_check_reads_every_n_batches_and_names_the_first_bad_iteration():
    c = engine.LossCheck(3, engine.DistInfo(), epoch=4)
    assert not c.add(10, torch.tensor(1.0), {"collapse": torch.tensor(0.5), "host": 2.0})
    assert not c.add(11, torch.tensor(3.0, requires_grad=True) * 1, {"collapse": torch.tensor(0.1), "host": 4.0})
    assert c.avg.means() == {} and np.isnan(c.last_loss)  # nothing read yet
    assert c.add(12, torch.tensor(2.0), {"collapse": torch.tensor(0.3), "host": 6.0})
    got = c.avg.means()
    assert (
        got["loss"] == pytest.approx(2.0)
        and got["collapse"] == pytest.approx(0.3)
        and got["host"] == pytest.approx(4.0)
    )
    assert c.last_loss == 2.0 and c.pending == []
    c.add(13, torch.tensor(5.0), {"collapse": torch.tensor(0.0), "host": 0.0})
    c.add(14, torch.tensor(float("nan")), {"collapse": torch.tensor(0.0), "host": 0.0})
    with pytest.raises(TrainingError, match=r"loss is nan at epoch 5, iteration 14.*--check_every"):
        c.add(15, torch.tensor(float("inf")), {"collapse": torch.tensor(0.0), "host": 0.0})
    one = engine.LossCheck(1, engine.DistInfo(), epoch=0)
    with pytest.raises(TrainingError, match=r"loss is inf at epoch 1, iteration 7; stopping \(the last good"):
        one.add(7, torch.tensor(float("inf")), {})
    with pytest.raises(UserError, match="--check_every"):
        engine.LossCheck(0, engine.DistInfo(), epoch=0)


def test_check_every_changes_nothing_but_when_losses_are_read(phantoms, tmp_path):
    common = ("--batch_size", 2, "--n_epochs", 2)  # 4 steps per epoch
    a = _run(phantoms["2d"], tmp_path / "a", *common, "--check_every", 1)
    b = _run(phantoms["2d"], tmp_path / "b", *common, "--check_every", 3)
    la, lb = _log(a["log"]), _log(b["log"])
    assert [(r["loss"], r["collapse"]) for r in la] == [(r["loss"], r["collapse"]) for r in lb]
    assert _same_weights(_state(a["last"]), _state(b["last"]))
    with pytest.raises(UserError, match="--check_every must be at least 1, got 0"):
        _run(phantoms["2d"], tmp_path / "c", *common, "--check_every", 0)


@pytest.mark.parametrize("method", ["simsiam", "dino"])
def test_fused_optimizer_gives_the_same_run_up_to_rounding(method, phantoms, tmp_path):
    mod = main_simsiam if method == "simsiam" else main_dino
    argv = _argv(phantoms["2d"], tmp_path / "plain", "--batch_size", 4, "--n_epochs", 2, "--warmup_epochs", 1)

    def run(where, *extra):
        args = mod.get_args_parser().parse_args([*argv, "--chkpt_dir", str(where), *map(str, extra)])
        return mod.main(args)

    a, b = run(tmp_path / "plain"), run(tmp_path / "fused", "--fused_optimizer")
    la, lb = _log(a["log"]), _log(b["log"])
    np.testing.assert_allclose([r["loss"] for r in la], [r["loss"] for r in lb], rtol=1e-5, atol=1e-6)
    sa = torch.load(a["last"], map_location="cpu", weights_only=True)["method_state"]
    sb = torch.load(b["last"], map_location="cpu", weights_only=True)["method_state"]
    key = "model" if method == "simsiam" else "student"
    assert set(sa[key]) == set(sb[key])
    for k in sa[key]:
        torch.testing.assert_close(sa[key][k], sb[key][k], rtol=1e-4, atol=1e-5, msg=k)
    # (plain SGD / AdamW do move the weights: test_pretrain; a fused step that did nothing would differ here)


def test_dino_teacher_ema_with_foreach_equals_the_loop_bit_for_bit():
    args = main_dino.get_args_parser().parse_args(
        ["--data_dir", ".", "--low_resource_mode", "--crop_size", "32", "--n_epochs", "1", "--warmup_epochs", "0"]
    )
    main_dino.DINOMethod.adjust_args(args)
    pretrain.apply_low_resource_mode(args)
    m = main_dino.DINOMethod(args, pretrain.model_config(args), engine.DistInfo(), 3)
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(torch.randn_like(p))
    ref = [pt.detach().clone() for pt in m.teacher.parameters()]
    mom = float(m.momentum_schedule[1])
    for pt, ps in zip(ref, m.student.parameters()):
        pt.mul_(mom).add_(ps.detach(), alpha=1.0 - mom)
    m.after_optimizer_step(1)
    assert all(torch.equal(a, b) for a, b in zip(m.teacher.parameters(), ref))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simsiam", "dino"])
def test_compile_traces_the_model_and_keeps_losses_and_checkpoints(method, phantoms, tmp_path):
    """--compile with the eager backend (tracing only: inductor's code generation takes
    minutes on this CPU): same losses, same checkpoint keys, and dynamo did capture graphs."""
    mod = main_simsiam if method == "simsiam" else main_dino
    argv = _argv(
        phantoms["2d"],
        tmp_path,
        "--batch_size",
        4,
        "--n_epochs",
        1,
        "--warmup_epochs",
        0,
        "--max_images",
        8,
        "--drop_path_rate",
        0,
    )

    def run(name, *extra):
        return mod.main(mod.get_args_parser().parse_args([*argv, "--run_name", name, *map(str, extra)]))

    torch._dynamo.reset()
    counters.clear()
    a = run("plain")
    b = run("compiled", "--compile", "--compile_backend", "eager")
    assert counters["stats"]["unique_graphs"] >= (1 if method == "simsiam" else 2)  # student (+ teacher)
    la, lb = _log(a["log"]), _log(b["log"])
    np.testing.assert_allclose([r["loss"] for r in la], [r["loss"] for r in lb], rtol=1e-5)
    wa = torch.load(a["weights"], map_location="cpu", weights_only=True)
    wb = torch.load(b["weights"], map_location="cpu", weights_only=True)
    sa, sb = wa["encoder"], wb["encoder"]
    assert set(sa) == set(sb) and not any("_orig_mod" in k for k in sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6, msg=k)
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simsiam", "dino"])
def test_training_steps_read_nothing_on_the_host_between_loss_checks(method, monkeypatch):
    """A host read of a tensor (item, tolist, bool, float, ...) waits for the GPU. Between two
    loss checks the project's code (loop, losses, heads, EMA) must make none: with 6 steps and
    --check_every 4, only LossCheck.flush reads, twice (loss and, for SimSiam, the collapse)."""
    mod = main_simsiam if method == "simsiam" else main_dino
    cls = main_simsiam.SimSiamMethod if method == "simsiam" else main_dino.DINOMethod
    args = mod.get_args_parser().parse_args(
        [
            "--data_dir",
            ".",
            "--low_resource_mode",
            "--crop_size",
            "32",
            "--n_epochs",
            "1",
            "--warmup_epochs",
            "0",
            "--batch_size",
            "4",
        ]
    )
    cls.adjust_args(args)
    pretrain.apply_low_resource_mode(args)
    info = engine.DistInfo()
    m = cls(args, pretrain.model_config(args), info, 6)
    batch = {"image1": torch.rand(4, 1, 32, 32), "image2": torch.rand(4, 1, 32, 32)}
    project = Path(engine.__file__).resolve().parent
    reads = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            caller = Path(inspect.stack(context=0)[1].filename).resolve()
            if caller.parent == project:  # the project's modules, not torch's or MONAI's
                reads.append((name, caller.name))
            return original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"):
        counting(name)
    engine.train_one_epoch(
        m.train_module,
        [batch] * 6,
        m.optimizer,
        lambda b: m.loss_fn(b, 0),
        epoch=0,
        n_epochs=1,
        iters_per_epoch=6,
        lr_schedule=m.lr_schedule,
        base_lr=m.base_lr,
        wd_schedule=m.wd_schedule,
        amp=engine.Amp(info.device, False),
        clip_grad=m.clip_grad,
        clip_mode=m.clip_mode,
        before_optimizer_step=m.before_optimizer_step,
        after_optimizer_step=m.after_optimizer_step,
        progress=False,
        check_every=4,
    )
    monkeypatch.undo()
    per_flush = 2 if method == "simsiam" else 1
    assert reads == [("tolist", "engine.py")] * (2 * per_flush), reads
