"""Feature networks for Frechet distance and class accuracy.

`"digits"`: a small CNN the project trains itself on scikit-learn's bundled digits (no download),
deterministically (fixed seed, one thread, deterministic algorithms) and cached on disk under a hash
of its training data, image size, code and hyperparameters, so every machine trains it once and
gets the same weights. `"inception"`: InceptionV3 pool features (2048-d, torch-fidelity's port of
the TF FID network), only where torch-fidelity and its weights already exist locally.

A feature net takes images [N, C, H, W] in [-1, 1] (as `render` and `load_images` return them) and
gives features [N, F]; its `name` identifies the weights, so Frechet distances computed with
different feature nets are never mistaken for each other.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dtrain.errors import DtrainError
from dtrain.data.digits import digits_arrays

CACHE_ENV = "DTRAIN_CACHE"  # directory for trained feature nets (default ~/.cache/dtrain)
INCEPTION_ENV = "DTRAIN_INCEPTION_WEIGHTS"  # a local torch-fidelity InceptionV3 weights file
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's file name in the torch hub cache
# Held-out digits per class. The split is write_digits' (same permutation of the same seed), so the
# validation shards of `dtrain data digits` (20 per class, seed 0) are among the held-out images.
HELD_OUT_PER_CLASS = 30


class FeatureNetUnavailable(DtrainError, RuntimeError):
    """A feature net whose code or weights are not on this machine (nothing is ever downloaded)."""


class FeatureNet(Protocol):
    name: str  # identifies the weights: compare Frechet distances only under the same name

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] in [-1, 1] -> [N, F] float32."""
        ...


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dtrain")


# ---------------------------------------------------------------------------------------------
# The digits classifier


