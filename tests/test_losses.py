"""Tokenizer losses: reconstruction, LPIPS-VGG from a local file, PatchGAN, hinge, single-backward GAN loss."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from models.config import ConfigError
from models.tokenizer.losses import (
    LPIPS, LossConfig, PatchDiscriminator, TokenizerGANLoss, adaptive_gan_weight, hinge_d_loss, hinge_g_loss,
    reconstruction_loss,
)

LPIPS_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # the lpips package's vgg16 slices


def _random_lpips_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random VGG16 features (torchvision naming) + non-negative heads (lpips package naming)."""
    torch.manual_seed(seed)
    reference = LPIPS()
    state = {k: v.clone() for k, v in reference.features.state_dict().items()}
    state = {f"features.{k}": v for k, v in state.items()}
    for i, head in enumerate(reference.heads):
        state[f"lin{i}.model.1.weight"] = torch.rand_like(head.weight)
    return state


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = _random_lpips_state()
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.safetensors"
    save_file(state, str(path))
    return path, state


@pytest.fixture(scope="module")
def lpips(lpips_file) -> LPIPS:
    return LPIPS.from_file(lpips_file[0])


def _pair(size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, size, size, generator=g) * 2 - 1, torch.rand(2, 3, size, size, generator=g) * 2 - 1


def _reference_lpips(state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS written the lpips package's way: vgg slices, normalize_tensor, spatial_average, lin layers."""
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["D"])
    features.load_state_dict({k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")})
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    hx, hy = (x - shift) / scale, (y - shift) / scale
    total = 0.0
    for k, (start, stop) in enumerate(LPIPS_SLICES):
        block = features[start:stop]
        hx, hy = block(hx), block(hy)
        nx = hx / (torch.sqrt(torch.sum(hx ** 2, dim=1, keepdim=True)) + 1e-10)
        ny = hy / (torch.sqrt(torch.sum(hy ** 2, dim=1, keepdim=True)) + 1e-10)
        total = total + F.conv2d((nx - ny) ** 2, state[f"lin{k}.model.1.weight"]).mean(dim=[2, 3], keepdim=True)
    return total.flatten()


def test_reconstruction_losses():
    x = torch.zeros(1, 3, 2, 2)
    y = torch.full((1, 3, 2, 2), 0.5)
    y[0, 0, 0, 0] = -1.5
    assert reconstruction_loss(x, y, "l1").item() == pytest.approx((11 * 0.5 + 1.5) / 12)
    assert reconstruction_loss(x, y, "l2").item() == pytest.approx((11 * 0.25 + 2.25) / 12)
    with pytest.raises(ValueError, match="l1"):
        reconstruction_loss(x, y, "huber")


def test_lpips_loads_from_file_and_matches_reference_formula(lpips, lpips_file):
    _, state = lpips_file
    x, y = _pair()
    with torch.no_grad():
        distance = lpips(x, y)
        expected = _reference_lpips(state, x, y)
    assert distance.shape == (2,)
    torch.testing.assert_close(distance, expected, rtol=1e-4, atol=1e-6)
    assert not any(p.requires_grad for p in lpips.parameters()) and not lpips.train().training


def test_lpips_distance_properties(lpips):
    x, y = _pair(seed=1)
    with torch.no_grad():
        assert torch.equal(lpips(x, x), torch.zeros(2))
        forward, backward = lpips(x, y), lpips(y, x)
    torch.testing.assert_close(forward, backward)
    assert (forward > 0).all()
    rec = y.clone().requires_grad_(True)
    lpips(x, rec).sum().backward()
    assert rec.grad is not None and rec.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())


def test_lpips_accepts_lpips_package_naming_in_a_pt_file(tmp_path, lpips_file, lpips):
    _, state = lpips_file
    renamed = {"scaling_layer.shift": torch.zeros(1, 3, 1, 1), "scaling_layer.scale": torch.ones(1, 3, 1, 1)}
    for key, value in state.items():
        if key.startswith("features."):
            index = int(key.split(".")[1])
            k = next(i for i, (start, stop) in enumerate(LPIPS_SLICES) if start <= index < stop)
            renamed[f"net.slice{k + 1}.{key.removeprefix('features.')}"] = value
        else:
            renamed[key.replace("lin", "lins.", 1)] = value  # lins.K.model.1.weight
    torch.save(renamed, tmp_path / "lpips.pth")
    loaded = LPIPS.from_file(tmp_path / "lpips.pth")
    for (name, mine), theirs in zip(loaded.state_dict().items(), lpips.state_dict().values()):
        assert torch.equal(mine, theirs), name


def test_lpips_file_errors(tmp_path, lpips_file):
    with pytest.raises(FileNotFoundError, match=r"loss\.lpips_weights"):
        LPIPS.from_file("")
    with pytest.raises(FileNotFoundError, match="cfg.perceptual"):
        LPIPS.from_file(tmp_path / "none.safetensors", key_path="cfg.perceptual")
    _, state = lpips_file
    save_file({k: v for k, v in state.items() if not k.startswith("lin4")}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="heads.4.weight"):
        LPIPS.from_file(tmp_path / "partial.safetensors")
    negative = dict(state, **{"lin0.model.1.weight": -state["lin0.model.1.weight"]})
    save_file(negative, str(tmp_path / "negative.safetensors"))
    with pytest.raises(ValueError, match="non-negative"):
        LPIPS.from_file(tmp_path / "negative.safetensors")


@pytest.mark.parametrize("size,layers,side", [(256, 3, 30), (64, 3, 6), (64, 2, 14)])
def test_patch_discriminator_shapes(size, layers, side):
    disc = PatchDiscriminator(ndf=8, n_layers=layers)
    assert disc(torch.randn(2, 3, size, size)).shape == (2, 1, side, side)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in disc.modules())


