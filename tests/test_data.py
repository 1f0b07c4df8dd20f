import io

import numpy as np
import pytest
import torch
from PIL import Image

from dtrain.data.shards import CorruptShards, DataError, epoch_dataset, expand_urls, load_images, train_batches, write_shards

URLS = "train-{000000..000003}.tar"


def samples_of(urls, rank, world, epoch=0, seed=0):
    ds = epoch_dataset(urls, rank, world, epoch, seed, batch_size=1, shuffle_buffer=8)
    return [(x[0].clone(), int(y[0])) for x, y in ds]


def test_digits_shards_hold_real_labelled_images(digits_dir):
    x, y = load_images(f"{digits_dir}/val-000000.tar")
    assert x.shape == (50, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert torch.bincount(y).tolist() == [5] * 10  # class-balanced validation split
    assert x.std() > 0.3  # real strokes, not blank images


def test_ranks_read_disjoint_shards_that_cover_the_epoch(digits_dir):
    urls = f"{digits_dir}/{URLS}"
    all_keys = {tuple(x.flatten().tolist()) for x, _ in samples_of(urls, 0, 1)}
    r0 = {tuple(x.flatten().tolist()) for x, _ in samples_of(urls, 0, 2)}
    r1 = {tuple(x.flatten().tolist()) for x, _ in samples_of(urls, 1, 2)}
    assert r0 and r1 and not (r0 & r1) and (r0 | r1) == all_keys


def test_order_is_deterministic_and_changes_with_epoch(digits_dir):
    urls = f"{digits_dir}/{URLS}"
    a, b = samples_of(urls, 0, 2), samples_of(urls, 0, 2)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    c = samples_of(urls, 0, 2, epoch=1)
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_skip_resumes_the_stream_exactly(digits_dir):
    urls = f"{digits_dir}/{URLS}"
    full = train_batches(urls, 1, 2, 0, 8, 32)
    ref = [next(full) for _ in range(100)]  # crosses epoch boundaries
    resumed = train_batches(urls, 1, 2, 0, 8, 32, skip=73)
    for x, y in ref[73:]:
        rx, ry = next(resumed)
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_missing_shards_and_too_few_shards_are_named(digits_dir, tmp_path):
    with pytest.raises(DataError, match="not found"):
        expand_urls(f"{tmp_path}/nope-{{000..002}}.tar")
    with pytest.raises(DataError, match="4 shard.*8 workers"):
        epoch_dataset(f"{digits_dir}/{URLS}", 0, 8, 0, 0, 4, 8)


def test_corrupt_shard_is_skipped_with_a_warning(tmp_path):
    img = np.zeros((8, 8), np.uint8)
    write_shards(((img + i, i % 10) for i in range(20)), str(tmp_path / "s-%06d.tar"), per_shard=10)
    (tmp_path / "s-000001.tar").write_bytes(b"this is not a tar file" * 50)
    urls = f"{tmp_path}/s-{{000000..000001}}.tar"
    counter = CorruptShards()
    with pytest.warns(UserWarning, match="corrupt"):
        got = [x for x, _ in epoch_dataset(urls, 0, 1, 0, 0, 1, 8, on_corrupt=counter)]
    assert len(got) == 10 and counter.count == 1  # the good shard, whole; the bad one counted
    with pytest.raises(DataError, match="on_corrupt=fail"):
        list(epoch_dataset(urls, 0, 1, 0, 0, 1, 8, on_corrupt=CorruptShards(fail=True)))


def test_written_samples_are_png_and_label(tmp_path):
    import tarfile

    img = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 3)
    (path,) = write_shards([(img, 7)], str(tmp_path / "t-%06d.tar"), per_shard=10)
    with tarfile.open(path) as tar:
        names = sorted(tar.getnames())
        assert names == ["00000000.cls", "00000000.png"]
        png = tar.extractfile("00000000.png").read()
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), img)
        assert tar.extractfile("00000000.cls").read() == b"7"


def test_pickled_payloads_are_refused_and_never_run(tmp_path):
    import pickle
    import tarfile

    from dtrain.data.shards import decode_sample

    marker = tmp_path / "pwned"

    class Payload:  # unpickling it would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    shard = tmp_path / "evil-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("s0.pickle", pickle.dumps(Payload())), ("s0.cls", b"1"),
                           ("s1.latent.npy", _npy(np.array([Payload()], dtype=object))), ("s1.cls", b"2")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    import webdataset as wds

    samples = list(wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples()))
    with pytest.raises(DataError, match=r"holds \['pickle'\]: dtrain never unpickles"):
        decode_sample(samples[0])
    with pytest.raises(DataError, match="latent.npy: .*never unpickles"):
        decode_sample(samples[1])
    assert not marker.exists()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()
