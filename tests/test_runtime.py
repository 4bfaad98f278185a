"""The deployment runtime: the switchable folder and file equal the static files, runs without torch, refuses
bad input; the configuration selector and the adaptive controller are pure functions of given
latencies."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import ptanet.export as export
from ptanet.checkpoint import save_checkpoint
from ptanet.export import export_all, export_switchable, export_switchable_folder, generated_crops
from ptanet.infer import Predictor
from ptanet.runtime import AdaptiveController, DeployedModel, pareto_front, select_config

from test_export import PREPROCESS, _calibrated_pta

CONFIGS = ["HHH", "LHH", "LLL", "BHL"]  # LHH has its own BatchNorm statistics, the others the shared ones

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    ck = save_checkpoint(root / "pta.pt", _calibrated_pta(), PREPROCESS,
                         meta={"val": {"HHH": {"acer": 0.05}, "LLL": {"acer": 0.09}}})
    result = export_switchable(ck, root / "sw" / "model_switchable.onnx", CONFIGS)
    export_all(ck, root / "static", CONFIGS)
    return ck, Path(result["path"]), root / "static", result


@pytest.fixture(scope="module")
def folder(exported, tmp_path_factory):
    result = export_switchable_folder(exported[0], tmp_path_factory.mktemp("folder") / "model_switchable", CONFIGS)
    return Path(result["path"]), result


def test_switchable_folder_gives_the_static_files_outputs(exported, folder):
    static, (path, result) = exported[2], folder
    assert set(result["max_abs_diff"]) == set(CONFIGS) and max(result["max_abs_diff"].values()) < 1e-4
    model = DeployedModel(path)
    assert model.switchable and model.folder and model.config_names == CONFIGS and model.config == "HHH"
    crops = generated_crops(5, 96, seed=3)
    for cfg in CONFIGS[::-1] + CONFIGS:
        np.testing.assert_array_equal(model.set_config(cfg).run(crops),
                                      DeployedModel(static / f"model_{cfg}.onnx").run(crops))
    assert {c["config"]: c["val"] for c in model.configs}["HHH"] == {"acer": 0.05}
    # A manifest and one content-named subfolder: a graph per configuration and one weights file,
    # in which tensors equal across configurations are stored once.
    manifest = json.loads((path / "artifact.json").read_text())
    assert sorted(p.name for p in path.iterdir()) == ["artifact.json", manifest["dir"]]
    graphs = path / manifest["dir"]
    assert sorted(p.name for p in graphs.iterdir()) == sorted(["weights.bin"] + [f"model_{c}.onnx" for c in CONFIGS])
    static_bytes = sum((static / f"model_{c}.onnx").stat().st_size for c in CONFIGS)
    assert result["size_bytes"] < 0.6 * static_bytes
    weights = (graphs / "weights.bin").stat().st_size
    assert all((graphs / f"model_{c}.onnx").stat().st_size < 0.01 * weights for c in CONFIGS)  # weights outside
    assert (graphs.stat().st_mode & 0o055) == 0o055  # readable by the service's user, like any exported file
    # The manifest can be named instead of the folder; each graph is also a valid static file.
    assert DeployedModel(path / "artifact.json").config_names == CONFIGS
    single = DeployedModel(graphs / "model_LLL.onnx")
    assert not single.switchable and single.config == "LLL"
    np.testing.assert_array_equal(single.run(crops), model.set_config("LLL").run(crops))


def test_switchable_folder_export_is_atomic(exported, tmp_path, monkeypatch):
    ck, out = exported[0], tmp_path / "m"
    export_switchable_folder(ck, out, ["HHH", "LLL"])
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    monkeypatch.setattr(export, "VERIFY_TOLERANCE", 0.0)
    monkeypatch.setattr(export, "OWN_ERROR_FACTOR", 0.0)
    with pytest.raises(RuntimeError, match=r"model_HHH\.onnx: onnxruntime and PyTorch outputs differ"):
        export_switchable_folder(ck, out, ["HHH", "LHH"])
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # nothing new, nothing lost
    assert DeployedModel(out).config_names == ["HHH", "LLL"]
    monkeypatch.undo()
    export_switchable_folder(ck, out, ["HHH", "LHH"])  # a new export replaces the old graphs
    assert len(list(out.glob("graphs-*"))) == 1 and DeployedModel(out).config_names == ["HHH", "LHH"]


def test_broken_switchable_folders_are_named(folder, tmp_path):
    import shutil

    src = folder[0]
    with pytest.raises(ValueError, match=r"empty: not a ptanet switchable folder \(no artifact\.json\)"):
        (tmp_path / "empty").mkdir()
        DeployedModel(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    manifest = json.loads((broken / "artifact.json").read_text())
    (broken / "artifact.json").write_text(json.dumps({**manifest, "format_version": 9}))
    with pytest.raises(ValueError, match=r"artifact\.json: switchable-folder version 9, this ptanet reads version 1"):
        DeployedModel(broken)
    (broken / "artifact.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"artifact\.json: unreadable manifest"):
        DeployedModel(broken)
    swapped = [{**g, "config": {"HHH": "LLL", "LLL": "HHH"}.get(g["config"], g["config"])} for g in manifest["graphs"]]
    (broken / "artifact.json").write_text(json.dumps({**manifest, "graphs": swapped}))
    with pytest.raises(ValueError, match=r"model_HHH\.onnx: holds configuration HHH, the manifest says LLL"):
        DeployedModel(broken)
    (broken / "artifact.json").write_text(json.dumps(manifest))
    (broken / manifest["dir"] / "model_LHH.onnx").unlink()
    with pytest.raises(ValueError, match=r"the graph of LHH, .*model_LHH\.onnx, is missing \(copy the whole folder\)"):
        DeployedModel(broken)


def test_switching_gives_the_static_files_outputs(exported):
    _, path, static, result = exported
    assert set(result["max_abs_diff"]) == set(CONFIGS) and max(result["max_abs_diff"].values()) < 1e-4
    model = DeployedModel(path)
    assert model.switchable and model.config_names == CONFIGS and model.config == "HHH"
    crops = generated_crops(6, 96, seed=5)
    outputs = {}
    for cfg in CONFIGS[::-1] + CONFIGS:  # switch back and forth: no state survives a switch
        got = model.set_config(cfg).run(crops)
        want = DeployedModel(static / f"model_{cfg}.onnx").run(crops)
        np.testing.assert_array_equal(got, want)
        outputs[cfg] = got
    assert np.abs(outputs["HHH"] - outputs["LLL"]).max() > 1e-3  # the configurations differ
    info = {c["config"]: c for c in model.configs}
    assert info["LLL"]["macs"] < info["BHL"]["macs"] < info["HHH"]["macs"]  # BHL: +3.5 M for B, -5.2 M for L
    assert info["HHH"]["val"] == {"acer": 0.05} and info["LHH"]["val"] is None
    # One graph file and one weights file; tensors equal across branches are stored once.
    files = sorted(p.name for p in path.parent.iterdir())
    assert files[1] == "model_switchable.onnx" and files[0].endswith(".weights") and len(files) == 2
    static_bytes = sum((static / f"model_{c}.onnx").stat().st_size for c in CONFIGS)
    assert result["size_bytes"] < static_bytes


def test_own_prefix_variant_keeps_every_layer_in_its_branch_with_the_same_outputs(exported, tmp_path):
    ck, path, _, _ = exported
    prefixed = Path(export_switchable(ck, tmp_path / "model_switchable.onnx", CONFIGS, share_prefix=False)["path"])
    outside = [len([n for n in onnx.load(f, load_external_data=False).graph.node if n.op_type not in
                    ("If", "Equal", "Constant", "Identity")]) for f in (path, prefixed)]
    assert outside[0] > 0 and outside[1] == 0  # the default runs the common layers once, outside
    crops = generated_crops(4, 96, seed=9)
    default, shared = DeployedModel(path), DeployedModel(prefixed)
    for cfg in CONFIGS:
        np.testing.assert_allclose(shared.set_config(cfg).run(crops), default.set_config(cfg).run(crops), atol=1e-6)


def test_predictor_switches_an_exported_file(exported, tmp_path, write_image):
    ck, path, _, _ = exported
    images = [write_image(tmp_path / f"{i}.png", 80, 80, seed=i) for i in range(3)]
    onnx_pred, torch_pred = Predictor(path, config="lll"), Predictor(ck, config="LLL")
    assert onnx_pred.backend == "onnxruntime" and onnx_pred.config == "LLL"
    for cfg in ("LLL", "BHL"):
        o = [r["score"] for r in onnx_pred.set_config(cfg).predict_paths(images)]
        t = [r["score"] for r in torch_pred.set_config(cfg).predict_paths(images)]
        assert o == pytest.approx(t, abs=1e-4)
    with pytest.raises(ValueError, match="no configuration 'HLH' in this file; it holds configurations HHH, LHH, LLL, BHL"):
        onnx_pred.set_config("HLH")
    with pytest.raises(ValueError, match=r"H \(heavy\), L \(light\) or B \(both\)"):
        onnx_pred.set_config("HXH")


def test_cli_exports_the_switchable_file_and_predicts_with_it(exported, tmp_path, write_image, capsys):
    from ptanet.cli import main

    ck = exported[0]
    image = write_image(tmp_path / "face.png", 90, 90)
    scores = []
    for flags, path in (([], tmp_path / "d" / "model_switchable"),  # the default: a switchable folder
                        (["--single-file"], tmp_path / "d" / "model_switchable.onnx")):
        assert main(["export", str(ck), "--out", str(tmp_path / "d"), "--configs", "HHH,LLL", *flags]) == 0
        assert json.loads(capsys.readouterr().out)["path"] == str(path)
        assert main(["predict", str(path), str(image), "--config", "LLL", "--format", "json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert rows[0]["config"] == "LLL" and 0 <= rows[0]["score"] <= 1
        scores.append(rows[0]["score"])
        assert main(["predict", str(path), str(image), "--config", "BBB"]) == 2
        assert "it holds configurations HHH, LLL" in capsys.readouterr().err
    assert scores[0] == pytest.approx(scores[1], abs=1e-5)


def test_graph_optimisation_levels_give_the_same_outputs(exported):
    from ptanet.runtime import ortsession

    static, crops = exported[2] / "model_LHH.onnx", generated_crops(3, 96, seed=4)
    want = DeployedModel(static).run(crops)
    for level in ("basic", "extended"):
        np.testing.assert_allclose(DeployedModel(static, optimization=level).run(crops), want, atol=1e-5)
    with pytest.raises(ValueError, match="optimization must be one of basic, extended, all, got 'fast'"):
        ortsession(static, optimization="fast")


def test_bad_batches_are_refused_with_the_expected_shape(exported):
    model = DeployedModel(exported[1])
    good = generated_crops(2, 96)
    for bad, what in ((good.astype(np.float32), "dtype float32"), (good[:, :64], r"shape \(2, 64, 96, 3\)"),
                      (good[0], r"shape \(96, 96, 3\)"), (good.transpose(0, 3, 1, 2), r"shape \(2, 3, 96, 96\)")):
        with pytest.raises(ValueError, match=rf"model_switchable\.onnx: expected uint8 \(N, 96, 96, 3\) RGB face crops, got {what}"):
            model.run(bad)
    with pytest.raises(ValueError, match="numpy array"):
        model.run(good.tolist())


def test_failed_check_leaves_the_previous_export_whole(exported, tmp_path, monkeypatch):
    ck = exported[0]
    first = export_switchable(ck, tmp_path / "m.onnx", ["HHH", "LLL"])
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(export, "VERIFY_TOLERANCE", 0.0)
    monkeypatch.setattr(export, "OWN_ERROR_FACTOR", 0.0)
    with pytest.raises(RuntimeError, match=r"m\.onnx.*onnxruntime and PyTorch outputs differ"):
        export_switchable(ck, tmp_path / "m.onnx", ["HHH", "LHH"])
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no new weights, no temporary files
    assert DeployedModel(first["path"]).config_names == ["HHH", "LLL"]
    monkeypatch.undo()
    export_switchable(ck, tmp_path / "m.onnx", ["HHH", "LHH"])  # a new export replaces the old weights
    assert len(list(tmp_path.glob("*.weights"))) == 1 and DeployedModel(tmp_path / "m.onnx").config_names == ["HHH", "LHH"]


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_runtime_runs_without_torch(exported, folder, layout):
    """A deployment has onnxruntime and numpy only: ptanet.runtime must never import torch."""
    path = exported[1] if layout == "file" else folder[0]
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Block())
import numpy as np
from ptanet.runtime import DeployedModel
m = DeployedModel({str(path)!r})
m.set_config("LLL")
p = m.run(np.zeros((2, 96, 96, 3), np.uint8))
assert p.shape == (2, 2) and abs(float(p.sum()) - 2) < 1e-4
assert "torch" not in sys.modules
print("ok", [c["config"] for c in m.configs])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": ":".join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"ok {CONFIGS}"


def test_foreign_truncated_and_mismatched_files(exported, tmp_path):
    path = exported[1]
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"junk\.onnx: onnxruntime cannot load"):
        DeployedModel(tmp_path / "junk.onnx")
    proto = onnx.load(exported[2] / "model_HHH.onnx")
    for p in proto.metadata_props:
        if p.key == "preprocess":
            p.value = json.dumps({**json.loads(p.value), "size": 128})
    onnx.save(proto, tmp_path / "size.onnx")
    with pytest.raises(ValueError, match=r"size\.onnx: input image tensor\(uint8\) \['N', 96, 96, 3\] does not match "
                                         r"the metadata \(expected image uint8 \[N, 128, 128, 3\]\)"):
        DeployedModel(tmp_path / "size.onnx")


# --- selection and adaptation: pure functions of given numbers ----------------------------------------
ROWS = [
    {"config": "LLL", "latency_ms": 2.0, "acer": 0.10},
    {"config": "LHH", "latency_ms": 2.6, "acer": 0.12},  # dominated by HLH: slower and worse
    {"config": "HLH", "latency_ms": 2.5, "acer": 0.07},
    {"config": "HHH", "latency_ms": 3.0, "acer": 0.05},
    {"config": "BBB", "latency_ms": 3.5, "acer": 0.05},  # no better than HHH, dearer
    {"config": "BHH", "latency_ms": 3.2, "acer": None},  # not evaluated
]


def test_pareto_front_and_selection():
    assert [r["config"] for r in pareto_front(ROWS)] == ["LLL", "HLH", "HHH"]
    assert select_config(ROWS, budget_ms=2.7)["config"] == "HLH"
    assert select_config(ROWS, budget_ms=10)["config"] == "HHH"  # BBB ties on ACER but is dearer
    assert select_config(ROWS, budget_rel=0.7)["config"] == "LLL"  # 2.1 ms
    with pytest.raises(ValueError, match=r"no configuration fits 1\.5 .*fastest, LLL, needs 2"):
        select_config(ROWS, budget_ms=1.5)
    with pytest.raises(ValueError, match="exactly one"):
        select_config(ROWS)
    assert select_config([{"config": "BHH", "latency_ms": 3.2, "acer": None}], budget_ms=4)["config"] == "BHH"


def _drive(controller, trace_of):
    """Feed a controller latencies from ``trace_of(config, frame)``; the configuration per frame."""
    timeline = []
    for frame in range(300):
        config = controller.config
        timeline.append(config)
        controller.observe(trace_of(config, frame))
    return timeline


def test_adaptive_controller_steps_down_under_load_and_back_up():
    ladder, costs = ["LLL", "HLH", "HHH"], [2.0, 2.5, 3.0]

    def latency(config, frame):  # ms; a burst of load between frames 100 and 200 doubles every latency
        return costs[ladder.index(config)] * (2.0 if 100 <= frame < 200 else 1.0)

    c = AdaptiveController(ladder, costs, budget_ms=4.0, window=10)
    timeline = _drive(c, latency)
    assert set(timeline[:100]) == {"HHH"}  # quiet: the best configuration fits
    assert timeline[125:200] == ["LLL"] * 75  # under load it reaches the cheapest, which fits (4.0)
    assert timeline[-50:] == ["HHH"] * 50  # and climbs back when the load is gone
    # Hysteresis: in a steady state it never flaps between rungs.
    switches = sum(a != b for a, b in zip(timeline, timeline[1:]))
    assert switches <= 6


def test_adaptive_controller_hysteresis_holds_near_the_budget():
    # HHH costs just over the budget, HLH just under: a controller without headroom would
    # climb back to HHH after every window and miss the budget again.
    c = AdaptiveController(["HLH", "HHH"], [2.5, 3.0], budget_ms=2.9, window=5, headroom=0.8)
    timeline = _drive(c, lambda config, frame: {"HLH": 2.6, "HHH": 3.1}[config])
    assert timeline[:5] == ["HHH"] * 5 and set(timeline[5:]) == {"HLH"}
    with pytest.raises(ValueError, match="headroom"):
        AdaptiveController(["HHH"], [1.0], 1.0, headroom=1.2)
