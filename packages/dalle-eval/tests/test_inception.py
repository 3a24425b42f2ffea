from __future__ import annotations

import sys

import pytest
import torch

from dalle_core.errors import CheckpointError, MissingExtraError
from dalle_eval.inception import FID_INCEPTION_FILE, FID_INCEPTION_URL, load_fid_inception
from dalle_eval.weights import MissingWeightsError


def test_missing_weights_say_which_file_and_where_to_get_it(tmp_path):
    with pytest.raises(MissingWeightsError) as error:
        load_fid_inception(tmp_path / FID_INCEPTION_FILE)
    message = str(error.value)
    assert str(tmp_path / FID_INCEPTION_FILE) in message and FID_INCEPTION_URL in message
    with pytest.raises(MissingWeightsError, match="no weights file given"):
        load_fid_inception(None)


def test_without_the_metrics_extra_the_error_names_the_install_command(tmp_path, monkeypatch):
    weights = tmp_path / FID_INCEPTION_FILE
    torch.save({}, weights)
    for name in ("torch_fidelity", "torch_fidelity.feature_extractor_inceptionv3"):
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed, whether or not it is
    with pytest.raises(MissingExtraError, match=r"'torch_fidelity' is not installed.*'dalle-eval\[metrics\]'"):
        load_fid_inception(weights)


def test_random_weight_inception_from_a_local_file(tmp_path):
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")

    class KeepRandomInit(fidelity.FeatureExtractorInceptionV3):
        """Builds the real architecture and keeps its random initialisation (to write a weights file offline)."""

        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    state = KeepRandomInit("random", ["2048"], feature_extractor_weights_path=str(empty)).state_dict()
    weights = tmp_path / FID_INCEPTION_FILE
    torch.save(state, weights)

    extractor = load_fid_inception(weights)
    images = torch.rand(2, 3, 32, 32)
    features = extractor(images)
    assert features.shape == (2, 2048) and bool(torch.isfinite(features).all())
    # The weights really are the file's: the network's parameters equal it, and 8-bit input goes in unchanged.
    assert torch.equal(extractor.network.state_dict()["fc.weight"], state["fc.weight"])
    with torch.no_grad():
        (direct,) = extractor.network((images * 255).round().to(torch.uint8))
    assert torch.equal(features, direct)

    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="does not hold the FID Inception weights"):
        load_fid_inception(tmp_path / "other.pth")
