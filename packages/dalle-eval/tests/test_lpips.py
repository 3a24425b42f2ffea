from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dalle_eval.perceptual import ALEXNET_FILE, CHANNELS, Lpips, load_lpips, lpips_distance
from dalle_eval.weights import MissingWeightsError

# torchvision's alexnet.features: (index, in, out, kernel, stride, padding) of each convolution.
_CONVS = [
    (0, 3, 64, 11, 4, 2),
    (3, 64, 192, 5, 1, 2),
    (6, 192, 384, 3, 1, 1),
    (8, 384, 256, 3, 1, 1),
    (10, 256, 256, 3, 1, 1),
]


def write_random_weights(directory, seed: int = 0):
    """Random weights in the two published formats: torchvision's AlexNet file and lpips' linear-layer file."""
    generator = torch.Generator().manual_seed(seed)
    trunk = {}
    for index, cin, cout, kernel, _, _ in _CONVS:
        trunk[f"features.{index}.weight"] = (
            torch.randn(cout, cin, kernel, kernel, generator=generator) / (cin * kernel**2) ** 0.5
        )
        trunk[f"features.{index}.bias"] = torch.randn(cout, generator=generator) * 0.1
    trunk["classifier.1.weight"] = torch.randn(4, 9216, generator=generator)  # present in the real file, unused
    linear = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator) for k, c in enumerate(CHANNELS)}
    torch.save(trunk, directory / ALEXNET_FILE)
    torch.save(linear, directory / "alex.pth")
    return directory / ALEXNET_FILE, directory / "alex.pth", trunk, linear


def naive_lpips(trunk, linear, a, b):
    """LPIPS from the paper's recipe, with functional calls on the raw weight dicts."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def layers(x):
        x = ((2 * x - 1) - shift) / scale
        outputs = []
        for n, (index, _, _, _, stride, padding) in enumerate(_CONVS):
            if n in (1, 2):  # max-pools before conv2 and conv3
                x = F.max_pool2d(x, kernel_size=3, stride=2)
            x = F.relu(F.conv2d(x, trunk[f"features.{index}.weight"], trunk[f"features.{index}.bias"], stride, padding))
            outputs.append(x)
        return outputs

    total = torch.zeros(a.shape[0])
    for k, (fa, fb) in enumerate(zip(layers(a), layers(b), strict=True)):
        na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        weights = linear[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)
        total += ((na - nb) ** 2 * weights).sum(1).mean(dim=(1, 2))
    return total


def test_lpips_matches_the_naive_computation(tmp_path):
    trunk_file, linear_file, trunk, linear = write_random_weights(tmp_path)
    model = load_lpips(trunk_file, linear_file)
    torch.manual_seed(0)
    a, b = torch.rand(3, 3, 40, 36), torch.rand(3, 3, 40, 36)
    got = lpips_distance(model, a, b, batch_size=2)
    assert torch.allclose(got, naive_lpips(trunk, linear, a, b), rtol=1e-5, atol=1e-7)
    assert torch.allclose(lpips_distance(model, a, a), torch.zeros(3))
    assert bool((got > 0).all())


@pytest.mark.filterwarnings("ignore:.*deprecated since 0.13:UserWarning")  # lpips calls torchvision's old API
def test_lpips_matches_the_lpips_package(tmp_path):
    lpips = pytest.importorskip("lpips")
    trunk_file, linear_file, trunk, _ = write_random_weights(tmp_path, seed=1)
    reference = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, model_path=str(linear_file), verbose=False)
    slices = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}  # features index -> lpips slice holding it (same index inside)
    state = {
        f"net.slice{slices[i]}.{i}.{kind}": trunk[f"features.{i}.{kind}"]
        for i, *_ in _CONVS
        for kind in ("weight", "bias")
    }
    missing, _ = reference.load_state_dict(state, strict=False)
    assert not [key for key in missing if key.startswith("net.")]
    torch.manual_seed(1)
    a, b = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(a, b, normalize=True).flatten()
    assert torch.allclose(lpips_distance(load_lpips(trunk_file, linear_file), a, b), expected, rtol=1e-5, atol=1e-7)


def test_the_linear_layers_default_to_the_file_inside_the_lpips_package(tmp_path):
    pytest.importorskip("lpips")
    trunk_file, *_ = write_random_weights(tmp_path)
    model = load_lpips(trunk_file)  # the published v0.1 linear weights: non-negative by construction
    assert all(float(layer.weight.min()) >= 0 for layer in model.linear)


def test_missing_weights_name_the_file(tmp_path):
    with pytest.raises(MissingWeightsError, match=f"not found at {tmp_path / ALEXNET_FILE}.*download.*{ALEXNET_FILE}"):
        load_lpips(tmp_path / ALEXNET_FILE, tmp_path / "alex.pth")
    trunk_file, *_ = write_random_weights(tmp_path)
    with pytest.raises(MissingWeightsError, match="LPIPS linear layers: weights file not found at .*nope.pth"):
        load_lpips(trunk_file, tmp_path / "nope.pth")


def test_small_images_are_refused():
    from dalle_core.errors import ShapeError

    with pytest.raises(ShapeError, match="at least 31x31"):
        Lpips()(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))
