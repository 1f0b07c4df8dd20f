import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds

from dtrain.data.shards import DataError, load_images, train_batches, write_shards


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_reader_returns_latents_as_stored(tmp_path):
    z = np.random.default_rng(0).normal(size=(3, 4, 2, 2)) * 5  # outside [-1, 1] on purpose
    with wds.TarWriter(str(tmp_path / "l-000000.tar")) as sink:
        for i, zi in enumerate(z):  # float64 and float16 on disk both come back float32
            sink.write({"__key__": f"{i:08d}", "latent.npy": _npy(zi.astype(np.float16 if i else np.float64)),
                        "cls": str(i).encode()})
    x, y = load_images(f"{tmp_path}/l-000000.tar")
    assert x.dtype == torch.float32 and x.shape == (3, 4, 2, 2) and y.tolist() == [0, 1, 2]
    assert torch.equal(x[0], torch.from_numpy(z[0]).float())
    assert torch.allclose(x[1:], torch.from_numpy(z[1:]).float(), rtol=1e-3)


def test_encode_names_bad_inputs_before_any_ray_work(tmp_path):
    from dtrain.data.latents import encode_shards

    write_shards([(np.zeros((8, 8, 3), np.uint8), 0)], str(tmp_path / "rgb-%06d.tar"), per_shard=1)
    urls = f"{tmp_path}/rgb-000000.tar"
    with pytest.raises(DataError, match="no config.json"):
        encode_shards(urls, tmp_path / "nope", tmp_path / "out")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"in_channels": 4}')
    with pytest.raises(DataError, match="3-channel images for a VAE that takes 4"):
        encode_shards(urls, tmp_path / "vae", tmp_path / "out")


@pytest.fixture
def tiny_vae(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


@pytest.mark.slow
def test_encode_shards_on_ray_matches_a_direct_encode(ray_cluster, tiny_vae, tmp_path):
    from dtrain.data.digits import write_digits
    from dtrain.data.latents import encode_shards, load_vae

    src = write_digits(tmp_path / "img", image_size=16, train_shards=2)["train"]
    urls = f"{tmp_path}/img/train-{{000000..000001}}.tar"
    out = encode_shards(urls, tiny_vae, tmp_path / "lat", batch_size=128)
    keys = lambda p: [s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList([p]), wds.tarfile_to_samples())]
    assert [p.rsplit("/", 1)[1] for p in out] == [p.rsplit("/", 1)[1] for p in src]  # shard names kept
    assert [keys(p) for p in out] == [keys(p) for p in src]  # keys and their order kept

    x, y = load_images(urls)  # [N, 1, 16, 16] in [-1, 1], in shard order
    z, yz = load_images(f"{tmp_path}/lat/train-{{000000..000001}}.tar")
    assert z.shape == (len(x), 4, 8, 8) and torch.equal(yz, y)  # 16 / 2**(2 blocks - 1) = 8
    vae = load_vae(tiny_vae)
    with torch.no_grad():
        ref = vae.encode(x.expand(-1, 3, -1, -1)).latent_dist.mean * vae.config.scaling_factor
    assert torch.allclose(z, ref, atol=1e-5)

    info = json.loads((tmp_path / "lat" / "latents.json").read_text())
    assert info["shape"] == [4, 8, 8] and info["count"] == len(x) and info["scaling_factor"] == pytest.approx(0.18215)

    xb, yb = next(train_batches(f"{tmp_path}/lat/train-{{000000..000001}}.tar", 0, 2, 0, 16, 32))
    assert xb.shape == (16, 4, 8, 8) and xb.dtype == torch.float32 and yb.shape == (16,)
