"""Training the networks of :mod:`nds.catalog.model.nets`: pure functions, arrays in, module out.

No file I/O, no database, no global state: every function takes images as a uint8
array ``(N, H, W, C)`` already resized to ``net_config.input_size`` and a
:class:`TrainConfig`, and returns a :class:`TrainResult` holding the trained module (on
the CPU, in eval mode) and its metrics.

- :func:`train_rotation`: the self-supervised task of experts and the backbone; every
  image is shown at 0/90/180/270 degrees and the net predicts which (4-way).
- :func:`train_classifier`: a label classifier (stratified held-out split).
- :func:`embed`: L2-normalised penultimate features.

Uses CUDA with mixed precision when available (``device="auto"``), and bfloat16 autocast
on CPUs that compute it natively (:func:`cpu_has_native_bf16`); CUDA is never touched
at import time. On the CPU, results are deterministic given ``TrainConfig.seed``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nds.catalog.model.nets import NarrowResNet, NetConfig, build_net
from nds_client.errors import InvalidInputError
from nds_client.preprocessing import IMAGENET_MEAN, IMAGENET_STD

Normalization = tuple[Sequence[float], Sequence[float]]  # (mean, std) per channel, in 0..1 pixel units
#: ImageNet's mean and std, from :mod:`nds_client.preprocessing` (the one normalisation)
DEFAULT_NORMALIZATION: Normalization = (IMAGENET_MEAN, IMAGENET_STD)
ProgressFn = Callable[[float], None]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64  # source images per step (a rotation step sees 4x as many inputs)
    lr: float = 2e-3  # AdamW peak learning rate; linear warm-up, then cosine decay to 0
    weight_decay: float = 0.05
    seed: int = 0
    holdout_fraction: float = 0.2
    device: str = "auto"  # "auto": cuda if available, else cpu; or any torch device string
    amp: bool = True  # mixed precision: bfloat16 (or float16 + GradScaler) on CUDA; bfloat16 on CPUs with native bf16 (AMX/AVX512-BF16)
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule fits it)
    augment: bool = True  # random crop (pad 1/8 of the side, reflect) + horizontal flip
    warmup_fraction: float = 0.05

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}", field=name)
        if self.max_steps is not None and self.max_steps < 1:
            raise InvalidInputError(f"max_steps must be positive or None, got {self.max_steps!r}", field="max_steps")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise InvalidInputError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction!r}", field="holdout_fraction")
        if self.lr <= 0 or self.weight_decay < 0:
            raise InvalidInputError("lr must be > 0 and weight_decay >= 0", field="lr")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise InvalidInputError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction!r}", field="warmup_fraction")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    model: NarrowResNet  # eval mode, on the CPU, float32
    net_config: NetConfig
    heldout_accuracy: float  # rotation (all 4 rotations) or label accuracy on the held-out split
    train_accuracy: float  # running accuracy over the last epoch (augmented, train mode)
    num_train: int
    num_heldout: int
    heldout_is_train: bool = False  # True when there was nothing to hold out (N == 1 or holdout_fraction 0)
    history: list[dict] = field(default_factory=list)  # one dict per epoch
    device: str = "cpu"  # where it was trained
    precision: str = "float32"  # "bfloat16" or "float16" when trained with mixed precision
    seconds: float = 0.0


# -- tensors ------------------------------------------------------------------------------


def _check_images(images: np.ndarray, *, in_channels: int | None = None, input_size: int | None = None) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        got = f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}"
        raise InvalidInputError(f"images must be a uint8 array (N, H, W, C), got {got}", field="images")
    if in_channels is not None and images.shape[3] != in_channels:
        raise InvalidInputError(f"images have {images.shape[3]} channels, the net expects {in_channels}", field="images")
    if input_size is not None and images.shape[1:3] != (input_size, input_size):
        raise InvalidInputError(
            f"images are {images.shape[1]}x{images.shape[2]}, the net expects {input_size}x{input_size}",
            field="images",
            hint="resize them to net_config.input_size first",
        )


def _norm_tensors(normalization: Normalization, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = (torch.as_tensor(v, dtype=torch.float32).flatten() for v in normalization)
    if mean.numel() != channels or std.numel() != channels or bool((std <= 0).any()):
        raise InvalidInputError(
            f"normalization must be (mean, std) with {channels} values each and std > 0", field="normalization"
        )
    return mean.view(1, channels, 1, 1), std.view(1, channels, 1, 1)


def _normalize_u8(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    # x: (B, H, W, C) uint8 -> (B, C, H, W) float32 normalised: nds_client.preprocessing.to_nchw's
    # formula, on the tensor's device (tests/test_nets.py checks that the two agree)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean.to(x.device)) / std.to(x.device)


def to_tensor(images: np.ndarray, normalization: Normalization = DEFAULT_NORMALIZATION) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W), ``(x / 255 - mean) / std``: what
    :func:`nds_client.preprocessing.to_nchw` computes, as a torch tensor."""
    _check_images(images)
    mean, std = _norm_tensors(normalization, images.shape[3])
    return _normalize_u8(torch.from_numpy(np.ascontiguousarray(images)), mean, std).contiguous()


