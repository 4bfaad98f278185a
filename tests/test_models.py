"""The PTA MobileNetV2: shapes, gradients, switching, equivalence with MobileNetV2, to_static."""

import json
from pathlib import Path

import pytest
import torch

from ptanet.blocks import PTABlock
from ptanet.configs import PAPER_CONFIGS, all_configs, parse_config, parse_configs
from ptanet.models import create_model, list_models, load_mobilenet_v2_weights, mobilenet_v2, pta_mobilenet_v2

MANIFEST = Path(__file__).parent / "data" / "torchvision_mobilenet_v2_num_classes2.json"


@pytest.fixture(scope="module")
def pta():
    torch.manual_seed(0)
    return pta_mobilenet_v2().eval()


@pytest.fixture(scope="module")
def x4():
    return torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(1))


def test_27_configurations_unique():
    configs = all_configs()
    assert len(configs) == 27 == len(set(configs))
    assert set(PAPER_CONFIGS) <= set(configs)


@pytest.mark.parametrize("batch", [1, 4])
def test_forward_shape_all_configs_and_baseline(pta, batch):
    x = torch.randn(batch, 3, 128, 128)
    with torch.no_grad():
        out = mobilenet_v2().eval()(x)
        assert out.shape == (batch, 2) and torch.isfinite(out).all()
        for cfg in all_configs():
            out = pta.set_config(cfg)(x)
            assert out.shape == (batch, 2), cfg
            assert torch.isfinite(out).all(), cfg
    pta.set_config("HHH")


@pytest.mark.parametrize("cfg", ["LHH", "HLH", "HHL", "LLL", "BBB", "HHH"])
def test_backward_only_active_branches_get_gradients(cfg):
    torch.manual_seed(0)
    model = pta_mobilenet_v2().train().set_config(cfg)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    for block, mode in zip(model.pta_blocks, cfg):
        active = {"H": [block.heavy], "L": [block.light], "B": [block.light, block.heavy]}[mode]
        inactive = [b for b in (block.light, block.heavy) if all(b is not a for a in active)]
        for branch in active:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in branch.parameters()), cfg
        for branch in inactive:
            assert all(p.grad is None for p in branch.parameters()), cfg
    shared = [p for n, p in model.named_parameters() if ".light." not in n and ".heavy." not in n]
    assert all(p.grad is not None for p in shared)


def test_pta_hhh_equals_baseline_with_its_weights(x4):
    torch.manual_seed(3)
    base = mobilenet_v2().eval()
    # Non-trivial BN statistics so the test also covers the running buffers.
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model = pta_mobilenet_v2().eval()
    load_mobilenet_v2_weights(model, base.state_dict())
    with torch.no_grad():
        assert torch.equal(model.set_config("HHH")(x4), base(x4))
        assert not torch.equal(model.set_config("LHH")(x4), base(x4))


def test_both_is_mean_of_light_and_heavy():
    torch.manual_seed(0)
    block = PTABlock(64, 6).eval()
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        outs = {}
        for mode in "HLB":
            block.mode = mode
            outs[mode] = block(x)
    torch.testing.assert_close(outs["B"], (outs["H"] + outs["L"]) / 2)
    assert not torch.allclose(outs["H"], outs["L"])


def test_to_static_equals_switchable_for_every_config(pta, x4):
    with torch.no_grad():
        for cfg in all_configs():
            static = pta.to_static(cfg).eval()
            assert not any(isinstance(m, PTABlock) for m in static.modules())
            torch.testing.assert_close(static(x4), pta.set_config(cfg)(x4), rtol=0, atol=0, msg=cfg)
    pta.set_config("HHH")


def test_switching_shares_weights_and_context_restores(pta):
    before = {n: p.data_ptr() for n, p in pta.named_parameters()}
    pta.set_config("HHH")
    with pta.using("lLl") as m:
        assert m.config == "LLL"
        assert [b.mode for b in pta.pta_blocks] == ["L", "L", "L"]
    assert pta.config == "HHH"
    assert {n: p.data_ptr() for n, p in pta.named_parameters()} == before


