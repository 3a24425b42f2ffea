"""The FID Inception network (torch-fidelity's port of the TensorFlow graph FID was defined with), local weights only.

torch-fidelity (and torchmetrics, which uses it) downloads the weights on first use; here they must be a local file,
so an evaluation never touches the network and says exactly which file is missing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dalle_core.errors import CheckpointError
from dalle_core.extras import require_extra
from dalle_eval.weights import require_weights

FID_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
FID_INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{FID_INCEPTION_FILE}"
FID_INCEPTION_HINT = (
    f"download {FID_INCEPTION_FILE} (the FID Inception of torch-fidelity and torchmetrics, 91 MB) from "
    f"{FID_INCEPTION_URL} on a machine with internet, copy it here and pass its path (--inception-weights)"
)


class FidInception:
    """``float[B, 3, H, W]`` in [0, 1] -> the 2048 pool features ``float32[B, 2048]`` of the FID Inception.

    Images are rounded to 8 bits first (as a saved PNG would be) and resized to 299 px inside the network, exactly as
    torch-fidelity does for the reference statistics published with FID.
    """

    def __init__(self, network: torch.nn.Module, device: torch.device | str = "cpu") -> None:
        self.network = network.to(device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        (features,) = self.network(pixels.to(self.device))
        return features


def load_fid_inception(weights: str | Path | None, device: torch.device | str = "cpu") -> FidInception:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` from the local file ``weights`` (needs the metrics extra)."""
    path = require_weights(weights, "FID Inception", FID_INCEPTION_HINT)
    fidelity = require_extra("torch_fidelity.feature_extractor_inceptionv3", "dalle-eval", "metrics")
    # torch-fidelity unpickles the file without restriction; loading it restricted first means a file that would run
    # code (or is not a state dict at all) is refused before that.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path} is not a PyTorch state dict file: {str(error).splitlines()[0]}") from None
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise CheckpointError(f"{path} does not hold the FID Inception weights (no fc.weight); {FID_INCEPTION_HINT}")
    network = fidelity.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
    )
    return FidInception(network, device)
