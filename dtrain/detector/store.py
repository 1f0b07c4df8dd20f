"""The saved detector: one safetensors file holding the weights, with string metadata: `format`
("dtrain-detector"), `config` (DetectorConfig as JSON), `version` (model.version: a hash of weights and
config, what a response or a table names), `train_generators` (JSON list: the generators it learnt,
so evaluation knows which are held out), `encoding` and `trained` (JSON: the run's figures)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dtrain.detector.encoding import encode_all, to_input
from dtrain.detector.errors import DetectorError
from dtrain.detector.model import Detector, DetectorConfig, version

FORMAT = "dtrain-detector"


class DetectorFileError(DetectorError):
    pass


def save_detector(path: str | Path, state: dict[str, torch.Tensor], config: DetectorConfig,
                  train_generators: list[str], trained: dict | None = None) -> str:
    """Write the detector; returns its version."""
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    v = version(state, config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={"format": FORMAT, "config": json.dumps(asdict(config)), "version": v,
                                         "train_generators": json.dumps(list(train_generators)),
                                         "encoding": config.encoding, "trained": json.dumps(trained or {})})
    tmp.replace(path)
    return v


def load_detector(path: str | Path) -> tuple[Detector, dict]:
    """(the detector in eval mode, its metadata with config/train_generators/trained parsed); a
    DetectorFileError naming the problem for anything else."""
    path = Path(path)
    if not path.is_file():
        raise DetectorFileError(f"{path}: no such detector file (train one with `dtrain detector train`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # not safetensors at all
        raise DetectorFileError(f"{path}: not a detector file ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise DetectorFileError(f"{path}: a safetensors file but not a dtrain detector (format {meta.get('format')!r})")
    config = DetectorConfig(**json.loads(meta["config"]))
    net = Detector(config)
    net.load_state_dict(state)
    if version(state, config) != meta["version"]:
        raise DetectorFileError(f"{path}: its weights do not match its version {meta['version']} (altered?)")
    meta = {**meta, "config": config, "train_generators": json.loads(meta["train_generators"]),
            "trained": json.loads(meta.get("trained", "{}"))}
    return net.eval(), meta


@torch.no_grad()
def score(net: Detector, images: np.ndarray, batch: int = 256, encoded: bool = False) -> np.ndarray:
    """Logits (> 0: generated) of uint8 RGB images [N, H, W, 3], encoded first by the detector's encoding
    (skip it with encoded=True for images that already went through it)."""
    if not encoded:
        images = encode_all(images, net.config.encoding)
    return np.concatenate([net(to_input(images[i:i + batch])).numpy() for i in range(0, len(images), batch)])
