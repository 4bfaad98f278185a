"""ptanet: face anti-spoofing with Post-Train Adaptive (PTA) MobileNetV2.

A PTA network is trained once and then runs at several speed/quality points: each of its
three PTA blocks executes its Light branch, its Heavy branch or Both, chosen after training
and switchable at run time (Khabarlak, "Post-Train Adaptive MobileNet for Fast Anti-Spoofing", 2022).
"""

__version__ = "0.1.0"

# Label convention used everywhere (data, metrics, checkpoints): spoof is the positive class.
LABELS = {0: "live", 1: "spoof"}
