"""A Gaussian mixture with exact ground truth (dtrain.data.mixture) as WebDataset shards.

Shape convention: a D-dimensional point is stored under the key `latent.npy` as float32 [D, 1, 1],
a 1x1 "image" with D channels, next to `cls` = its component index. The shard reader hands
`latent.npy` to training as stored (no [-1, 1] mapping), so a 2-D mixture trains unchanged with
    model.arch=mlp model.in_channels=2 model.image_size=1 model.patch_size=1 model.num_classes=K.
Coordinates are the spec's own units; keep the mixture roughly unit scale, like the N(0, I) noise.

The spec (YAML or JSON) is {means [K, D], covs [K, D, D], weights [K]}; configs/gmm/default.yaml is
the bundled one. A copy of the validated spec goes to `gmm.json` next to the shards, so evaluation
finds the ground truth from the data directory alone.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
import yaml

from dtrain.data.shards import DataError
from dtrain.data.mixture import GaussianMixture, MixtureError

SPEC_FILE = "gmm.json"  # the mixture, written next to the shards


def load_spec(path: str | Path) -> GaussianMixture:
    """A validated mixture from a YAML or JSON file (JSON is YAML); DataError names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"mixture spec not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML/JSON: {e}") from None
    try:
        return GaussianMixture.from_dict(spec)
    except MixtureError as e:
        raise DataError(f"{path}: {e}") from None


def write_vector_shards(x: torch.Tensor, labels: torch.Tensor, out_pattern: str, per_shard: int) -> list[str]:
    """x [N, D], labels [N] -> shards of {__key__, latent.npy: float32 [D, 1, 1], cls}."""
    Path(out_pattern).parent.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(out_pattern, maxcount=per_shard, verbose=0) as sink:
        for i, (point, label) in enumerate(zip(x.numpy().astype(np.float32), labels.tolist())):
            buf = io.BytesIO()
            np.save(buf, point.reshape(-1, 1, 1))
            sink.write({"__key__": f"{i:08d}", "latent.npy": buf.getvalue(), "cls": str(int(label)).encode()})
        return [str(Path(out_pattern % k)) for k in range(sink.shard)]


def write_gmm(gmm: GaussianMixture, out: str | Path, n_train: int = 20_000, n_val: int = 2_000,
              train_shards: int = 4, seed: int = 0) -> dict[str, list[str]]:
    """n_train samples in `train_shards` shards (train-000000.tar, ...) and n_val in val-000000.tar.
    Deterministic: train is the first n_train draws of gmm.sample with a generator seeded `seed`,
    val the next n_val."""
    if n_train < train_shards or n_val < 1 or train_shards < 1:
        raise DataError(f"need n_train >= shards >= 1 and n_val >= 1 (got n_train={n_train}, "
                        f"shards={train_shards}, n_val={n_val})")
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = gmm.sample(n_train, g)
    x_val, y_val = gmm.sample(n_val, g)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / SPEC_FILE).write_text(json.dumps(gmm.to_dict(), indent=1) + "\n")
    return {
        "train": write_vector_shards(x_train, y_train, str(out / "train-%06d.tar"), -(-n_train // train_shards)),
        "val": write_vector_shards(x_val, y_val, str(out / "val-%06d.tar"), n_val),
    }
