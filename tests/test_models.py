"""Models: extractors, the growing classifier, the network. Tiny inputs, eval mode, CPU."""

from __future__ import annotations

import functools

import gin
import pytest
import torch
import torchvision
from torch import nn

import components  # noqa: F401  (registers every component with gin)
from components.models import (
    CausalNormClassifier,
    CosineLinear,
    GrowingLinear,
    MLPProjector,
    Network,
    SmallConvNet,
    TorchvisionBackbone,
)


def test_small_convnet_shapes():
    net = SmallConvNet(in_channels=1, width=4).eval()
    assert net.out_dim == 16
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 16)
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 16)
    rgb = SmallConvNet(in_channels=3, width=2).eval()
    assert rgb(torch.zeros(1, 3, 12, 12)).shape == (1, rgb.out_dim) == (1, 8)


def test_small_convnet_width_from_gin():
    gin.parse_config("SmallConvNet.width = 3")
    assert SmallConvNet().out_dim == 12


def test_gin_bindings_do_not_leak_between_tests():
    """conftest's autouse ``clear_gin`` is what keeps one test's bindings out of the next. The
    test makes its own binding and runs that fixture's teardown itself, so it checks the same
    thing whatever ran before it (it used to rely on the previous test's binding, and alone it
    passed without checking anything)."""
    from conftest import clear_gin

    gin.parse_config("SmallConvNet.width = 3")
    assert SmallConvNet().out_dim == 12  # the binding is live, as in a test that made it
    fixture = clear_gin.__wrapped__()  # the fixture's own code: up to its yield, then teardown
    next(fixture)
    with pytest.raises(StopIteration):
        next(fixture)
    assert SmallConvNet().out_dim == 4 * 32  # what the next test sees: the default width


def _layer1_size(backbone: TorchvisionBackbone, x: torch.Tensor) -> tuple[int, int]:
    sizes = []
    handle = backbone.model.layer1.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-2:]))
    with torch.no_grad():
        out = backbone(x)
    handle.remove()
    assert out.shape == (len(x), backbone.out_dim)
    return tuple(sizes[0])


def test_resnet18_cifar_stem():
    backbone = TorchvisionBackbone(torchvision.models.resnet18, cifar_stem=True).eval()
    assert backbone.out_dim == 512
    conv1 = backbone.model.conv1
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1) and conv1.padding == (1, 1)
    assert conv1.in_channels == 3 and conv1.bias is None
    assert isinstance(backbone.model.maxpool, nn.Identity)
    assert isinstance(backbone.model.fc, nn.Identity)
    # no down-sampling before layer1: it sees the full 16x16 input
    assert _layer1_size(backbone, torch.zeros(1, 3, 16, 16)) == (16, 16)


def test_resnet18_imagenet_stem_for_comparison():
    backbone = TorchvisionBackbone(torchvision.models.resnet18).eval()
    assert backbone.model.conv1.kernel_size == (7, 7) and backbone.model.conv1.stride == (2, 2)
    assert isinstance(backbone.model.maxpool, nn.MaxPool2d)
    assert _layer1_size(backbone, torch.zeros(1, 3, 16, 16)) == (4, 4)


def test_resnet18_grayscale_input():
    backbone = TorchvisionBackbone(torchvision.models.resnet18, cifar_stem=True, in_channels=1)
    backbone.eval()
    conv1 = backbone.model.conv1
    assert conv1.in_channels == 1 and conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
    assert _layer1_size(backbone, torch.zeros(2, 1, 8, 8)) == (8, 8)


def test_cifar_stem_rejects_non_resnets():
    with pytest.raises(ValueError, match="ResNet"):
        TorchvisionBackbone(torchvision.models.squeezenet1_0, cifar_stem=True)


def test_growing_linear_keeps_old_rows_and_outputs():
    torch.manual_seed(0)
    layer = GrowingLinear(4, 3)
    x = torch.randn(5, 4)
    old_w, old_b = layer.weight.detach().clone(), layer.bias.detach().clone()
    before = layer(x).detach()
    rows = torch.tensor([[3.0, 0.0, 0.0, 4.0], [0.0, -1.0, 0.0, 0.0]])
    assert layer.grow(2, rows) is layer
    assert layer.out_features == 5 and layer.weight.shape == (5, 4) and layer.bias.shape == (5,)
    assert torch.equal(layer.weight[:3], old_w) and torch.equal(layer.bias[:3], old_b)
    # old classes' outputs unchanged (up to GEMM blocking order for a wider matrix)
    assert torch.allclose(layer(x)[:, :3], before, rtol=0, atol=1e-6)
    # new rows: the directions of `rows`, scaled to the old rows' mean norm
    target_norm = old_w.norm(dim=1).mean()
    new = layer.weight[3:].detach()
    assert torch.allclose(new.norm(dim=1), target_norm.expand(2), rtol=1e-5)
    assert torch.allclose(nn.functional.normalize(new, dim=1),
                          nn.functional.normalize(rows, dim=1), atol=1e-6)
    assert torch.allclose(layer.bias[3:], old_b.mean().expand(2))
    # the grown tensors are the module's parameters (an optimizer built now trains them)
    assert {tuple(p.shape) for p in layer.parameters()} == {(5, 4), (5,)}


