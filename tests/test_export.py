"""ONNX export: the exported graph is the evaluated module (BN statistics included) behind the
preprocessing, it carries its own preprocessing/labels/configuration, and a failed export never
leaves a file behind."""

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import ptanet.export as export
from ptanet.checkpoint import load_checkpoint, save_checkpoint
from ptanet.export import SpoofScorer, export_all, export_onnx, generated_crops
from ptanet.preprocess import Preprocess
from ptanet.runtime import ortsession, read_metadata
from ptanet.models import mobilenet_v2, pta_mobilenet_v2

# Not the defaults, so a test can tell stored settings from defaults.
PREPROCESS = Preprocess(size=96, color="BGR").to_dict()


def _calibrated_pta(seed: int = 0):
    """A random PTA model whose activations are not vanishingly small: BatchNorm statistics from a
    few random batches (fresh-init statistics shrink the signal to ~0 through 17 blocks), and
    per-configuration statistics for LHH, as a calibrated checkpoint has."""
    torch.manual_seed(seed)
    model = pta_mobilenet_v2()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for cfg in ("HHH", "LLL", "BBB"):
            model.set_config(cfg)(torch.randn(4, 3, 64, 64))
    model.eval().set_config("HHH")
    g = torch.Generator().manual_seed(seed + 1)
    stats = {}
    for name in model.adaptive_bn_names:
        mean, var = model.get_buffer(name + ".running_mean"), model.get_buffer(name + ".running_var")
        stats[name] = (mean + 0.1 * torch.randn(mean.shape, generator=g), var * (0.8 + 0.4 * torch.rand(var.shape, generator=g)))
    model.set_bn_stats("LHH", stats)
    return model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "pta.pt"
    return save_checkpoint(path, _calibrated_pta(), PREPROCESS)


def _ort_outputs(path, crops):
    return ortsession(path).run(["probabilities", "spoof_score"], {"image": crops})


def _torch_probabilities(model, crops, preprocess=PREPROCESS):
    """What evaluation computes: Preprocess.normalize, then the model, then softmax."""
    with torch.no_grad():
        logits = model(Preprocess.from_dict(preprocess).normalize(crops))
    return torch.softmax(logits, 1).numpy()


def test_export_all_matches_the_switching_model_per_config(checkpoint, tmp_path):
    manifest = export_all(checkpoint, tmp_path, ["BHH", "LHH"])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["manifest.json", "model_BHH.onnx", "model_LHH.onnx"]  # no temporary files left
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    entries = {e["config"]: e for e in manifest["models"]}
    assert set(entries) == {"BHH", "LHH"}
    assert [e["macs"] for e in manifest["models"]] == sorted(e["macs"] for e in manifest["models"])
    assert entries["LHH"]["mops"] < entries["BHH"]["mops"] and entries["LHH"]["params"] > 0
    assert manifest["preprocess"] == PREPROCESS and manifest["input"]["shape"] == ["N", 96, 96, 3]
    assert manifest["input"]["dtype"] == "uint8"

    model = load_checkpoint(checkpoint).model
    crops = generated_crops(5, 96, seed=3)  # another batch size than the export's: the batch axis is dynamic
    for cfg, entry in entries.items():
        assert entry["max_abs_diff"] < 1e-4 and entry["opset"] == 17
        # A checkpoint without training settings is checked on generated crops, and says so.
        assert "generated crops" in entry["parity_data"]
        # Compare with the switching model behind Preprocess.normalize (BGR here), as evaluation runs
        # it: LHH has its own BN statistics, so a graph exported with the shared ones would differ.
        with model.using(cfg):
            expected = _torch_probabilities(model, crops)
        got_prob, got_score = _ort_outputs(tmp_path / entry["file"], crops)
        np.testing.assert_allclose(got_prob, expected, rtol=0, atol=1e-4)
        np.testing.assert_allclose(got_score, expected[:, 1], rtol=0, atol=1e-5)
    with model.using("LHH"):
        with_own = _torch_probabilities(model, crops)
        rgb_instead = _torch_probabilities(model, crops, {**PREPROCESS, "color": "RGB"})
    model.clear_bn_stats()
    with model.using("LHH"):
        # The check above could tell apart the shared statistics and the wrong channel order.
        assert np.abs(_torch_probabilities(model, crops) - with_own).max() > 1e-3
    assert np.abs(rgb_instead - with_own).max() > 1e-3


