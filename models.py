"""Encoders, SimSiam and DINO heads and losses, segmenters, and checkpoint loading.

One file for every network of the project (DINO's layout):

* :class:`SwinEncoder` -- the MONAI ``SwinTransformer`` exactly as Swin-UNETR builds it
  (embed 48, window 7, patch 2, depths (2, 2, 2, 2), heads (3, 6, 12, 24)); the deepest
  feature map, averaged over space, is the ``16 * embedding_size`` representation.
* :class:`ViTEncoder` -- MONAI's ``ViT`` exactly as UNETR builds it; the mean token.
* :class:`SimSiamProjector`, :class:`SimSiamPredictor`, :class:`SimSiamLoss`,
  :func:`collapse_coefficient` -- SimSiam (Chen & He, 2021).
* :class:`DINOHead`, :class:`DINOLoss` -- DINO (Caron et al., 2021).
* :func:`build_segmenter` -- ``SwinUNETR`` / ``UNETR`` for fine-tuning, whose encoder
  (``swinViT`` / ``vit``) has the very same parameter names as our encoders, so
  pretrained weights load strictly with :func:`load_pretrained_encoder`.

Example (2D, the paper's encoder)::

    >>> enc = build_encoder(encoder_config("swin", spatial_dims=2, embedding_size=48))
    >>> enc(torch.zeros(4, 1, 96, 96)).shape
    torch.Size([4, 768])
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import UNETR, SwinUNETR
from monai.networks.nets.swin_unetr import SwinTransformer
from monai.networks.nets.vit import ViT
from monai.utils import ensure_tuple_rep

from utils import UserError, torch_load

logger = logging.getLogger(__name__)

ENCODER_FORMAT = "ioupos-encoder-v1"
ARCHS = ("swin", "unetr")


# ---------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------


def encoder_config(
    arch: str = "swin",
    spatial_dims: int = 2,
    embedding_size: int = 48,
    low_resource_mode: bool = False,
    drop_path_rate: float = 0.0,
    use_gradient_checkpointing: bool = False,
    crop_size: int = 96,
) -> dict[str, Any]:
    """The configuration of an encoder, as a plain dict stored in every checkpoint.

    ``low_resource_mode`` shrinks the network for tests and CPU demos: Swin heads
    (3, 3, 3, 3) and ``embedding_size`` 12 unless a smaller one is given.
    ``crop_size`` only matters for UNETR, whose ViT has a fixed input size.

    Raises:
        ValueError: unknown arch, spatial_dims not 2 or 3, or embedding size not positive.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if low_resource_mode:
        embedding_size = min(embedding_size, 12)
    if embedding_size <= 0:
        raise ValueError(f"embedding_size must be positive, got {embedding_size}")
    cfg: dict[str, Any] = {
        "arch": arch,
        "spatial_dims": int(spatial_dims),
        "embedding_size": int(embedding_size),
        "drop_path_rate": float(drop_path_rate),
        "use_checkpoint": bool(use_gradient_checkpointing),
    }
    if arch == "swin":
        if embedding_size % 12:
            raise ValueError(f"embedding_size must be a multiple of 12 for Swin heads, got {embedding_size}")
        cfg.update(
            depths=[2, 2, 2, 2],
            num_heads=[3, 3, 3, 3] if low_resource_mode else [3, 6, 12, 24],
            window_size=7,
            patch_size=2,
        )
    else:
        hidden = 16 * embedding_size
        cfg.update(
            img_size=int(crop_size),
            hidden_size=hidden,
            mlp_dim=4 * hidden,
            num_heads=max(1, hidden // 64),
            patch_size=16,
            num_layers=12,
        )
    return cfg


def encoder_config_from_args(args: Any) -> dict[str, Any]:
    """:func:`encoder_config` for a script's flags (``--arch``, ``--spatial_dims``,
    ``--embedding_size``, ``--low_resource_mode``, ``--drop_path_rate``,
    ``--use_gradient_checkpointing``, ``--crop_size``): the one mapping from flags to the
    encoder that pretraining and fine-tuning share.

    Raises:
        UserError: the flags describe no valid encoder (the message names the value).
    """
    try:
        return encoder_config(
            args.arch,
            spatial_dims=args.spatial_dims,
            embedding_size=args.embedding_size,
            low_resource_mode=args.low_resource_mode,
            drop_path_rate=args.drop_path_rate,
            use_gradient_checkpointing=args.use_gradient_checkpointing,
            crop_size=args.crop_size,
        )
    except ValueError as e:
        raise UserError(f"bad encoder flags: {e}") from None


def encoder_out_dim(cfg: dict[str, Any]) -> int:
    """Size of the representation an encoder with this config returns."""
    return 16 * cfg["embedding_size"]


class SwinEncoder(nn.Module):
    """Swin-UNETR's encoder; the deepest feature map averaged over space.

    ``self.backbone`` is a MONAI ``SwinTransformer`` built with the arguments ``SwinUNETR``
    uses for its ``swinViT``, so ``backbone.state_dict()`` loads into ``SwinUNETR.swinViT``.
    """

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        d = cfg["spatial_dims"]
        self.cfg = dict(cfg)
        self.backbone = SwinTransformer(
            in_chans=1,
            embed_dim=cfg["embedding_size"],
            window_size=ensure_tuple_rep(cfg["window_size"], d),
            patch_size=ensure_tuple_rep(cfg["patch_size"], d),
            depths=cfg["depths"],
            num_heads=cfg["num_heads"],
            mlp_ratio=4.0,
            qkv_bias=True,
            drop_rate=0.0,
            attn_drop_rate=0.0,
            drop_path_rate=cfg["drop_path_rate"],
            norm_layer=nn.LayerNorm,
            use_checkpoint=cfg["use_checkpoint"],
            spatial_dims=d,
        )
        self.out_dim = encoder_out_dim(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deepest = self.backbone(x, normalize=True)[-1]
        return deepest.flatten(2).mean(dim=2)


class ViTEncoder(nn.Module):
    """UNETR's encoder (MONAI ``ViT``); the mean of the output tokens."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.cfg = dict(cfg)
        self.backbone = ViT(
            in_channels=1,
            img_size=cfg["img_size"],
            patch_size=cfg["patch_size"],
            hidden_size=cfg["hidden_size"],
            mlp_dim=cfg["mlp_dim"],
            num_layers=cfg["num_layers"],
            num_heads=cfg["num_heads"],
            proj_type="conv",
            classification=False,
            dropout_rate=0.0,
            spatial_dims=cfg["spatial_dims"],
            qkv_bias=False,
        )
        self.out_dim = encoder_out_dim(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.backbone(x)
        return tokens.mean(dim=1)


def build_encoder(cfg: dict[str, Any]) -> nn.Module:
    """The encoder for a config made by :func:`encoder_config`."""
    return SwinEncoder(cfg) if cfg["arch"] == "swin" else ViTEncoder(cfg)


# ---------------------------------------------------------------------------------------
# SimSiam
# ---------------------------------------------------------------------------------------


class SimSiamProjector(nn.Module):
    """SimSiam's projection MLP.

    "The projection MLP (in f) has BN applied to each fully-connected (fc) layer,
    including its output fc. Its output fc has no ReLU. The hidden fc is 2048-d.
    This MLP has 3 layers." (Chen & He, 2021). The output BN has no affine parameters.
    """

    def __init__(self, in_dim: int, dim: int = 2048):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, dim, bias=False),
            nn.BatchNorm1d(dim),
            nn.ReLU(inplace=True),
            nn.Linear(dim, dim, bias=False),
            nn.BatchNorm1d(dim),
            nn.ReLU(inplace=True),
            nn.Linear(dim, dim, bias=False),
            nn.BatchNorm1d(dim, affine=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SimSiamPredictor(nn.Module):
    """SimSiam's prediction MLP.

    "The prediction MLP (h) has BN applied to its hidden fc layers. Its output fc does
    not have BN or ReLU. This MLP has 2 layers. The dimension of h's input and output
    (z and p) is d = 2048, and h's hidden layer's dimension is 512." (Chen & He, 2021)
    """

    def __init__(self, dim: int = 2048, hidden_dim: int = 512):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SimSiam(nn.Module):
    """Encoder f = backbone + projector, and predictor h.

    ``forward(x1, x2)`` returns ``p1, p2, z1, z2`` with the targets ``z`` already
    detached (the stop-gradient of the paper is applied here, explicitly).
    """

    def __init__(self, encoder: nn.Module, dim: int = 2048, pred_dim: int = 512):
        super().__init__()
        self.encoder = encoder
        self.projector = SimSiamProjector(encoder.out_dim, dim)
        self.predictor = SimSiamPredictor(dim, pred_dim)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        # each view goes through on its own, so BatchNorm normalises each view's batch
        # separately, as in SimSiam
        z1 = self.projector(self.encoder(x1))
        z2 = self.projector(self.encoder(x2))
        p1 = self.predictor(z1)
        p2 = self.predictor(z2)
        return p1, p2, z1.detach(), z2.detach()


class SimSiamLoss(nn.Module):
    """Symmetric negative cosine similarity with stop-gradient.

    "L = 1/2 D(p1, stopgrad(z2)) + 1/2 D(p2, stopgrad(z1))", D(p, z) = -cos(p, z).
    The stop-gradient is applied again here, so the loss is right even for callers
    that pass non-detached targets.
    """

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        d1 = -F.cosine_similarity(p1, z2.detach(), dim=-1).mean()
        d2 = -F.cosine_similarity(p2, z1.detach(), dim=-1).mean()
        return 0.5 * (d1 + d2)


class _AllReduceSum(torch.autograd.Function):
    """Sum of a tensor over all ranks, differentiable: the gradient is summed over ranks too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class AllReduceBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` whose training statistics cover the batches of all ranks.

    ``nn.SyncBatchNorm`` runs on GPUs only; this one works with any backend (gloo on the
    CPU included) through a differentiable all-reduce of the per-channel sums, so a
    K-process run normalises exactly as one process with the K-times larger batch.
    Outside a multi-process training step it is a plain ``BatchNorm1d``; the parameter
    and buffer names are the same, so state dicts load either way.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not (self.training and distributed and x.dim() == 2):
            return super().forward(x)
        xf = x.float()
        count = torch.full((1,), float(xf.shape[0]), device=xf.device, dtype=xf.dtype)
        sums = _AllReduceSum.apply(torch.cat([xf.sum(0), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        centred = xf - mean  # two passes: as accurate as the single-process BatchNorm
        var = _AllReduceSum.apply(centred.square().sum(0)) / n
        y = centred * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked.item())
                unbiased = var.detach() * (n / (n - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Make every ``BatchNorm1d`` of ``module`` synchronise its statistics across ranks.

    CUDA: PyTorch's ``nn.SyncBatchNorm``. Other devices: :class:`AllReduceBatchNorm1d`.
    Returns the converted module (the same object when nothing had to be replaced).
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if type(module) is nn.BatchNorm1d:
        new = AllReduceBatchNorm1d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, device)
        if converted is not child:
            setattr(module, name, converted)
    return module


@torch.no_grad()
def collapse_coefficient(p: torch.Tensor) -> torch.Tensor:
    """max(0, 1 - sqrt(d) * s): 0 for healthy outputs, 1 for complete collapse.

    s is the mean over channels of the per-channel std of the L2-normalised outputs.
    SimSiam notes that for outputs spread on the unit hypersphere s ~ 1 / sqrt(d); a
    collapsed network gives s = 0. Returns a 0-dim tensor on ``p``'s device (no host sync;
    ``float()`` it to read it).
    """
    p = F.normalize(p.detach().float(), dim=1)
    s = p.std(dim=0).mean()
    d = p.shape[1]
    return (1.0 - math.sqrt(d) * s).clamp(min=0.0)


# ---------------------------------------------------------------------------------------
# DINO
# ---------------------------------------------------------------------------------------


class DINOHead(nn.Module):
    """DINO's projection head: a 3-layer MLP, L2 normalisation, a weight-normalised layer.

    "The projection head consists of a 3-layer multi-layer perceptron (MLP) with hidden
    dimension 2048 followed by l2 normalization and a weight normalized fully connected
    layer with K dimensions" (Caron et al., 2021). The norm of the last layer's weight
    (the ``original0`` of the weight-norm parametrisation) is fixed to 1 and not trained
    when ``norm_last_layer`` is set, as in DINO's defaults.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 1024,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        if norm_last_layer:
            g.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


class DINOModel(nn.Module):
    """Encoder followed by a DINO head; used for the student and the teacher."""

    def __init__(self, encoder: nn.Module, head: DINOHead):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student, across views.

    "H(Pt(x), Ps(x')) ... Pt = softmax((gt(x) - c) / tau_t), Ps = softmax(gs(x') / tau_s)",
    summed over pairs of different views and averaged. The centre c is an EMA (momentum
    ``center_momentum``) of the teacher outputs, averaged over all ranks. The teacher
    temperature warms up linearly from ``warmup_teacher_temp`` to ``teacher_temp`` over
    ``warmup_teacher_temp_epochs`` epochs.
    """

    def __init__(
        self,
        out_dim: int,
        n_epochs: int,
        n_views: int = 2,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        center_momentum: float = 0.9,
    ):
        super().__init__()
        self.n_views = n_views
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        warm = (
            torch.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
            if warmup_teacher_temp_epochs > 0
            else torch.empty(0)
        )
        rest = torch.full((max(0, n_epochs - warmup_teacher_temp_epochs),), teacher_temp)
        self.teacher_temps = torch.cat([warm, rest]).tolist()

    def teacher_temp(self, epoch: int) -> float:
        return self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)]

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, epoch: int) -> torch.Tensor:
        """``student_out`` and ``teacher_out``: (n_views * B, K), views stacked in order."""
        s = (student_out.float() / self.student_temp).chunk(self.n_views)
        t_temp = self.teacher_temp(epoch)
        teacher = teacher_out.detach().float()
        t = F.softmax((teacher - self.center) / t_temp, dim=-1).chunk(self.n_views)
        total, n_terms = 0.0, 0
        for it, q in enumerate(t):
            for iv, logits in enumerate(s):
                if iv == it:
                    continue
                total = total + torch.sum(-q * F.log_softmax(logits, dim=-1), dim=-1).mean()
                n_terms += 1
        self.update_center(teacher)
        return total / n_terms

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = teacher_out.sum(dim=0, keepdim=True)
        n = torch.tensor([float(teacher_out.shape[0])], device=teacher_out.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            dist.all_reduce(n)
        batch_center = batch_center / n
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))


# ---------------------------------------------------------------------------------------
# Segmenters
# ---------------------------------------------------------------------------------------


def segmenter_spec(cfg: dict[str, Any], n_classes: int) -> tuple[str, dict[str, Any]]:
    """The MONAI class (``"SwinUNETR"`` or ``"UNETR"``) and the keyword arguments that build the
    segmenter of ``cfg``, as plain JSON values: what :func:`build_segmenter` calls and what an
    exported model card records (``export_model.py``), so that
    ``getattr(monai.networks.nets, name)(**kwargs)`` rebuilds the very network.

    The arguments MONAI would default are written out too, so a later MONAI with other
    defaults still builds the same network. ``use_checkpoint`` (gradient checkpointing,
    a training memory option) is ``cfg``'s; it changes no output.
    """
    d = int(cfg["spatial_dims"])
    if cfg["arch"] == "swin":
        return "SwinUNETR", {
            "in_channels": 1,
            "out_channels": int(n_classes),
            "patch_size": int(cfg["patch_size"]),
            "depths": [int(v) for v in cfg["depths"]],
            "num_heads": [int(v) for v in cfg["num_heads"]],
            "window_size": int(cfg["window_size"]),
            "qkv_bias": True,
            "mlp_ratio": 4.0,
            "feature_size": int(cfg["embedding_size"]),
            "norm_name": "instance",
            "drop_rate": 0.0,
            "attn_drop_rate": 0.0,
            "dropout_path_rate": float(cfg["drop_path_rate"]),
            "normalize": True,
            "patch_norm": False,
            "use_checkpoint": bool(cfg["use_checkpoint"]),
            "spatial_dims": d,
            "downsample": "merging",
            "use_v2": False,
        }
    return "UNETR", {
        "in_channels": 1,
        "out_channels": int(n_classes),
        "img_size": int(cfg["img_size"]),
        "feature_size": 16,
        "hidden_size": int(cfg["hidden_size"]),
        "mlp_dim": int(cfg["mlp_dim"]),
        "num_heads": int(cfg["num_heads"]),
        "proj_type": "conv",
        "norm_name": "instance",
        "conv_block": True,
        "res_block": True,
        "dropout_rate": 0.0,
        "spatial_dims": d,
        "qkv_bias": False,
        "save_attn": False,
    }


def build_segmenter(cfg: dict[str, Any], n_classes: int) -> nn.Module:
    """``SwinUNETR`` or ``UNETR`` with 1 input channel and ``n_classes`` outputs
    (:func:`segmenter_spec`'s arguments).

    The encoder inside (``segmenter_encoder``) has the same parameter names and shapes
    as ``build_encoder(cfg).backbone``.
    """
    name, kwargs = segmenter_spec(cfg, n_classes)
    return (SwinUNETR if name == "SwinUNETR" else UNETR)(**kwargs)


def segmenter_encoder(model: nn.Module) -> nn.Module:
    """The encoder part of a segmenter: ``swinViT`` of SwinUNETR, ``vit`` of UNETR."""
    for name in ("swinViT", "vit"):
        if hasattr(model, name):
            return getattr(model, name)
    raise ValueError(f"{type(model).__name__} has neither swinViT nor vit")


# ---------------------------------------------------------------------------------------
# Checkpoint loading
# ---------------------------------------------------------------------------------------


def encoder_checkpoint(
    encoder: nn.Module, cfg: dict[str, Any], method: str, epoch: int, args: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """The self-describing pretrained-weights file: ``<chkpt_dir>/<run_name>.pt``.

    ``encoder`` is a :class:`SwinEncoder` / :class:`ViTEncoder`; the stored state dict
    is its backbone's, i.e. the layout of ``SwinUNETR.swinViT`` / ``UNETR.vit``.
    ``extra`` may carry e.g. ``student_encoder`` for DINO.
    """
    return {
        "format": ENCODER_FORMAT,
        "method": method,
        "model_config": dict(cfg),
        "epoch": int(epoch),
        "args": dict(args),
        "encoder": {k: v.detach().cpu() for k, v in encoder.backbone.state_dict().items()},
        **extra,
    }


_PREFIXES = ("module.", "backbone.", "swinViT.", "vit.", "encoder.")
#: The original code's SimSiam checkpoint (``model.state_dict()`` of its ``src/models.py`` SimSiam):
#: ``backbone.model.<SwinTransformer keys>`` and the two heads of lightly.
ORIGINAL_SIMSIAM_ENCODER = "backbone.model."
ORIGINAL_SIMSIAM_HEADS = ("projection_head.", "prediction_head.")
#: MONAI's self-supervised Swin-UNETR weights (the layout ``SwinUNETR.load_from`` reads, and
#: ``export_model.py --format monai_ssl`` writes): ``module.<SwinTransformer key>`` with the
#: blocks' MLP layers named ``fc1`` / ``fc2`` (``linear1`` / ``linear2`` in MONAI's
#: SwinTransformer); the heads of MONAI's SSLHead (research-contributions, SwinUNETR/Pretrain),
#: when a file holds them, are not encoder weights.
MONAI_SSL_MLP_NAMES = {".mlp.fc1.": ".mlp.linear1.", ".mlp.fc2.": ".mlp.linear2."}
MONAI_SSL_HEADS = ("rotation_head.", "contrastive_head.", "conv.")


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k = k[len(p) :]
                    changed = True
        out[k] = v
    return out


def extract_encoder_state(
    ckpt: Any, path: str, checkpoint_key: str = "teacher"
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Find the encoder's state dict in any checkpoint layout we accept.

    Accepted: our pretrained files (SimSiam; DINO with ``checkpoint_key`` "teacher" or
    "student"), our fine-tuned files (the segmenter's encoder), a bare encoder state dict
    (also the original code's DINO checkpoints: its student's ``SwinTransformer`` state
    dict), the original code's SimSiam checkpoints (``model.state_dict()`` of its SimSiam
    module: the encoder under ``backbone.model.``, the heads under ``projection_head.`` and
    ``prediction_head.``, which are left out), and MONAI's Swin-UNETR layouts (``swinViT.*``
    keys, optionally under ``state_dict`` and with ``module.`` prefixes), among them MONAI's
    self-supervised weights (``mlp.fc1`` / ``fc2`` names, SSLHead's heads left out). Returns
    (state dict with bare keys, model config or None); what was found is logged.
    """
    if not isinstance(ckpt, dict):
        raise UserError(f"{path!r} holds a {type(ckpt).__name__}, not a checkpoint dictionary")
    cfg = None
    if ckpt.get("format") == ENCODER_FORMAT:
        cfg = ckpt.get("model_config")
        if checkpoint_key == "student" and "student_encoder" in ckpt:
            state = ckpt["student_encoder"]
        elif checkpoint_key in ("teacher", "encoder"):
            state = ckpt["encoder"]
        else:
            raise UserError(
                f"--checkpoint_key {checkpoint_key!r} not available in {path!r} (a {ckpt.get('method')} checkpoint)"
            )
        return _strip_prefixes(state), cfg
    if str(ckpt.get("format", "")).startswith("ioupos-finetune"):
        cfg = ckpt.get("model_config")
        full = ckpt["model"]
        enc_prefix = "swinViT." if cfg and cfg.get("arch") == "swin" else "vit."
        return {k[len(enc_prefix) :]: v for k, v in full.items() if k.startswith(enc_prefix)}, cfg
    for key in ("state_dict", "model", "net"):
        if key in ckpt and isinstance(ckpt[key], dict):
            ckpt = ckpt[key]
            break
    tensors = {k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path!r} holds no tensors that could be encoder weights")
    enc_keys = [k for k in tensors if k.startswith(ORIGINAL_SIMSIAM_ENCODER)]
    if enc_keys and all(k.startswith((ORIGINAL_SIMSIAM_ENCODER, *ORIGINAL_SIMSIAM_HEADS)) for k in tensors):
        logger.info(
            "%s: the original code's SimSiam checkpoint: %d encoder tensors (%s*); its %d projection / prediction "
            "head tensors are not used",
            path,
            len(enc_keys),
            ORIGINAL_SIMSIAM_ENCODER,
            len(tensors) - len(enc_keys),
        )
        return {k[len(ORIGINAL_SIMSIAM_ENCODER) :]: tensors[k] for k in enc_keys}, None
    if any(name in k for k in tensors for name in MONAI_SSL_MLP_NAMES):
        return _monai_ssl_encoder(tensors, path), None
    # a full MONAI SwinUNETR / UNETR state dict: keep the encoder part only
    enc = {k: v for k, v in tensors.items() if k.replace("module.", "", 1).startswith(("swinViT.", "vit."))}
    if not enc:
        logger.info(
            "%s: a bare encoder state dict of %d tensors (e.g. the original code's DINO checkpoint: its student's "
            "SwinTransformer)",
            path,
            len(tensors),
        )
    return _strip_prefixes(enc if enc else tensors), cfg


def _monai_ssl_encoder(tensors: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """The encoder of a file in MONAI's self-supervised layout, with MONAI's SwinTransformer
    names (``mlp.fc1`` -> ``mlp.linear1``, ``mlp.fc2`` -> ``mlp.linear2``); SSLHead's heads left out."""
    heads = [k for k in tensors if k.replace("module.", "", 1).startswith(MONAI_SSL_HEADS)]
    logger.info(
        "%s: MONAI's self-supervised Swin layout (mlp fc1 / fc2): %d encoder tensors; %d head tensors not used",
        path,
        len(tensors) - len(heads),
        len(heads),
    )
    out = {}
    for k, v in _strip_prefixes({k: v for k, v in tensors.items() if k not in heads}).items():
        for theirs, ours in MONAI_SSL_MLP_NAMES.items():
            k = k.replace(theirs, ours)
        out[k] = v
    return out


def load_pretrained_encoder(
    segmenter: nn.Module, path: str, cfg: dict[str, Any], checkpoint_key: str = "teacher"
) -> int:
    """Load pretrained encoder weights strictly into ``segmenter``'s encoder.

    Returns the number of tensors loaded. Every tensor of the encoder must be present
    with its shape; otherwise nothing is loaded and a UserError lists what differs.

    Raises:
        UserError: unreadable file, another architecture / embedding size (named), or
            missing, unexpected or mis-shaped keys (listed).
    """
    ckpt = torch_load(path)
    state, saved_cfg = extract_encoder_state(ckpt, path, checkpoint_key)
    if saved_cfg is not None:
        for key in ("arch", "spatial_dims", "embedding_size", "num_heads", "depths", "hidden_size", "img_size"):
            if key in saved_cfg or key in cfg:
                a, b = saved_cfg.get(key), cfg.get(key)
                if _norm(a) != _norm(b):
                    raise UserError(
                        f"checkpoint {path!r} was trained with {key}={_norm(a)}, but this model has {key}={_norm(b)}; "
                        f"set the matching flag (e.g. --embedding_size / --arch / --spatial_dims / --low_resource_mode)"
                    )
    target = segmenter_encoder(segmenter)
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shaped = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shaped:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)):
            if keys:
                shown = ", ".join(
                    f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" if name == "mis-shaped" else k
                    for k in keys[:8]
                )
                parts.append(f"{len(keys)} {name} ({shown}{', ...' if len(keys) > 8 else ''})")
        raise UserError(f"encoder weights in {path!r} do not match the model: " + "; ".join(parts))
    target.load_state_dict(state, strict=True)
    return len(state)


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v
