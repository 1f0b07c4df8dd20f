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


# --- sampling a latent checkpoint: render decodes through the VAE recorded in its meta ---

LATENT_SIDE = 4  # the tiny VAE has 2 blocks: one 2x downsampling, so images are 8x8


def _latent_ckpt(path, vae_dir, shift=0.5):
    from dtrain.checkpoint import write_inference_files
    from dtrain.config import load_config
    from dtrain.models import build_model

    cfg = load_config(None, ["model.size=tiny", "model.in_channels=4", f"model.image_size={LATENT_SIDE}",
                             "model.patch_size=2", "sample.steps=2", "sample.per_class=2"])
    torch.manual_seed(0)
    net = build_model(cfg.model)
    for p in net.parameters():  # random weights: the zero-initialised output layer would give plain noise
        p.data.add_(0.1 * torch.randn_like(p))
    meta = {"step": 1, "latents": {"vae_dir": str(vae_dir), "scaling_factor": 0.18215, "shift_factor": shift}}
    write_inference_files(path, net.state_dict(), cfg, meta)
    return path


def test_render_decodes_a_latent_checkpoint_through_its_vae(tiny_vae, tmp_path):
    from dtrain.checkpoint import load_model, read_meta
    from dtrain.data.latents import load_vae
    from dtrain.generation import image_shape, render

    ckpt = _latent_ckpt(tmp_path / "ckpt", tiny_vae)
    net, cfg = load_model(ckpt)
    meta = read_meta(ckpt)
    labels, seeds = torch.tensor([0, 3, 7]), [0, 1, 2]
    x = render(net, cfg, meta, labels, seeds, steps=2, guidance=2.0)
    assert image_shape(cfg, meta) == (3, 2 * LATENT_SIDE, 2 * LATENT_SIDE)
    assert x.shape == (3, 3, 2 * LATENT_SIDE, 2 * LATENT_SIDE) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0

    # the same latents decoded by hand: z / scale + shift, the inverse of the encoder's (mean - shift) * scale
    z = render(net, cfg, {"step": 1}, labels, seeds, steps=2, guidance=2.0)
    assert z.shape == (3, 4, LATENT_SIDE, LATENT_SIDE)
    with torch.no_grad():
        ref = load_vae(tiny_vae).decode(z / 0.18215 + 0.5).sample.clamp(-1, 1)
    assert torch.allclose(x, ref, atol=1e-5)


def test_cli_sample_writes_decoded_images_of_the_vae_size(tiny_vae, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from dtrain.cli import main

    ckpt = _latent_ckpt(tmp_path / "ckpt", tiny_vae)
    out = tmp_path / "s.png"
    r = CliRunner().invoke(main, ["sample", str(ckpt), "--out", str(out), "--classes", "0,1,2", "--per-class", "2",
                                  "--precision", "fp32"])
    assert r.exit_code == 0, r.output
    img = Image.open(out)
    side = 2 * LATENT_SIDE  # 8 px images, 1 px padding, upscaled 4x: 3 rows, 2 columns
    assert img.mode == "RGB" and img.size == (4 * (2 * (side + 1) + 1), 4 * (3 * (side + 1) + 1))
    assert "4 network evaluations per image" in r.output  # 2 steps x 2 (guidance)


def test_a_missing_vae_directory_is_a_clear_error(tiny_vae, tmp_path):
    from click.testing import CliRunner

    from dtrain.checkpoint import CheckpointError, load_model, read_meta
    from dtrain.cli import main
    from dtrain.generation import image_shape, render

    ckpt = _latent_ckpt(tmp_path / "ckpt", tmp_path / "gone")
    net, cfg = load_model(ckpt)
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'gone'}.*missing"):
        render(net, cfg, read_meta(ckpt), torch.tensor([0]), [0], steps=1, guidance=1.0)
    with pytest.raises(CheckpointError, match="gone"):
        image_shape(cfg, read_meta(ckpt))
    r = CliRunner().invoke(main, ["sample", str(ckpt), "--out", str(tmp_path / "s.png"), "--precision", "fp32"])
    assert r.exit_code == 2 and "gone" in r.output and not (tmp_path / "s.png").exists()


def test_latents_meta_reads_latents_json_next_to_the_shards(tmp_path):
    from dtrain.data.latents import latents_meta

    write_shards([(np.zeros((8, 8, 3), np.uint8), 0)], str(tmp_path / "a-%06d.tar"), per_shard=1)
    assert latents_meta(f"{tmp_path}/a-000000.tar") is None  # image shards
    (tmp_path / "latents.json").write_text(json.dumps({"vae_dir": "/v", "scaling_factor": 0.13, "shift_factor": None,
                                                       "shape": [4, 2, 2], "count": 1, "shards": ["a-000000.tar"]}))
    assert latents_meta(f"{tmp_path}/a-{{000000..000000}}.tar") == {"vae_dir": "/v", "scaling_factor": 0.13,
                                                                     "shift_factor": 0.0}