def test_metadata_travels_in_the_file(checkpoint, tmp_path):
    result = export_onnx(checkpoint, tmp_path / "m.onnx", config="pta-bhl")
    assert result["config"] == "BHL" and result["model"] == "PTA-BHL"
    assert result["size_bytes"] == (tmp_path / "m.onnx").stat().st_size > 1_000_000
    meta = read_metadata(tmp_path / "m.onnx")
    assert meta["config"] == "BHL" and meta["preprocess"] == PREPROCESS
    assert meta["labels"] == {0: "live", 1: "spoof"} and meta["arch"]["config"] == "BHL"
    # A deployment without ptanet reads the same facts with onnx alone.
    proto = onnx.load(tmp_path / "m.onnx")
    props = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert props["config"] == "BHL" and props["preprocess"] == PREPROCESS
    assert props["threshold"] is None and props["box_scale"] == 1.0  # none calibrated: consumers use 0.5
    assert props["input"]["shape"] == ["N", 96, 96, 3] and props["input"]["dtype"] == "uint8"
    assert [c["config"] for c in props["configs"]] == ["BHL"] and props["configs"][0]["macs"] > 0
    assert [i.name for i in proto.graph.input] == ["image"]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in proto.graph.output] == ["probabilities", "spoof_score"]
    assert {o.domain: o.version for o in proto.opset_import}.get("", None) == 17


def test_baseline_fixed_batch_and_other_opset(tmp_path):
    torch.manual_seed(1)
    model = mobilenet_v2().eval()
    result = export_onnx(model, tmp_path / "base.onnx", opset=13, dynamic_batch=False)
    assert result["config"] is None and result["model"] == "No PTA" and result["opset"] == 13
    meta = read_metadata(tmp_path / "base.onnx")
    assert meta["config"] is None and meta["preprocess"] == Preprocess().to_dict()  # a bare model: defaults
    session = ortsession(tmp_path / "base.onnx")
    assert session.get_inputs()[0].shape == [1, 128, 128, 3]
    crops = generated_crops(1, 128)
    np.testing.assert_allclose(session.run(["probabilities"], {"image": crops})[0],
                               _torch_probabilities(model, crops, Preprocess().to_dict()), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="No PTA baseline"):
        export_onnx(model, tmp_path / "x.onnx", config="HHH")
    with pytest.raises(ValueError, match="no PTA blocks"):
        export_all(model, tmp_path, ["HHH"])


def test_bad_config_names_the_allowed_letters(checkpoint, tmp_path):
    ck = load_checkpoint(checkpoint)
    for bad in ("HHX", "HH", "HHHH", "fast"):
        with pytest.raises(ValueError, match=r"H \(heavy\), L \(light\) or B \(both\)"):
            export_onnx(ck, tmp_path / "m.onnx", config=bad)
        with pytest.raises(ValueError, match=r"H \(heavy\)"):
            export_all(ck, tmp_path, ["HHH", bad])
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_leaves_no_file(checkpoint, tmp_path, monkeypatch):
    (tmp_path / "m.onnx").write_bytes(b"previous export")
    monkeypatch.setattr(export, "VERIFY_TOLERANCE", 0.0)  # nothing can pass
    monkeypatch.setattr(export, "OWN_ERROR_FACTOR", 0.0)
    with pytest.raises(RuntimeError, match=r"m\.onnx.*onnxruntime and PyTorch outputs differ"):
        export_onnx(checkpoint, tmp_path / "m.onnx", config="LLL")
    # The previous file is untouched and no temporary file is left.
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert (tmp_path / "m.onnx").read_bytes() == b"previous export"


