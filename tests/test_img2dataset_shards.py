"""Shards in img2dataset's layout (jpg/png/webp + txt caption + json metadata, no cls), built by hand
with tarfile: what users' captioned image data looks like."""
import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from dtrain.data.shards import (CorruptShards, DataError, MissingField, decode_sample, epoch_dataset, load_images,
                                train_batches)

SIZE = 16


def _image_bytes(img: np.ndarray | Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, format=fmt, quality=95)
    return buf.getvalue()


def _rgb(i: int) -> np.ndarray:
    """A smooth uint8 [H, W, 3] image (JPEG keeps it close)."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return np.stack([xx * 15, yy * 15, np.full_like(xx, 40 * i + 20)], -1).astype(np.uint8)


def _gray(i: int) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return ((xx + yy) * 7 + 10 * i).astype(np.uint8)


def _members(key: str, image: tuple[str, bytes] | None, caption: str | None, cls: int | None = None) -> list:
    """One sample as img2dataset writes it: {key}.jpg, {key}.txt, {key}.json (+ .cls if given)."""
    meta = {"url": f"https://example.com/{key}.jpg", "key": key, "status": "success", "caption": caption,
            "width": SIZE, "height": SIZE}
    out = [(f"{key}.{image[0]}", image[1])] if image else []
    if caption is not None:
        out.append((f"{key}.txt", caption.encode("utf-8")))
    out.append((f"{key}.json", json.dumps(meta).encode()))
    if cls is not None:
        out.append((f"{key}.cls", str(cls).encode()))
    return out


def _write_tar(path, members: list) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _rgb_shard(path, first: int) -> str:
    """Four RGB samples: jpg, png with cls 3, webp, and an RGBA png; keys from `first`."""
    rgba = np.concatenate([_rgb(3), np.full((SIZE, SIZE, 1), 128, np.uint8)], -1)
    images = [("jpg", _image_bytes(_rgb(0), "JPEG")), ("png", _image_bytes(_rgb(1), "PNG")),
              ("webp", _image_bytes(Image.fromarray(_rgb(2)), "WEBP")), ("png", _image_bytes(rgba, "PNG"))]
    members = []
    for i, image in enumerate(images):
        members += _members(f"{first + i:09d}", image, f"a photo número {i}", cls=3 if i == 1 else None)
    return _write_tar(path, members)


def _to_unit(img: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(img.astype(np.float32) / 127.5 - 1.0)
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1)


def test_load_images_reads_img2dataset_rgb_samples(tmp_path):
    x, y = load_images(_rgb_shard(tmp_path / "rgb-000000.tar", 0))
    assert x.shape == (4, 3, SIZE, SIZE) and x.dtype == torch.float32
    assert y.tolist() == [-1, 3, -1, -1]  # no cls: "no class"; cls wins when present
    assert (x[0] - _to_unit(_rgb(0))).abs().max() < 0.1  # JPEG: close
    assert torch.equal(x[1], _to_unit(_rgb(1)))  # PNG: exact
    assert (x[2] - _to_unit(_rgb(2))).abs().max() < 0.15  # lossy WebP
    assert torch.equal(x[3], _to_unit(_rgb(3)))  # RGBA -> RGB, alpha dropped


def test_grayscale_jpeg_and_palette_png(tmp_path):
    members = _members("000000000", ("jpeg", _image_bytes(_gray(0), "JPEG")), "gray")
    members += _members("000000001", ("png", _image_bytes(_gray(1), "PNG")), "gray too")
    x, y = load_images(_write_tar(tmp_path / "gray-000000.tar", members))
    assert x.shape == (2, 1, SIZE, SIZE) and y.tolist() == [-1, -1]
    assert (x[0] - _to_unit(_gray(0))).abs().max() < 0.1
    assert torch.equal(x[1], _to_unit(_gray(1)))

    pal = Image.fromarray(_rgb(0)).quantize(colors=16)
    x, label = decode_sample({"__key__": "p", "png": _image_bytes(pal, "PNG"), "txt": b"palette"})
    assert x.shape == (3, SIZE, SIZE) and label == -1
    assert torch.equal(x, _to_unit(np.asarray(pal.convert("RGB"))))


def test_training_reads_img2dataset_shards(tmp_path):
    urls = f"{tmp_path}/rgb-{{000000..000001}}.tar"
    for k in range(2):
        _rgb_shard(tmp_path / f"rgb-{k:06d}.tar", 4 * k)
    batches = list(epoch_dataset(urls, 0, 1, 0, 0, batch_size=2, shuffle_buffer=1))
    assert len(batches) == 4
    for x, y in batches:
        assert x.shape == (2, 3, SIZE, SIZE) and x.min() >= -1 and x.max() <= 1
    assert sorted(int(v) for _, y in batches for v in y) == [-1] * 6 + [3] * 2
    stream = train_batches(urls, 0, 1, 0, batch_size=2, shuffle_buffer=1)
    for _ in range(6):  # into the second epoch
        x, y = next(stream)
        assert x.shape == (2, 3, SIZE, SIZE) and y.shape == (2,) and set(y.tolist()) <= {-1, 3}


def _bad_shard(tmp_path) -> str:
    """Five samples: 0, 2 and 4 fine; 1 has no image, 3 no caption (nor cls)."""
    jpg = ("jpg", _image_bytes(_rgb(0), "JPEG"))
    members = (_members("000000000", jpg, "ok") + _members("000000001", None, "no image")
               + _members("000000002", jpg, "ok") + _members("000000003", jpg, None)
               + _members("000000004", jpg, "  ok  "))
    return _write_tar(tmp_path / "bad-000000.tar", members)


def test_samples_missing_a_field_are_skipped_and_counted(tmp_path):
    urls = _bad_shard(tmp_path)
    counter = CorruptShards()
    with pytest.warns(UserWarning) as caught:
        got = [y for _, y in epoch_dataset(urls, 0, 1, 0, 0, 1, 1, on_corrupt=counter)]
    assert len(got) == 3 and counter.count == 2
    messages = [str(w.message) for w in caught]
    assert any("corrupt" in m and "sample 000000001" in m and "no image" in m for m in messages)
    assert any("sample 000000003" in m and "no label" in m and "bad-000000.tar" in m for m in messages)


def test_missing_field_fails_the_run_with_on_corrupt_fail(tmp_path):
    urls = _bad_shard(tmp_path)
    with pytest.raises(DataError, match="on_corrupt=fail.*sample 000000001 .*no image"):
        list(epoch_dataset(urls, 0, 1, 0, 0, 1, 1, on_corrupt=CorruptShards(fail=True)))


def test_load_images_raises_missing_field(tmp_path):
    urls = _bad_shard(tmp_path)
    with pytest.raises(MissingField, match=r"sample 000000001 of .*bad-000000.tar has no image .*\['json', 'txt'\]"):
        load_images(urls)
    members = _members("000000000", ("jpg", _image_bytes(_rgb(0), "JPEG")), "   ")  # blank caption
    with pytest.raises(MissingField, match="sample 000000000 .*no label"):
        load_images(_write_tar(tmp_path / "blank-000000.tar", members))


def test_pickled_payload_stays_fatal_in_training(tmp_path):
    members = _members("000000000", ("jpg", _image_bytes(_rgb(0), "JPEG")), "ok")
    members.append(("000000001.pickle", pickle.dumps([1, 2])))
    urls = _write_tar(tmp_path / "evil-000000.tar", members)
    counter = CorruptShards()
    with pytest.raises(DataError, match="never unpickles"):
        list(epoch_dataset(urls, 0, 1, 0, 0, 1, 1, on_corrupt=counter))
    assert counter.count == 0


def test_negative_label_is_the_null_label():
    from dtrain.models.dit import DiT
    from dtrain.models.layers import LabelEmbedder
    from dtrain.models.mlp import MLP

    torch.manual_seed(0)
    emb = LabelEmbedder(10, 8, dropout=0.5).eval()
    out = emb(torch.tensor([-1, 10, 3]))
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])
    emb.train()  # label dropout only ever replaces labels by the null one: -1 stays null
    assert all(torch.equal(row, out[1]) for row in emb(torch.full((64,), -1)))

    for net, x in ((MLP(dim=4, hidden_size=16, depth=1, num_classes=10), torch.randn(2, 4)),
                   (DiT(image_size=4, in_channels=1, patch_size=2, hidden_size=16, depth=1, num_heads=2,
                        num_classes=10), torch.randn(2, 1, 4, 4))):
        net.eval()
        for p in net.parameters():  # adaLN-Zero starts with a zero output: make the label matter
            torch.nn.init.normal_(p, std=0.1)
        t = torch.rand(2)
        with torch.no_grad():
            a, b = net(x, t, torch.tensor([-1, -1])), net(x, t, torch.tensor([10, 10]))
            c = net(x, t, torch.tensor([2, 2]))
        assert torch.equal(a, b) and not torch.equal(a, c)
