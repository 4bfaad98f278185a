"""The library core imports without the training stack, so a deployment needs none of it."""

import subprocess
import sys

CORE = ["ptanet.blocks", "ptanet.models", "ptanet.configs", "ptanet.checkpoint", "ptanet.preprocess", "ptanet.detect",
        "ptanet.runtime", "ptanet.infer", "ptanet.export", "ptanet.metrics", "ptanet.tables", "ptanet.atomic"]
# (tqdm is not listed: torch itself imports it.)
TRAINING_STACK = ["ptanet.train", "ptanet.data", "ptanet.evaluate", "ptanet.scoring", "albumentations", "matplotlib",
                  "yaml"]


def test_core_imports_without_the_training_stack():
    code = ("import sys\n"
            f"for name in {CORE!r}: __import__(name)\n"
            f"print(sorted(m for m in {TRAINING_STACK!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