def rotate_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> x4 (4B, C, H, W), y4 (4B,): rotation k (k * 90 degrees counter-clockwise,
    ``torch.rot90(x, k, dims=(2, 3))``) is the block ``x4[k*B:(k+1)*B]`` with label k."""
    if x.ndim != 4 or x.shape[2] != x.shape[3]:
        raise InvalidInputError(f"rotate_batch needs square (B, C, H, W) inputs, got {tuple(x.shape)}", field="x")
    b = x.shape[0]
    x4 = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)], dim=0)
    y4 = torch.arange(4, device=x.device).repeat_interleave(b)
    return x4, y4


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop after reflect-padding by 1/8 of the side, and horizontal flip.
    x: (B, C, S, S) -> (B, C, S, S). Random numbers come from ``gen`` (on the CPU)."""
    b, _, s, _ = x.shape
    pad = max(1, s // 8)
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen)  # (B, 2) top-left corner of the crop
    flips = torch.rand(b, generator=gen) < 0.5  # (B,)
    ar = torch.arange(s)
    rows = offsets[:, :1] + ar  # (B, S)
    cols = offsets[:, 1:] + torch.where(flips[:, None], ar.flip(0), ar)  # (B, S), reversed when flipped
    rows, cols, batch = rows.to(x.device), cols.to(x.device), torch.arange(b, device=x.device)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # (B, C, S + 2 pad, S + 2 pad)
    out = padded.permute(0, 2, 3, 1)[batch[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, S, S, C)
    return out.permute(0, 3, 1, 2)


# -- splits -------------------------------------------------------------------------------


def _n_heldout(n: int, fraction: float) -> int:
    if n < 2 or fraction <= 0:
        return 0
    return min(n - 1, max(1, round(n * fraction)))


def _random_split(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(n)
    k = _n_heldout(n, fraction)
    return np.sort(perm[k:]), np.sort(perm[:k])


def _stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per class, hold out round(n_c * fraction) but keep at least one training example of
    each class; hold out at least one image overall when N >= 2 and fraction > 0."""
    n = len(labels)
    if _n_heldout(n, fraction) == 0:
        return np.arange(n), np.arange(0)
    held: list[np.ndarray] = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        k = min(len(members) - 1, round(len(members) * fraction))
        held.append(members[:k])
    heldout = np.concatenate(held) if held else np.arange(0)
    if heldout.size == 0:  # every class too small to give one away: take one from the largest
        values, counts = np.unique(labels, return_counts=True)
        heldout = rng.permutation(np.flatnonzero(labels == values[np.argmax(counts)]))[:1]
    mask = np.zeros(n, dtype=bool)
    mask[heldout] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


# -- the loop -----------------------------------------------------------------------------


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AMX tiles or AVX512-BF16), where
    oneDNN's bf16 convolutions are about twice as fast as float32; elsewhere bf16 is
    emulated and slower, so training stays in float32."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    try:
        return any(bool(getattr(torch.cpu, name)()) for name in checks if hasattr(torch.cpu, name))
    except RuntimeError:  # a torch build without the CPU capability probes
        return False


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise InvalidInputError(f"unknown device {name!r}", field="device", hint='use "auto", "cpu" or "cuda"') from exc


class _Progress:
    """Calls ``fn`` with fractions in [0, 1], at most about 100 times."""

    def __init__(self, fn: ProgressFn | None, total: int) -> None:
        self.fn, self.total, self.last = fn, max(1, total), -1.0

    def __call__(self, done: int) -> None:
        if self.fn is None:
            return
        frac = min(1.0, done / self.total)
        if self.last < 1.0 and (frac >= 1.0 or frac - self.last >= 0.01):
            self.last = frac
            self.fn(frac)


def _train(
    *,
    task: str,  # "rotation" | "classifier"
    images: np.ndarray,
    labels: np.ndarray | None,
    train_idx: np.ndarray,
    heldout_idx: np.ndarray,
    net_config: NetConfig,
    train_config: TrainConfig,
    normalization: Normalization,
    progress: ProgressFn | None,
) -> TrainResult:
    t_start = time.perf_counter()
    cfg = train_config
    device = _resolve_device(cfg.device)
    on_cuda = device.type == "cuda"
    mean, std = (t.to(device) for t in _norm_tensors(normalization, net_config.in_channels))
    heldout_is_train = heldout_idx.size == 0
    eval_idx = train_idx if heldout_is_train else heldout_idx

    # weights and every random draw derive from the seed; the global RNG is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_net(net_config)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    memory_format = torch.channels_last
    # torch's stubs type Module.to(memory_format=...) only alone; at runtime it takes a device with it
    model = model.to(device=device, memory_format=memory_format)  # type: ignore[call-overload]

    # the uint8 images live on the training device (4x smaller than float)
    data = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    targets = torch.from_numpy(labels.astype(np.int64)).to(device) if labels is not None else None

    n_train = len(train_idx)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)
    warmup = int(total_steps * cfg.warmup_fraction)

    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        fused=True if on_cuda else None,  # None is AdamW's default
    )

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, total_steps - warmup)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))

    amp_dtype = None
    if cfg.amp and on_cuda:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif cfg.amp and device.type == "cpu" and cpu_has_native_bf16():
        amp_dtype = torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    def batch_inputs(idx: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = _normalize_u8(data[idx.to(device)], mean, std)  # (b, C, S, S)
        if train and cfg.augment:
            x = _augment(x, gen)
        if task == "rotation":
            x, y = rotate_batch(x)  # (4b, C, S, S), (4b,)
        else:
            assert targets is not None  # classifier runs always pass labels (train_classifier)
            y = targets[idx.to(device)]
        return x.contiguous(memory_format=memory_format), y

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else torch.autocast(device.type, enabled=False)

    @torch.no_grad()
    def accuracy(idx: np.ndarray) -> float:
        model.eval()
        correct = total = 0
        chunk = max(cfg.batch_size, 256)
        for i in range(0, len(idx), chunk):
            x, y = batch_inputs(torch.from_numpy(idx[i : i + chunk]), train=False)
            with autocast():
                logits, _ = model(x)
            correct += int((logits.argmax(1) == y).sum())
            total += y.numel()
        return correct / max(1, total)

    report = _Progress(progress, total_steps)
    report(0)
    history: list[dict] = []
    train_t = torch.from_numpy(train_idx)
    step = 0
    train_acc = 0.0
    for epoch in range(epochs):
        t_epoch = time.perf_counter()
        model.train()
        perm = train_t[torch.randperm(n_train, generator=gen)]
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for i in range(0, n_train, cfg.batch_size):
            if step >= total_steps:
                break
            x, y = batch_inputs(perm[i : i + cfg.batch_size], train=True)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            with autocast():
                logits, _ = model(x)
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss_sum += loss.detach() * y.numel()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.numel()
            step += 1
            report(step)
        train_acc = int(correct) / max(1, seen)
        history.append(
            {
                "epoch": epoch + 1,
                "steps": step,
                "loss": float(loss_sum) / max(1, seen),
                "train_accuracy": train_acc,
                "heldout_accuracy": accuracy(eval_idx),
                "lr": lr_at(step - 1),
                "seconds": time.perf_counter() - t_epoch,
            }
        )
    report(total_steps)

    model = model.to(device="cpu", memory_format=torch.contiguous_format).float().eval()
    return TrainResult(
        model=model,
        net_config=net_config,
        heldout_accuracy=history[-1]["heldout_accuracy"],
        train_accuracy=train_acc,
        num_train=n_train,
        num_heldout=0 if heldout_is_train else len(heldout_idx),
        heldout_is_train=heldout_is_train,
        history=history,
        device=str(device),
        precision=str(amp_dtype).removeprefix("torch.") if amp_dtype is not None else "float32",
        seconds=time.perf_counter() - t_start,
    )


def train_rotation(
    images: np.ndarray,
    net_config: NetConfig,
    train_config: TrainConfig,
    *,
    normalization: Normalization = DEFAULT_NORMALIZATION,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train ``build_net(net_config)`` to predict the rotation (0/90/180/270) of ``images``
    (uint8 (N, S, S, C), S = net_config.input_size). ``heldout_accuracy`` is the 4-way
    accuracy over all four rotations of a random held-out split; with N == 1 it is measured
    on the training image and ``heldout_is_train`` is set."""
    if net_config.num_outputs != 4:
        raise InvalidInputError(
            f"a rotation net has 4 outputs, net_config has {net_config.num_outputs}",
            field="net_config",
            hint="use dataclasses.replace(net_config, num_outputs=4)",
        )
    _check_images(images, in_channels=net_config.in_channels, input_size=net_config.input_size)
    if len(images) == 0:
        raise InvalidInputError("no images to train on", field="images")
    rng = np.random.default_rng(train_config.seed)
    train_idx, heldout_idx = _random_split(len(images), train_config.holdout_fraction, rng)
    return _train(
        task="rotation",
        images=images,
        labels=None,
        train_idx=train_idx,
        heldout_idx=heldout_idx,
        net_config=net_config,
        train_config=train_config,
        normalization=normalization,
        progress=progress,
    )


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    net_config: NetConfig,
    train_config: TrainConfig,
    *,
    normalization: Normalization = DEFAULT_NORMALIZATION,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train ``build_net(net_config)`` (num_outputs == num_classes) on integer ``labels``
    in [0, num_classes). ``heldout_accuracy`` is the label accuracy on a stratified split."""
    if net_config.num_outputs != num_classes:
        raise InvalidInputError(
            f"net_config has {net_config.num_outputs} outputs for {num_classes} classes",
            field="net_config",
            hint="use dataclasses.replace(net_config, num_outputs=num_classes)",
        )
    _check_images(images, in_channels=net_config.in_channels, input_size=net_config.input_size)
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidInputError(f"labels must be integers of shape ({len(images)},), got {labels.dtype} {labels.shape}", field="labels")
    if len(images) == 0:
        raise InvalidInputError("no images to train on", field="images")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise InvalidInputError(f"labels must lie in [0, {num_classes})", field="labels")
    rng = np.random.default_rng(train_config.seed)
    train_idx, heldout_idx = _stratified_split(labels, train_config.holdout_fraction, rng)
    return _train(
        task="classifier",
        images=images,
        labels=labels,
        train_idx=train_idx,
        heldout_idx=heldout_idx,
        net_config=net_config,
        train_config=train_config,
        normalization=normalization,
        progress=progress,
    )


@torch.no_grad()
def embed(model: nn.Module, images: np.ndarray, normalization: Normalization = DEFAULT_NORMALIZATION, batch_size: int = 256) -> np.ndarray:
    """L2-normalised penultimate features, float32 (N, feature_dim), with torch (eager) on
    the model's device. The model's train/eval mode is restored afterwards."""
    _check_images(images)
    param = next(model.parameters())
    device = param.device
    mean, std = (t.to(device) for t in _norm_tensors(normalization, images.shape[3]))
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, len(images), batch_size):
            x = _normalize_u8(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(device), mean, std)
            _, features = model(x.to(param.dtype))  # (b, feature_dim)
            out.append(F.normalize(features.float(), dim=1).cpu())
    finally:
        model.train(was_training)
    if not out:
        dim = getattr(getattr(model, "config", None), "feature_dim", 0)
        return np.zeros((0, dim), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32, copy=False)