class DigitsCNN(nn.Module):
    """Three 3x3 convs and two linear layers. An adaptive max pool brings any input side >= 4 (the
    digits' 8x8, an upsampled 16x16) to 4x4, so one architecture serves every image size."""

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, width // 2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width // 2, width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveMaxPool2d(4),  # [N, width, 4, 4]
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        )
        self.embed = nn.Linear(width * 16, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate layer before its ReLU: [N, feature_dim]. Taken before the ReLU so no unit is
        stuck at 0, which would make the feature covariance singular."""
        return self.embed(self.convs(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, 1, S, S] in [-1, 1] -> logits [N, classes]
        return self.head(F.relu(self.features(x)))


@dataclass(frozen=True)
class TrainSpec:
    """Everything that decides the classifier's weights besides data and code (all in the cache key)."""
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    width: int = 32
    feature_dim: int = 64
    seed: int = 0


def digits_split(image_size: int, held_out_per_class: int = HELD_OUT_PER_CLASS, seed: int = 0):
    """(x_train, y_train, x_held_out, y_held_out): images [N, 1, S, S] in [-1, 1] exactly as
    `decode_sample` reads them from shards (uint8 / 127.5 - 1), labels [N] long.
    The held-out set is write_digits' validation split (the first `held_out_per_class` of each class
    in the same seeded permutation), so a smaller val_per_class with the same seed is a subset."""
    img, y = digits_arrays(image_size)  # the shards' preprocessing: bilinear resize, uint8
    order = np.random.default_rng(seed).permutation(len(y))  # as in dtrain.data.digits.write_digits
    held = np.concatenate([order[y[order] == c][:held_out_per_class] for c in range(10)])
    train = np.setdiff1d(order, held)
    x = torch.from_numpy(img.astype(np.float32) / 127.5 - 1.0)[:, None]
    y = torch.from_numpy(y)
    return x[train], y[train], x[held], y[held]


def _key(x: torch.Tensor, y: torch.Tensor, image_size: int, spec: TrainSpec) -> str:
    """Hash of the training data, image size, hyperparameters and the code that trains the net."""
    h = hashlib.sha256()
    h.update(x.numpy().tobytes())
    h.update(y.numpy().tobytes())
    h.update(json.dumps({"image_size": image_size, **asdict(spec)}, sort_keys=True).encode())
    h.update(_CODE)
    return h.hexdigest()[:16]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


@contextlib.contextmanager
def deterministic_cpu():
    """One thread and deterministic algorithms for a training run whose weights must be bit-identical
    for the same inputs (the cached feature nets); the caller's settings are restored afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def train_classifier(x: torch.Tensor, y: torch.Tensor, spec: TrainSpec) -> DigitsCNN:
    """AdamW on cross-entropy, one thread, deterministic algorithms, seeded init and batch order:
    the same inputs give bit-identical weights. The caller's RNG state, thread count and
    determinism setting are restored afterwards."""
    with deterministic_cpu():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            net = DigitsCNN(spec.width, spec.feature_dim)
            opt = torch.optim.AdamW(net.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
            steps = spec.epochs * -(-len(y) // spec.batch_size)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=steps)
            order = torch.Generator().manual_seed(spec.seed)
            net.train()
            for _ in range(spec.epochs):
                for idx in torch.randperm(len(y), generator=order).split(spec.batch_size):
                    loss = F.cross_entropy(net(x[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
    return net.eval()


# the code that decides the weights, read once at import (part of the cache key)
_CODE = "".join(inspect.getsource(obj) for obj in (DigitsCNN, deterministic_cpu, train_classifier)).encode()


class DigitsClassifier:
    """The trained digits CNN as a feature net: `features(x)` [N, F], `logits(x)` [N, 10].
    `val_acc` is its accuracy on the held-out real digits; `train_images` (uint8 bytes of each
    training image) lets an evaluation check that its reference images were not trained on."""

    def __init__(self, net: DigitsCNN, name: str, image_size: int, val_acc: float, train_seconds: float,
                 path: Path, train_images: set[bytes]):
        self.net, self.name, self.image_size = net, name, image_size
        self.val_acc, self.train_seconds, self.path, self.train_images = val_acc, train_seconds, path, train_images

    @torch.no_grad()
    def _run(self, fn, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
        if x.shape[1:] != (1, self.image_size, self.image_size):
            raise ValueError(f"the digits classifier was trained on [1, {self.image_size}, {self.image_size}] "
                             f"images, got {list(x.shape[1:])}")
        return torch.cat([fn(x[i:i + batch].float().cpu()) for i in range(0, len(x), batch)])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.net.features, x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.net, x)


def _image_bytes(x: torch.Tensor) -> set[bytes]:
    """uint8 bytes of each image in [-1, 1] (exact for images read from shards)."""
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)
    return {bytes(img.numpy().tobytes()) for img in u8}


def digits_classifier(image_size: int = 8, spec: TrainSpec = TrainSpec(), directory: str | Path | None = None,
                      retrain: bool = False) -> DigitsClassifier:
    """The digits classifier for `image_size`: loaded from `<directory>/classifier-<hash>.safetensors`
    (default: $DTRAIN_CACHE or ~/.cache/dtrain), else trained (well under a minute on one thread),
    evaluated on the held-out digits and written there atomically."""
    x, y, xv, yv = digits_split(image_size)
    key = _key(x, y, image_size, spec)
    path = Path(directory or cache_dir()) / f"classifier-{key}.safetensors"
    net, info = DigitsCNN(spec.width, spec.feature_dim), None
    if path.is_file() and not retrain:
        try:
            net.load_state_dict(load_file(str(path)))
            with safe_open(str(path), framework="pt") as f:
                info = json.loads(f.metadata()["dtrain.classifier"])
            net.eval()
        except Exception as e:  # an unreadable cache file is retrained over, never trusted
            warnings.warn(f"retraining the digits classifier: cached {path} is unreadable ({e})")
            info = None
    if info is None:
        start = time.perf_counter()
        net = train_classifier(x, y, spec)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            val_acc = accuracy(net(xv), yv)
        info = {"val_acc": val_acc, "n_val": len(yv), "train_seconds": round(seconds, 2),
                "image_size": image_size, "spec": asdict(spec), "torch": torch.__version__}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # atomic: concurrent trainers never see half a file
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp),
                  metadata={"format": "pt", "dtrain.classifier": json.dumps(info)})
        os.replace(tmp, path)
    return DigitsClassifier(net, f"digits{image_size}-{key}", image_size, info["val_acc"], info["train_seconds"],
                            path, _image_bytes(x))


# ---------------------------------------------------------------------------------------------
# InceptionV3 (only from local files)


class InceptionFeatures:
    """torch-fidelity's InceptionV3 (the TF FID graph): 2048-d pool features. Grayscale images are
    repeated to 3 channels; torch-fidelity resizes uint8 inputs to 299x299 itself."""

    def __init__(self, weights: Path):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=str(weights)).eval()
        self.name = f"inception-{weights.name}"

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
        u8 = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [N, C, H, W]
        u8 = u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8
        return torch.cat([self.net(u8[i:i + batch])[0].float() for i in range(0, len(u8), batch)])


def inception_features(image_size: int | None = None) -> InceptionFeatures:
    """InceptionV3 from $DTRAIN_INCEPTION_WEIGHTS or the torch hub cache; FeatureNetUnavailable
    (never a download) when torch-fidelity or the weights file is missing."""
    weights = Path(os.environ.get(INCEPTION_ENV) or Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE)
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise FeatureNetUnavailable("inception features need the torch-fidelity package, which is not installed; "
                                    "nothing is downloaded: use the 'digits' feature net, or `pip install "
                                    f"torch-fidelity` and put {INCEPTION_FILE} at {weights} (or set {INCEPTION_ENV})"
                                    ) from None
    if not weights.is_file():
        raise FeatureNetUnavailable(f"inception weights not found at {weights}; nothing is downloaded: copy "
                                    f"torch-fidelity's {INCEPTION_FILE} there or set {INCEPTION_ENV} to its path")
    return InceptionFeatures(weights)


def _shapes_recogniser(image_size: int) -> FeatureNet:
    """The shapes world's recogniser (dtrain.eval.recogniser, which imports this module: imported here
    on first use, by name, so the two modules form no import cycle)."""
    return importlib.import_module("dtrain.eval.recogniser").shapes_recogniser(image_size)


# name -> factory(image_size) -> FeatureNet. New feature nets add an entry here.
FEATURE_NETS: dict[str, Callable[[int], FeatureNet]] = {
    "digits": lambda image_size: digits_classifier(image_size),
    "inception": inception_features,
    "shapes": _shapes_recogniser,
}


def feature_net(name: str, image_size: int) -> FeatureNet:
    if name not in FEATURE_NETS:
        raise ValueError(f"unknown feature net '{name}': one of {sorted(FEATURE_NETS)}")
    return FEATURE_NETS[name](image_size)