def test_patch_discriminator_is_per_sample():
    disc = PatchDiscriminator(ndf=8, n_layers=2)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(disc(x)[:2], disc(x[:2]))  # no batch statistics: real/fake can share a pass


def test_hinge_losses_hand_values():
    real = torch.tensor([2.0, 0.5, -1.0, 1.0])
    fake = torch.tensor([-2.0, 0.0, 0.5, -0.5])
    # relu(1 - real) = [0, .5, 2, 0] -> .625 ; relu(1 + fake) = [0, 1, 1.5, .5] -> .75
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.625 + 0.75))
    assert hinge_g_loss(fake).item() == pytest.approx(0.5)


def test_adaptive_gan_weight_hand_value():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    rec, g = (w ** 2).sum(), (3 * w).sum()                   # grads [2, 4] and [3, 3]
    expected = math.sqrt(20) / (math.sqrt(18) + 1e-4)
    weight = adaptive_gan_weight(rec, g, w)
    assert weight.item() == pytest.approx(expected, rel=1e-6) and not weight.requires_grad
    assert adaptive_gan_weight(rec, g, w, max=0.5).item() == pytest.approx(0.5)


def test_loss_config_validation():
    assert LossConfig.from_dict({"rec": "l2", "disc_start": 5}).disc_start == 5
    with pytest.raises(ConfigError, match="loss.rec"):
        LossConfig.from_dict({"rec": "l3"})
    with pytest.raises(ConfigError, match="loss.lpips_weights"):
        LossConfig.from_dict({"lpips_weight": 1.0})
    with pytest.raises(ConfigError, match="disc_start"):
        LossConfig.from_dict({"disc_start": -1})


