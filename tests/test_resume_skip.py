"""Resuming skips batches by per-shard sample counts: exact, and without decoding what it skips."""
import io
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

import dtrain.data.shards as shards
from dtrain.data.shards import CorruptShards, DataError, epoch_dataset, shard_count, train_batches, write_shards

SIZES = [7, 13, 5, 21, 9, 16, 3, 11]  # uneven shards; 85 samples


def uneven_shards(tmp_path, sizes=SIZES) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i, n in enumerate(sizes):
        imgs = rng.integers(0, 256, size=(n, 4, 4), dtype=np.uint8)
        paths += write_shards(((img, (i + j) % 10) for j, img in enumerate(imgs)), str(tmp_path / f"s{i}-%06d.tar"), n)
    return paths


def epoch_lengths(urls, rank, world, bs, epochs, workers=1):
    """Batches per epoch of this rank, from the shard counts (checked against a full read in a test below)."""
    out = []
    for e in range(epochs):
        mine = shards._rank_shards(shards.expand_urls(urls), rank, world, e, 0)
        out.append(sum(sum(shard_count(u)[0] for u in mine[w::workers]) // bs for w in range(workers)))
    return out


def assert_tail(urls, rank, world, bs, buf, ks, workers=0, n_ref=None):
    lengths = epoch_lengths(urls, rank, world, bs, 4, max(1, workers))
    n_ref = n_ref or sum(lengths[:3]) + 2
    ref = list(islice(train_batches(urls, rank, world, 0, bs, buf, workers), n_ref))
    for k in ks:
        got = list(islice(train_batches(urls, rank, world, 0, bs, buf, workers, skip=k), n_ref - k))
        assert len(got) == n_ref - k
        for (x, y), (gx, gy) in zip(ref[k:], got):
            assert torch.equal(x, gx) and torch.equal(y, gy), (k, rank, world)
    return lengths


@pytest.mark.parametrize("rank,world,bs,buf", [(0, 1, 4, 8), (1, 2, 5, 4), (2, 3, 3, 64), (0, 2, 6, 1)])
def test_skip_equals_the_tail_of_the_unskipped_stream(tmp_path, rank, world, bs, buf):
    urls = "::".join(uneven_shards(tmp_path))
    b0, b1, *_ = epoch_lengths(urls, rank, world, bs, 2)
    ks = sorted({1, 2, b0 - 1, b0, b0 + 1, b0 + b1 - 1, b0 + b1 + 1})
    assert_tail(urls, rank, world, bs, buf, ks)


def test_epoch_lengths_from_counts_match_a_full_read(tmp_path):
    urls = "::".join(uneven_shards(tmp_path))
    for rank, world, bs in [(0, 1, 4), (1, 3, 5)]:
        assert epoch_lengths(urls, rank, world, bs, 3) == [
            sum(1 for _ in epoch_dataset(urls, rank, world, e, 0, bs, 8)) for e in range(3)]


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_skip_with_loader_workers_equals_the_tail(tmp_path, rank, world):
    """DataLoader workers read every 2nd shard and batch their own samples; uneven shards give the workers
    uneven batch counts, so late in an epoch one worker is exhausted and the other goes on alone."""
    urls = "::".join(uneven_shards(tmp_path))
    b0, b1, *_ = epoch_lengths(urls, rank, world, 3, 2, workers=2)
    assert_tail(urls, rank, world, 3, 4, sorted({1, b0 - 1, b0 + 2, b0 + b1 - 1}), workers=2, n_ref=b0 + b1 + 2)


def test_deep_skip_decodes_only_what_it_yields(tmp_path, monkeypatch):
    urls = "::".join(uneven_shards(tmp_path))
    bs, buf = 4, 8
    lengths = epoch_lengths(urls, 0, 1, bs, 4)
    k = sum(lengths[:3]) + 5  # 3 epochs and 5 batches in
    ref = list(islice(train_batches(urls, 0, 1, 0, bs, buf), k + 3))
    calls = []
    decode = shards.decode_sample
    monkeypatch.setattr(shards, "decode_sample", lambda s, *a: calls.append(s["__key__"]) or decode(s, *a))
    got = list(islice(train_batches(urls, 0, 1, 0, bs, buf, skip=k), 3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ref[k:], got))
    assert len(calls) <= 3 * bs + buf  # the replay decoded (k + 3) * bs = 312 samples
    assert len(calls) <= 3 * bs + 1  # wds.batched reads one sample ahead


def _tar(path, members, mode="w", format=tarfile.PAX_FORMAT):
    with tarfile.open(path, mode, format=format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _read(url):
    return sum(1 for _ in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()))


def test_counts_match_the_samples_in_the_tars(tmp_path, digits_dir):
    for path in sorted(digits_dir.glob("*.tar")) + [p for p in map(str, uneven_shards(tmp_path))]:
        assert shard_count(str(path)) == (_read(str(path)), ())
        assert shards._count_headers(str(path), Path(path).stat().st_size) == shard_count(str(path))[0]
    members = [("d", None), ("a.png", b"1"), ("a.cls", b"1"), ("README", b"no extension: not a sample"),
               ("__meta__", b"skipped"), ("__x__/y.png", b"skipped"), ("sub/b.x.npy", b"2"), ("sub/b.cls", b"2"),
               ("sub/c.PNG", b"3"), ("d/a.png", b"4")]
    long = "x" * 90 + "/" + "y" * 60  # a GNU long name, a pax path or a ustar prefix, by format
    members += [(f"{long}.png", b"5"), (f"{long}.cls", b"5"), ("é.png", b"6"), ("x" * 99 + ".cls", b"7")]
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        path = tmp_path / f"odd-{fmt}.tar"
        _tar(path, members[:-1] if fmt == tarfile.USTAR_FORMAT else members, format=fmt)  # ustar: no 103-char basename
        expect = 6 if fmt == tarfile.USTAR_FORMAT else 7
        assert shards._count_headers(str(path), path.stat().st_size) == expect  # from headers, not by reading
        assert shard_count(str(path)) == (_read(str(path)), ()) == (expect, ())
    _tar(tmp_path / "odd.tar.gz", members, "w:gz")  # compressed: counted by reading, still right
    assert shard_count(str(tmp_path / "odd.tar.gz")) == (_read(str(tmp_path / "odd.tar.gz")), ()) == (7, ())


def _truncated(tmp_path, sizes=(10, 10, 10)):
    paths = uneven_shards(tmp_path, list(sizes))
    data = open(paths[1], "rb").read()
    open(paths[1], "wb").write(data[: len(data) // 2 + 100])  # ends inside a member
    return paths


def test_corrupt_and_truncated_shards_are_counted_as_the_reader_reads_them(tmp_path):
    paths = _truncated(tmp_path)
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 50)
    with pytest.raises(tarfile.ReadError, match="truncated"):
        shards._count_headers(paths[1], Path(paths[1]).stat().st_size)
    n, errors = shard_count(paths[1])
    with pytest.warns(UserWarning, match="corrupt"):
        assert 0 < n < 10 and len(errors) >= 1 and n == sum(1 for _ in epoch_dataset(paths[1], 0, 1, 0, 0, 1, 8))
    n, errors = shard_count(str(tmp_path / "junk.tar"))
    assert n == 0 and len(errors) == 1


def test_skip_over_a_corrupt_shard_stays_exact_and_reports_it(tmp_path):
    paths = _truncated(tmp_path)
    (tmp_path / "s9-000000.tar").write_bytes(b"this is not a tar file" * 50)
    urls = "::".join(paths + [str(tmp_path / "s9-000000.tar")])
    with pytest.warns(UserWarning, match="corrupt"):
        b0 = epoch_lengths(urls, 0, 1, 3, 1)[0]
        ref = list(islice(train_batches(urls, 0, 1, 0, 3, 4), 2 * b0 + 1))
        counter = CorruptShards()
        got = list(islice(train_batches(urls, 0, 1, 0, 3, 4, skip=b0 + 1, on_corrupt=counter), b0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ref[b0 + 1:], got))
    assert counter.count >= 2  # the skipped epoch's corrupt shards were reported, as a replay reports them
    with pytest.raises(DataError, match="on_corrupt=fail"):
        next(train_batches(urls, 0, 1, 0, 3, 4, skip=b0 + 1, on_corrupt=CorruptShards(fail=True)))


def test_shards_at_uris_resume_by_their_counts(tmp_path):
    paths = uneven_shards(tmp_path, [6, 9, 4])
    remote = "::".join(f"file://{p}" for p in paths)  # read through pyarrow's filesystems, as s3:// is
    assert shard_count(f"file://{paths[0]}") == shard_count(paths[0])
    ref = list(islice(train_batches("::".join(paths), 0, 1, 0, 2, 4), 12))
    got = list(islice(train_batches(remote, 0, 1, 0, 2, 4, skip=7), 5))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ref[7:], got))


def test_shuffle_is_shard_local_and_changes_with_epoch(tmp_path):
    paths = uneven_shards(tmp_path, [12, 12])
    first = [x for x, _ in epoch_dataset("::".join(paths), 0, 1, 0, 0, 1, 4)]
    again = [x for x, _ in epoch_dataset("::".join(paths), 0, 1, 0, 0, 1, 4)]
    later = [x for x, _ in epoch_dataset("::".join(paths), 0, 1, 1, 0, 1, 4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, later))
    one = [[x for x, _ in epoch_dataset(paths[0], 0, 1, e, 0, 1, 4)] for e in (0, 1)]
    assert not all(torch.equal(a, b) for a, b in zip(*one))  # a shard's own order changes with the epoch too
    by_shard = [{tuple(x.flatten().tolist()) for x, _ in epoch_dataset(p, 0, 1, 0, 0, 1, 4)} for p in paths]
    halves = [{tuple(x.flatten().tolist()) for x in first[:12]}, {tuple(x.flatten().tolist()) for x in first[12:]}]
    assert sorted(map(sorted, halves)) == sorted(map(sorted, by_shard))  # no sample crosses its shard's span
