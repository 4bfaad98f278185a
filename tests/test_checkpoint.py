"""Checkpoints rebuild their model alone, load weights-only, and are written atomically."""

import pytest
import torch

from ptanet.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from ptanet.models import mobilenet_v2, pta_mobilenet_v2

PREPROCESS = {"size": 128, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "box_frame": 224, "color": "RGB"}


def _stats(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        n: (torch.randn(model.get_buffer(n + ".running_mean").numel(), generator=g) * 0.1,
            torch.rand(model.get_buffer(n + ".running_var").numel(), generator=g) + 0.5)
        for n in model.adaptive_bn_names
    }


def test_pta_roundtrip_with_bn_stats_and_config(tmp_path):
    torch.manual_seed(0)
    model = pta_mobilenet_v2().eval()
    model.set_bn_stats("LLL", _stats(model, 1))
    model.set_config("LLL")
    path = save_checkpoint(tmp_path / "m.pt", model, PREPROCESS, meta={"epoch": 3})
    # The file is plain data: weights_only loading must work on it as it is.
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["labels"] == {0: "live", 1: "spoof"}
    assert raw["versions"]["torch"] == torch.__version__
    ck = load_checkpoint(path)
    assert ck.config == "LLL" and ck.model.config == "LLL" and ck.meta == {"epoch": 3}
    assert ck.preprocess == PREPROCESS and ck.model.bn_configs == ["LLL"]
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        for cfg in ("LLL", "HHH", "BBB"):
            torch.testing.assert_close(ck.model.set_config(cfg)(x), model.set_config(cfg)(x), rtol=0, atol=0)


def test_baseline_and_static_roundtrip(tmp_path):
    x = torch.randn(1, 3, 96, 96)
    pta = pta_mobilenet_v2().eval()
    # A static B block with its 0.5 folded into the next convolution rebuilds folded, one without unfolded.
    for model in (mobilenet_v2().eval(), pta.to_static("BLH"), pta.to_static("BLB"),
                  pta.to_static("BLB", fold_average=False)):
        ck = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model, PREPROCESS))
        with torch.no_grad():
            torch.testing.assert_close(ck.model(x), model(x), rtol=0, atol=0)


def test_code_carrying_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "x": Evil()}, path)
    with pytest.raises(ValueError, match=r"evil.pt: refused: the file holds code \(a reference to (builtins\.)?print\)"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "not a readable checkpoint"),
        (b"garbage" * 10, "not a readable checkpoint"),
    ],
)
def test_broken_files_name_the_file(tmp_path, content, match):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"broken.pt: {match}"):
        load_checkpoint(path)


def test_wrong_checkpoints(tmp_path):
    torch.save(mobilenet_v2().state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="plain.pt: not a ptanet checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    save_checkpoint(tmp_path / "m.pt", mobilenet_v2(), PREPROCESS)
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    raw["arch"]["name"] = "pta_mobilenet_v2"
    torch.save(raw, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match="mismatch.pt: weights do not fit"):
        load_checkpoint(tmp_path / "mismatch.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", mobilenet_v2(), PREPROCESS, meta={"epoch": 1})

    def dying_save(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt  # a kill in the middle of the write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, mobilenet_v2(), PREPROCESS, meta={"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path).meta == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