def test_ortsession_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        ortsession(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.onnx: onnxruntime cannot load"):
        ortsession(tmp_path / "junk.onnx")


@pytest.fixture(scope="module")
def trained_like(tiny_synth, tmp_path_factory):
    """A checkpoint whose settings point at a prepared crop cache of face images, as training leaves."""
    from ptanet.data import build_datasets
    from ptanet.train.settings import resolve_settings

    root = tmp_path_factory.mktemp("trained")
    settings = resolve_settings(data=str(tiny_synth), out=str(root / "run"), cache=str(root / "cache"), size=48,
                                prepare_workers=0)
    build_datasets(settings.data, settings.cache_dir, settings.preprocess, workers=0, progress=False)
    return save_checkpoint(root / "run" / "best.pt", _calibrated_pta(2), settings.preprocess.to_dict(),
                           meta={"settings": settings.to_dict(), "val": {"HHH": {"acer": 0.1}}})


def test_parity_on_real_training_crops(trained_like, tmp_path):
    """A trained checkpoint's export is checked on crops of its own training cache, the crops the
    graph will see in use; and those equal what evaluation feeds the model."""
    from ptanet.data import CropCache

    result = export_onnx(trained_like, tmp_path / "m.onnx", config="LLL")
    cache = CropCache(trained_like.parent.parent / "cache" / "train")
    assert f"crops of the training cache {cache.cache_dir}" in result["parity_data"]
    assert result["max_abs_diff"] < 1e-4
    meta = read_metadata(tmp_path / "m.onnx")
    assert meta["configs"][0]["val"] is None  # validation recorded for HHH only
    got = _ort_outputs(tmp_path / "m.onnx", np.ascontiguousarray(cache.crops[:8]))[0]
    with load_checkpoint(trained_like).model.using("LLL") as model:
        expected = _torch_probabilities(model, np.ascontiguousarray(cache.crops[:8]), meta["preprocess"])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert export_onnx(trained_like, tmp_path / "h.onnx", config="HHH")["val"] == {"acer": 0.1}


def test_old_format_and_foreign_files_are_refused(checkpoint, tmp_path):
    export_onnx(checkpoint, tmp_path / "m.onnx", config="HHH")
    proto = onnx.load(tmp_path / "m.onnx")
    for key, value, message in (("format_version", "1", "format version 1, this ptanet reads version 2"),
                                ("format", '"something.else"', "not a ptanet ONNX export")):
        changed = onnx.load(tmp_path / "m.onnx")
        for p in changed.metadata_props:
            if p.key == key:
                p.value = value
        onnx.save(changed, tmp_path / "x.onnx")
        with pytest.raises(ValueError, match=rf"x\.onnx: .*{message}"):
            read_metadata(tmp_path / "x.onnx")
    (tmp_path / "t.onnx").write_bytes((tmp_path / "m.onnx").read_bytes()[:50_000])  # truncated
    with pytest.raises(ValueError, match=r"t\.onnx: onnxruntime cannot load"):
        read_metadata(tmp_path / "t.onnx")
    assert proto.graph.input[0].name == "image"


def test_int8_calibrated_on_real_crops_and_checked(trained_like, tmp_path):
    from ptanet.export import export_int8

    (result,) = export_int8(trained_like, tmp_path, ["LLL"])
    assert result["config"] == "LLL" and "crops of the training cache" in result["parity_data"]
    assert result["mean_abs_diff"] <= export.INT8_TOLERANCE and result["label_agreement"] >= export.INT8_AGREEMENT
    int8 = tmp_path / "model_LLL.int8.onnx"
    meta = read_metadata(int8)
    assert meta["quantization"]["per_channel"] is True and meta["quantization"]["activation"] == "U8"
    assert meta["int8_parity"]["mean_abs_diff"] == result["mean_abs_diff"]
    assert meta["quantization"]["stem_fp32"] is True
    nodes = onnx.load(int8).graph.node
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in nodes}  # QDQ format
    # The preprocessing and the first convolution stay float: the first QuantizeLinear quantizes
    # that convolution's activation (ReLU6, a Clip), and every later convolution reads a dequantized input.
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    first_q = next(i for i, n in enumerate(nodes) if n.op_type == "QuantizeLinear")
    produced = {o: n for n in nodes for o in n.output}
    activation = produced[nodes[first_q].input[0]]
    assert activation.op_type == "Clip" and produced[activation.input[0]] is nodes[convs[0]]
    assert produced[nodes[convs[0]].input[0]].op_type != "DequantizeLinear"
    assert all(produced[nodes[i].input[0]].op_type == "DequantizeLinear" for i in convs[1:])
    crops = generated_crops(4, 48)
    fp32 = _ort_outputs(tmp_path / "model_LLL.onnx", crops)[0]
    assert np.abs(_ort_outputs(int8, crops)[0] - fp32).max() < 0.2
    with pytest.raises(RuntimeError, match=r"model_HHH\.int8\.onnx: INT8 and fp32 probabilities differ .* not written"):
        export_int8(trained_like, tmp_path, ["HHH"], tolerance=0.0)
    assert not (tmp_path / "model_HHH.int8.onnx").exists()


def test_int8_qoperator_format(trained_like, tmp_path):
    from ptanet.export import export_int8, quantize_int8

    export_int8(trained_like, tmp_path, ["LLL"])
    fp32, crops = tmp_path / "model_LLL.onnx", generated_crops(16, 48, seed=2)
    result = quantize_int8(fp32, tmp_path / "q.onnx", crops[:8], crops[8:], tolerance=1.0, quant_format="QOperator")
    ops = {n.op_type for n in onnx.load(result["path"]).graph.node}
    assert "QLinearConv" in ops and [n.op_type for n in onnx.load(result["path"]).graph.node].count("Conv") == 0
    assert read_metadata(result["path"])["quantization"]["format"] == "QOperator"
    assert np.abs(_ort_outputs(result["path"], crops)[0] - _ort_outputs(fp32, crops)[0]).max() < 0.3
    with pytest.raises(ValueError, match="quant_format is QDQ or QOperator"):
        quantize_int8(fp32, tmp_path / "x.onnx", crops[:8], crops[8:], quant_format="QInt")