@pytest.mark.parametrize("bad", ["HH", "XHH", "HHHH", "", "H H", "PTA-HHX", 3])
def test_bad_configuration_strings(bad, pta):
    with pytest.raises(ValueError, match="H \\(heavy\\), L \\(light\\) or B \\(both\\)|must be a string"):
        parse_config(bad)
    with pytest.raises(ValueError):
        pta.set_config(bad)


def test_configuration_parsing_accepts_canonical_forms():
    assert parse_config("lhh") == "LHH"
    assert parse_config("PTA-HLH") == "HLH"
    assert parse_configs(None) == list(PAPER_CONFIGS)
    assert len(parse_configs("all")) == 27
    assert parse_configs("HHH, lll,HHH") == ["HHH", "LLL"]


def test_factory():
    assert set(list_models()) == {"mobilenet_v2", "pta_mobilenet_v2"}
    m = create_model("pta_mobilenet_v2", num_classes=3, width_mult=0.5)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    with pytest.raises(ValueError, match="unknown model 'resnet'.*mobilenet_v2"):
        create_model("resnet")


def test_baseline_matches_torchvision_manifest():
    """Names and shapes equal torchvision's mobilenet_v2(num_classes=2), recorded in a manifest
    generated with torchvision itself (see tests/data/README.md), so CI needs no torchvision."""
    manifest = json.loads(MANIFEST.read_text())
    ours = {k: list(v.shape) for k, v in mobilenet_v2(num_classes=2).state_dict().items()}
    assert ours == manifest["state_dict"]


def test_manifest_maps_into_pta_heavy_branches():
    manifest = json.loads(MANIFEST.read_text())
    fake = {k: torch.full(shape, float(i)) if shape else torch.tensor(i) for i, (k, shape) in enumerate(manifest["state_dict"].items())}
    model = pta_mobilenet_v2()
    load_mobilenet_v2_weights(model, fake)
    sd = model.state_dict()
    # torchvision features.9/10 (the 2nd pair of 64-channel blocks) -> PTA block 1's heavy branch.
    assert torch.equal(sd["features.9.heavy.0.conv.0.0.weight"], fake["features.9.conv.0.0.weight"])
    assert torch.equal(sd["features.9.heavy.1.conv.2.weight"], fake["features.10.conv.2.weight"])
    assert torch.equal(sd["features.15.0.weight"], fake["features.18.0.weight"])
    assert torch.equal(sd["classifier.1.weight"], fake["classifier.1.weight"])


def _random_stats(model, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in model.adaptive_bn_names:
        n = model.get_buffer(name + ".running_mean").numel()
        out[name] = (torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) + 0.5)
    return out


def test_per_config_bn_stats_switch_by_reference(x4):
    torch.manual_seed(0)
    model = pta_mobilenet_v2().eval()
    shared_sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain_lll = model.set_config("LLL")(x4)
    stats = _random_stats(model, 1)
    model.set_bn_stats("LLL", stats)
    name = model.adaptive_bn_names[0]
    assert model.get_buffer(name + ".running_mean") is stats[name][0]  # installed, not copied
    with torch.no_grad():
        own_lll = model(x4)
        assert not torch.allclose(own_lll, plain_lll)
        # Configurations without their own statistics keep the shared ones.
        model.set_config("HHH")
        assert model.get_buffer(name + ".running_mean") is not stats[name][0]
        # The state dict always holds the shared (trained) statistics, whatever is active.
        model.set_config("LLL")
        assert all(torch.equal(v, shared_sd[k]) for k, v in model.state_dict().items())
        torch.testing.assert_close(model.to_static("LLL").eval()(x4), own_lll, rtol=0, atol=0)
        model.set_config("HHH")
        torch.testing.assert_close(model.to_static("LLL").eval()(x4), own_lll, rtol=0, atol=0)
    model.clear_bn_stats()
    with torch.no_grad():
        torch.testing.assert_close(model.set_config("LLL")(x4), plain_lll, rtol=0, atol=0)


def test_bn_stats_must_cover_every_adaptive_layer():
    model = pta_mobilenet_v2()
    stats = _random_stats(model, 0)
    stats.pop(model.adaptive_bn_names[-1])
    with pytest.raises(ValueError, match="miss 1 layers"):
        model.set_bn_stats("LLL", stats)
