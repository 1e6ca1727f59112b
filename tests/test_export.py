"""``maskkit export``: a run's encoder loads into timm (and transformers, where installed) and
gives the same features as maskkit's own encoder; mistakes end in one line, exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import timm
import torch
from helpers import MASKKIT_CLI

from maskkit.checkpoint import load_checkpoint
from maskkit.config import load_run_config
from maskkit.data import load_dataset
from maskkit.export.hf_format import hf_state_dict
from maskkit.models import MaskedAutoencoderViT


def maskkit(*args: object) -> subprocess.CompletedProcess:
    environment = {**os.environ, "COLUMNS": "80"}
    return subprocess.run(
        [*MASKKIT_CLI, *map(str, args)], capture_output=True, text=True, env=environment, timeout=600
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_dir) -> Path:
    """A smoke-preset run: pretrained (step 8) and fine-tuned (step 10)."""
    run_dir = tmp_path_factory.mktemp("runs") / "random"
    result = maskkit(
        "train", "--policy", "random", "--preset", "smoke", "--data-dir", data_dir, "--run-dir", run_dir
    )
    assert result.returncode == 0, result.stderr + result.stdout
    return run_dir


def maskkit_encoder(run_dir: Path, checkpoint: str) -> MaskedAutoencoderViT:
    """The run's MAE at ``checkpoint``, as maskkit itself builds it, in eval mode."""
    mae = MaskedAutoencoderViT(load_run_config(run_dir / "config.yaml").model)
    load_checkpoint(run_dir / "checkpoints", checkpoint).load_into({"mae": mae})
    return mae.eval()


def images(mae: MaskedAutoencoderViT, count: int = 4) -> torch.Tensor:
    """``[count, C, S, S]`` normalised-looking inputs."""
    size, channels = mae.config.img_size, mae.config.in_chans
    return torch.randn(count, channels, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["pretrained", "final"])
def test_timm_loads_the_export_and_gives_the_same_features(trained_run, data_dir, tmp_path, checkpoint):
    out = tmp_path / "timm"
    result = maskkit("export", trained_run, "--format", "timm", "--out", out, "--checkpoint", checkpoint)
    assert result.returncode == 0, result.stderr + result.stdout
    assert sorted(path.name for path in out.iterdir()) == ["config.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    mae = maskkit_encoder(trained_run, checkpoint)
    x = images(mae)
    with torch.no_grad():
        expected = mae.features(x)  # [B, D] CLS feature
        tokens = model.forward_features(x)  # [B, 1 + L, D]
        assert torch.allclose(tokens[:, 0], expected, atol=1e-6)
        assert torch.allclose(model(x), expected, atol=1e-6)  # no classifier: the pooled CLS feature
        assert torch.allclose(tokens, mae.encode(mae.embed(x)), atol=1e-6)
    # The run's normalisation travels with the weights.
    dataset = load_dataset("dermamnist", data_dir, image_size=mae.config.img_size)
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["mean"] == pytest.approx(list(dataset.mean))
    assert config["maskkit"]["checkpoint"] == checkpoint
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == (3, 32, 32)


@pytest.mark.slow
def test_transformers_loads_the_hf_export_and_gives_the_same_features(trained_run, tmp_path):
    transformers = pytest.importorskip("transformers", reason="the optional extra maskkit[hf]")
    out = tmp_path / "hf"
    result = maskkit("export", trained_run, "--format", "hf", "--out", out)
    assert result.returncode == 0, result.stderr + result.stdout
    model = transformers.ViTModel.from_pretrained(out, add_pooling_layer=False).eval()
    mae = maskkit_encoder(trained_run, "pretrained")
    x = images(mae)
    with torch.no_grad():
        hidden = model(pixel_values=x).last_hidden_state  # [B, 1 + L, D]
        assert torch.allclose(hidden[:, 0], mae.features(x), atol=1e-5)
        assert torch.allclose(hidden, mae.encode(mae.embed(x)), atol=1e-5)


@pytest.mark.slow
def test_hf_names_split_qkv_and_use_every_key(trained_run):
    """Without transformers: every encoder tensor gets exactly one name, qkv in three parts."""
    mae = maskkit_encoder(trained_run, "pretrained")
    weights = {k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}
    renamed = hf_state_dict(weights, mae.config.depth)
    qkv = weights["blocks.1.attn.qkv.weight"]  # [3D, D]
    dim = mae.config.embed_dim
    assert torch.equal(renamed["encoder.layer.1.attention.attention.key.weight"], qkv[dim : 2 * dim])
    assert sum(v.numel() for v in renamed.values()) == sum(v.numel() for v in weights.values())
    with pytest.raises(ValueError, match="no transformers name"):
        hf_state_dict({**weights, "extra.weight": qkv}, mae.config.depth)


@pytest.mark.slow
def test_the_default_output_is_inside_the_run_and_never_overwritten(trained_run, tmp_path):
    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    assert maskkit("export", run).returncode == 0
    out = run / "export" / "timm"
    assert (out / "model.safetensors").is_file()
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert_one_line_error(maskkit("export", run), f"--out {out} already holds files")
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert sorted(path.name for path in (run / "export").iterdir()) == ["timm"]  # no staging left


@pytest.mark.slow
def test_export_mistakes_are_one_line(trained_run, tmp_path):
    assert_one_line_error(maskkit("export", tmp_path / "nosuch"), "nosuch does not exist")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(trained_run / "config.yaml", unfinished / "config.yaml")  # started, no checkpoint yet
    assert_one_line_error(
        maskkit("export", unfinished), "has no finished encoder yet", f"maskkit train --resume {unfinished}"
    )
    assert_one_line_error(
        maskkit("export", trained_run, "--format", "tim", "--out", tmp_path / "x"),
        "unknown export format 'tim'. Did you mean 'timm'? Available: hf, timm.",
    )
    assert_one_line_error(
        maskkit("export", trained_run, "--checkpoint", "best", "--out", tmp_path / "x"), "unknown checkpoint"
    )
    assert not (tmp_path / "x").exists() and not list(unfinished.glob("export*"))
