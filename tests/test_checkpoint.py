
import pytest
import torch

from dtrain.checkpoint import (CONFIG_FILE, META_FILE, WEIGHTS_FILE, CheckpointError, load_model, read_meta,
                               resolve, write_inference_files)
from dtrain.config import load_config
from dtrain.models import build_model


def make_ckpt(path, step=1, **over):
    cfg = load_config(None, ["model.size=tiny", "model.image_size=8", *[f"{k}={v}" for k, v in over.items()]])
    torch.manual_seed(step)
    net = build_model(cfg.model)
    for p in net.parameters():
        p.data.add_(torch.randn_like(p))
    write_inference_files(path, net.state_dict(), cfg, {"step": step})
    return net, cfg


def test_round_trip_rebuilds_the_model_from_the_checkpoint_alone(tmp_path):
    net, cfg = make_ckpt(tmp_path / "c")
    loaded, cfg2 = load_model(tmp_path / "c")
    assert cfg2 == cfg and not loaded.training
    for (k, a), b in zip(net.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert not list((tmp_path / "c").glob(".*tmp"))  # no temporary files left behind
    assert "!!python" not in (tmp_path / "c" / CONFIG_FILE).read_text()  # plain YAML, no pickled objects


def test_run_directory_resolves_to_newest_complete_checkpoint(tmp_path):
    make_ckpt(tmp_path / "checkpoint_00000010", step=10)
    make_ckpt(tmp_path / "checkpoint_00000020", step=20)
    (tmp_path / "checkpoint_00000030").mkdir()  # a save that crashed: no files
    (tmp_path / "checkpoint_00000030" / CONFIG_FILE).write_text("model: {}\n")
    assert resolve(tmp_path).name == "checkpoint_00000020"
    assert read_meta(tmp_path)["step"] == 20


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / WEIGHTS_FILE).write_bytes(b"\x00" * 10), "not a readable safetensors"),
    (lambda d: (d / CONFIG_FILE).write_text("model:\n  hiden_size: 3\n"), "hiden_size"),
    (lambda d: (d / META_FILE).unlink(), "no complete checkpoint"),
])
def test_damaged_checkpoints_get_errors_naming_the_problem(tmp_path, damage, message):
    make_ckpt(tmp_path / "c")
    damage(tmp_path / "c")
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "c")


def test_weights_of_another_architecture_are_rejected(tmp_path):
    make_ckpt(tmp_path / "c")
    cfg_text = (tmp_path / "c" / CONFIG_FILE).read_text().replace("size: tiny", "size: mini")
    (tmp_path / "c" / CONFIG_FILE).write_text(cfg_text)
    with pytest.raises(CheckpointError, match="do not match dit/mini"):
        load_model(tmp_path / "c")


def test_missing_path():
    with pytest.raises(CheckpointError, match="no such"):
        resolve("/nonexistent/run")


def test_cli_sample_writes_a_grid_png(tmp_path):
    import subprocess
    import sys

    from PIL import Image

    make_ckpt(tmp_path / "c")
    out = tmp_path / "grid.png"
    r = subprocess.run([sys.executable, "-m", "dtrain.cli", "sample", str(tmp_path / "c"), "--out", str(out),
                        "--classes", "1,4", "--per-class", "3", "--steps", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    img = Image.open(out)
    assert img.size == ((3 * 9 + 1) * 4, (2 * 9 + 1) * 4)  # 3 columns x 2 rows of 8px cells, pad 1, x4
    bad = subprocess.run([sys.executable, "-m", "dtrain.cli", "sample", str(tmp_path / "c"), "--classes", "12"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "outside 0..9" in bad.stderr


def test_export_is_one_self_describing_file_that_loads_like_the_checkpoint(tmp_path):
    from dtrain.checkpoint import export

    net, cfg = make_ckpt(tmp_path / "run" / "checkpoint_00000005", step=5)
    out = export(tmp_path / "run", tmp_path / "model.safetensors")
    assert read_meta(out)["step"] == 5
    loaded, cfg2 = load_model(out)
    assert cfg2 == cfg
    for a, b in zip(net.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_plain_safetensors_without_our_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not exported by `dtrain export`"):
        load_model(tmp_path / "other.safetensors")
