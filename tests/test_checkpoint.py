"""Safetensors checkpoints: round trip, atomic writes, and one-line errors for everything else."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from vaetool.checkpoint import load_model, resolve_checkpoint, save_model, read_metadata, FORMAT_VERSION
from vaetool.config import ModelConfig, TrainConfig
from vaetool.errors import CheckpointError, OutputError
from vaetool.models.vector import VAE


@pytest.fixture
def model():
    torch.manual_seed(0)
    return VAE(ModelConfig(image_size=16, latent_dim=4, widths=(8, 16), likelihood="laplace"))


def test_round_trip_keeps_weights_config_and_outputs(tmp_path, model):
    path = save_model(tmp_path / "m.safetensors", model, train_config=TrainConfig(steps=3), training={"step": 3})
    loaded = load_model(path)
    assert loaded.config == model.config
    assert loaded.train_config == TrainConfig(steps=3)
    assert loaded.training == {"step": 3}
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), k
    x = torch.rand(2, 3, 16, 16)
    model.eval()
    torch.testing.assert_close(model.reconstruct(x), loaded.model.reconstruct(x))
    assert loaded.identity == load_model(path).identity


def test_run_folder_resolves_to_model_file(tmp_path, model):
    save_model(tmp_path / "model.safetensors", model)
    assert resolve_checkpoint(tmp_path) == tmp_path / "model.safetensors"
    with pytest.raises(CheckpointError, match="without model.safetensors"):
        resolve_checkpoint(tmp_path / "nope" if (tmp_path / "nope").mkdir() is None else tmp_path)


def test_no_overwrite_without_force_and_no_temp_left(tmp_path, model):
    path = save_model(tmp_path / "m.safetensors", model)
    with pytest.raises(OutputError, match="already exists"):
        save_model(path, model, force=False)
    save_model(path, model, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def _bad_files(tmp_path, model):
    files = {}
    files["random"] = tmp_path / "random.safetensors"
    files["random"].write_bytes(bytes(range(256)) * 4)
    files["empty"] = tmp_path / "empty.safetensors"
    files["empty"].write_bytes(b"")
    good = save_model(tmp_path / "good.safetensors", model)
    files["truncated"] = tmp_path / "truncated.safetensors"
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["foreign"] = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(files["foreign"]), metadata={"producer": "someone else"})
    files["pickle"] = tmp_path / "model.pt"
    files["pickle"].write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    files["zip_pickle"] = tmp_path / "model2.pt"
    torch.save({"w": torch.zeros(2)}, files["zip_pickle"])
    return files


@pytest.mark.parametrize("kind,message", [("random", "not a readable safetensors"), ("empty", "is empty"),
                                          ("truncated", "not a readable safetensors"),
                                          ("foreign", "not a vaetool checkpoint"), ("pickle", "pickle"),
                                          ("zip_pickle", "pickle")])
def test_bad_checkpoints_give_one_line_errors(tmp_path, model, kind, message):
    path = _bad_files(tmp_path, model)[kind]
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_wrong_shape_and_future_version(tmp_path, model):
    good = save_model(tmp_path / "good.safetensors", model)
    metadata = read_metadata(good)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["decoder.out.weight"] = torch.zeros(1, 1, 1, 1)
    save_file(state, str(tmp_path / "shape.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(tmp_path / "shape.safetensors")
    future = dict(metadata, format_version=str(FORMAT_VERSION + 1))
    save_file(model.state_dict(), str(tmp_path / "future.safetensors"), metadata=future)
    with pytest.raises(CheckpointError, match="newer than this vaetool"):
        load_model(tmp_path / "future.safetensors")
    assert json.loads(metadata["model_config"])["likelihood"] == "laplace"


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")


def test_atomic_outputs_get_the_usual_file_mode_not_a_private_one(tmp_path):
    import os

    from vaetool.io.atomic import atomic_write_bytes, file_mode

    mask = os.umask(0o022)
    os.umask(mask)
    target = atomic_write_bytes(tmp_path / "out.bin", b"data")
    assert file_mode() == 0o666 & ~mask
    assert target.stat().st_mode & 0o777 == file_mode()  # not mkstemp's 0600