class _Generator(nn.Module):
    """A stand-in tokenizer: one conv producing the reconstruction (its weight is the 'last layer')."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x))


def _setup(lpips: LPIPS | None = None, **overrides) -> tuple[_Generator, TokenizerGANLoss, torch.Tensor]:
    torch.manual_seed(0)
    values = {"disc_start": 10, "disc_ndf": 8, "disc_layers": 2, "gan_weight": 0.5, **overrides}
    cfg = LossConfig.from_dict(values)
    return _Generator(), TokenizerGANLoss(cfg, lpips=lpips), torch.rand(2, 3, 32, 32) * 2 - 1


def test_gan_loss_before_disc_start_never_runs_the_discriminator():
    generator, loss_fn, images = _setup()
    calls = []
    loss_fn.discriminator.register_forward_hook(lambda *_: calls.append(1))
    total, logs = loss_fn(images, generator(images), step=9)
    total.backward()
    assert calls == [] and set(logs) == {"rec", "total"}
    assert all(p.grad is None for p in loss_fn.discriminator_parameters())
    assert generator.conv.weight.grad is not None
    torch.testing.assert_close(total, reconstruction_loss(images, generator(images), "l1"))


def test_gan_loss_one_backward_trains_both_without_leaking():
    generator, loss_fn, images = _setup()
    calls = []
    loss_fn.discriminator.register_forward_hook(lambda *_: calls.append(1))
    rec = generator(images)
    total, logs = loss_fn(images, rec, step=10)
    total.backward()
    assert len(calls) == 2  # G's detached functional call + one batched D pass over real and fake
    d_grads = [p.grad.clone() for p in loss_fn.discriminator_parameters()]
    g_grad = generator.conv.weight.grad.clone()
    assert sum(g.abs().sum() for g in d_grads) > 0 and g_grad.abs().sum() > 0

    # D's gradient is the gradient of the D hinge loss alone ...
    disc = copy.deepcopy(loss_fn.discriminator)
    d_only = hinge_d_loss(disc(images), disc(rec.detach()))
    expected_d = torch.autograd.grad(d_only, list(disc.parameters()))
    for got, want in zip(d_grads, expected_d):
        torch.testing.assert_close(got, want)
    # ... and G's gradient that of rec + gan_weight * hinge_g alone (the D loss does not reach G)
    generator.zero_grad()
    rec2 = generator(images)
    g_only = reconstruction_loss(images, rec2, "l1") + 0.5 * hinge_g_loss(disc(rec2))
    torch.testing.assert_close(torch.autograd.grad(g_only, generator.conv.weight)[0], g_grad)
    torch.testing.assert_close(logs["gan_d"], d_only.detach())


def test_gan_loss_adaptive_weight_uses_last_layer():
    generator, loss_fn, images = _setup(adaptive_gan_weight=True, disc_start=0)
    rec = generator(images)
    with pytest.raises(ValueError, match="last_layer"):
        loss_fn(images, rec, step=0)
    total, logs = loss_fn(images, rec, step=0, last_layer=generator.conv.weight)
    frozen = copy.deepcopy(loss_fn.discriminator).requires_grad_(False)
    expected = 0.5 * adaptive_gan_weight(reconstruction_loss(images, rec, "l1"),
                                         hinge_g_loss(frozen(rec)), generator.conv.weight)
    torch.testing.assert_close(logs["gan_weight"], expected)
    total.backward()
    assert generator.conv.weight.grad is not None


def test_gan_loss_keeps_lpips_out_of_state_and_optimizer(lpips_file):
    generator, loss_fn, images = _setup(lpips_weight=1.0, lpips_weights=str(lpips_file[0]), disc_start=0)
    assert isinstance(loss_fn.lpips, LPIPS)
    assert all(k.startswith("discriminator.") for k in loss_fn.state_dict())
    assert sum(p.numel() for p in loss_fn.parameters()) == sum(p.numel() for p in loss_fn.discriminator_parameters())
    total, logs = loss_fn(images, generator(images), step=0)
    assert logs["lpips"] > 0 and "gan_g" in logs
    loss_fn.to(torch.float64)
    assert loss_fn.lpips.heads[0].weight.dtype == torch.float64
    assert next(loss_fn.discriminator_parameters()).dtype == torch.float64