def test_growing_linear_default_init_and_errors():
    layer = GrowingLinear(3, 2)
    old = layer.weight.detach().clone()
    layer.grow(1)
    assert layer.out_features == 3 and torch.equal(layer.weight[:2], old)
    assert torch.isfinite(layer.weight).all() and layer.weight[2].abs().sum() > 0
    with pytest.raises(ValueError, match="k >= 1"):
        layer.grow(0)
    with pytest.raises(ValueError, match="shape"):
        layer.grow(2, torch.ones(2, 5))


def test_weight_aligning_scales_new_rows_to_the_old_mean_norm():
    """WA (Zhao et al. 2020): new rows that outgrew the old ones are scaled by
    mean ||w_old|| / mean ||w_new||, directions kept; an old-class sample the new rows took by
    their norm alone goes back to its class; old rows and the bias do not move."""
    layer = GrowingLinear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        layer.bias.zero_()
    layer.grow(1, torch.tensor([[1.0, 1.0]]))
    with torch.no_grad():
        layer.weight[2] *= 3.0  # what training on many pseudo-labels does to a new row
    old_rows, bias = layer.weight[:2].detach().clone(), layer.bias.detach().clone()
    x = torch.tensor([[1.0, 0.2]])  # class 0, nearer its row than the new row's direction
    assert layer(x).argmax(1).item() == 2  # taken by the new row's norm
    gamma = layer.align(2)
    assert gamma == pytest.approx(1 / 3)
    assert layer.weight[2].norm().item() == pytest.approx(old_rows.norm(dim=1).mean().item())
    assert torch.allclose(nn.functional.normalize(layer.weight[2], dim=0),
                          torch.tensor([1.0, 1.0]) / 2 ** 0.5)
    assert torch.equal(layer.weight[:2], old_rows) and torch.equal(layer.bias, bias)
    assert layer(x).argmax(1).item() == 0
    # new rows no larger than the old ones: nothing to correct
    with torch.no_grad():
        layer.weight[2] *= 0.5
    before = layer.weight.detach().clone()
    assert layer.align(2) == 1.0 and torch.equal(layer.weight, before)
    with pytest.raises(ValueError, match="n_old"):
        layer.align(3)
    with pytest.raises(ValueError, match="changes nothing"):
        CosineLinear(2, 3).align(2)


@pytest.mark.parametrize("head", [GrowingLinear, CosineLinear, CausalNormClassifier])
def test_keeping_outputs_leaves_the_kept_logits_as_they_were(head):
    """What the promotion gate relies on when it drops an output: the kept outputs' logits do
    not change, in their new order; the dropped ones are gone from the parameters."""
    torch.manual_seed(0)
    layer = head(4, 5).eval()
    x = torch.randn(6, 4)
    before = layer(x).detach()
    assert layer.keep([0, 1, 4, 2]) is layer
    assert layer.out_features == 4 and layer.weight.shape == (4, 4)
    assert torch.allclose(layer(x), before[:, [0, 1, 4, 2]], rtol=0, atol=1e-6)
    assert sum(p.numel() for p in layer.parameters()) == 4 * 4 + (4 if layer.bias is not None else 0)
    for bad in ([], [0, 0], [5]):
        with pytest.raises(ValueError, match="distinct output ids"):
            layer.keep(bad)


def test_mlp_projector_shape():
    proj = MLPProjector(6, hidden_dim=5, out_dim=3).eval()
    assert proj(torch.randn(4, 6)).shape == (4, 3) and proj.out_dim == 3


def test_network_encode_keys_and_shapes():
    torch.manual_seed(0)
    net = Network(SmallConvNet(1, width=2), num_classes=3,
                  projector=functools.partial(MLPProjector, hidden_dim=6, out_dim=5)).eval()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        out = net.encode(x)
        logits = net(x)
    assert set(out) == {"features", "projected", "logits"}
    assert out["features"].shape == (4, 8)
    assert out["projected"].shape == (4, 5)
    assert out["logits"].shape == (4, 3)
    assert torch.allclose(out["logits"], logits)
    assert net.num_classes == 3
    net.classifier.grow(2)
    assert net.num_classes == 5 and net(x).shape == (4, 5)
    with pytest.raises(ValueError, match="num_classes"):
        Network(SmallConvNet(1, width=2), num_classes=0)


def test_network_taps_return_the_channel_means_of_earlier_stages():
    torch.manual_seed(0)
    backbone = SmallConvNet(1, width=2)
    net = Network(backbone, num_classes=3, taps=(1, 3)).eval()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        out = net.encode(x)
        stage3 = backbone.body[:4](x)  # conv blocks 0, 1, pool, block 3
        untapped = Network(backbone, num_classes=3).eval()
        untapped.load_state_dict(net.state_dict())
        reference = untapped.encode(x)
    assert set(out) == {"tap1", "tap3", "features", "projected", "logits"}
    assert out["tap1"].shape == (4, 2) and out["tap3"].shape == (4, 4)
    assert torch.allclose(out["tap3"], stage3.mean(dim=(2, 3)))
    for key in reference:  # tapping changes nothing else
        assert torch.allclose(out[key], reference[key])
    with pytest.raises(ValueError, match="stages before the final pooling"):
        Network(SmallConvNet(1, width=2), num_classes=3, taps=(7,)).encode(x)
    with pytest.raises(ValueError, match="does not expose them"):
        Network(TorchvisionBackbone(torchvision.models.resnet18, in_channels=1), num_classes=3, taps=(1,))
