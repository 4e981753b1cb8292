"""Reading checkpoints: zip files memory-mapped, legacy files whole, one clear error otherwise."""

import pytest
import torch

from conftest import tiny_model
from entityseg.models.checkpoint import load_weights, read_checkpoint


@pytest.mark.parametrize("zip_format", [True, False])
def test_both_torch_formats_load_the_same_weights(tmp_path, zip_format):
    source, target = tiny_model(), tiny_model(num_queries=8)
    target.load_state_dict({k: torch.zeros_like(v) for k, v in target.state_dict().items()})
    path = tmp_path / "net.pth"
    torch.save({"model": source.state_dict()}, path, _use_new_zipfile_serialization=zip_format)
    checkpoint = read_checkpoint(path)
    assert set(checkpoint["model"]) == set(source.state_dict())
    load_weights(target, path, checkpoint)
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name


def test_missing_and_non_dict_files_are_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.ckpt: checkpoint not found"):
        read_checkpoint(tmp_path / "nothing.ckpt")
    path = tmp_path / "list.pt"
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="list.pt: not a checkpoint"):
        read_checkpoint(path)
