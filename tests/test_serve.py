"""The HTTP service through real HTTP on 127.0.0.1: answers, run-time configuration switching, and the
status code and message of every kind of bad input; the queue bound, a crash inside one request,
graceful shutdown, and `ptanet serve` as its own process stopped with SIGTERM."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
import uvicorn  # noqa: E402

from ptanet.liveness import LivenessChecker  # noqa: E402
from ptanet.serve.app import create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MAX_BODY = 200_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread on a free loopback port; `stop()` asks it to shut down gracefully."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)

    def request(self, method, path, body=None, headers=None, timeout=60):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            data = r.read()
            return r.status, dict(r.getheaders()), (json.loads(data) if r.getheader("content-type", "").startswith(
                "application/json") else data)
        finally:
            conn.close()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def multipart(data: bytes, name="image", filename="face.jpg", ctype="image/jpeg") -> tuple[bytes, dict]:
    boundary = "ptanet-test-boundary"
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    body = (f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {ctype}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture(scope="module")
def face_jpeg(nuaa_dev) -> bytes:
    return sorted((nuaa_dev / "Data" / "test" / "3" / "live").glob("*.jpg"))[0].read_bytes()


@pytest.fixture(scope="module")
def checker(tiny_model):
    return LivenessChecker(tiny_model, detect="haar")


@pytest.fixture(scope="module")
def server(checker):
    s = Server(create_app(checker, max_body=MAX_BODY, queue=4, workers=2))
    yield s
    s.stop()


def test_face_multipart_and_raw_body(server, face_jpeg):
    status, _, body = server.request("POST", "/v1/liveness", *multipart(face_jpeg))
    assert status == 200, body
    assert len(body["faces"]) == 1 and body["config"] == "HHH" and body["milliseconds"] > 0
    face = body["faces"][0]
    assert len(face["box"]) == 4 and 0 <= face["spoof_probability"] <= 1
    assert face["decision"] == ("spoof" if face["spoof_probability"] >= body["threshold"] else "live")
    status, _, raw = server.request("POST", "/v1/liveness", face_jpeg, {"Content-Type": "image/jpeg"})
    assert status == 200 and raw["faces"][0]["spoof_probability"] == pytest.approx(face["spoof_probability"])


def test_no_face_is_an_empty_list(server):
    flat = cv2.imencode(".png", np.full((120, 120, 3), 128, np.uint8))[1].tobytes()
    status, _, body = server.request("POST", "/v1/liveness", flat, {"Content-Type": "image/png"})
    assert status == 200 and body["faces"] == [] and body["reason"] == "no face detected"


def test_switch_configuration_without_reloading(server, checker, face_jpeg):
    status, _, configs = server.request("GET", "/v1/configs")
    assert status == 200 and len(configs["configs"]) == 27 and configs["current"] == "HHH"
    model_before = checker.predictor._backend.model
    try:
        status, _, body = server.request("PUT", "/v1/config", json.dumps({"config": "lll"}),
                                         {"Content-Type": "application/json"})
        assert status == 200 and body == {"config": "LLL"}
        status, _, result = server.request("POST", "/v1/liveness", face_jpeg, {"Content-Type": "image/jpeg"})
        assert status == 200 and result["config"] == "LLL"
        assert checker.predictor._backend.model is model_before  # switched in place, not reloaded
        by_config = {c["config"]: c for c in server.request("GET", "/v1/configs")[2]["configs"]}
        assert by_config["LLL"]["measured_requests"] >= 1 and by_config["LLL"]["model_ms_median"] > 0
        status, _, bad = server.request("PUT", "/v1/config", json.dumps({"config": "HXH"}),
                                        {"Content-Type": "application/json"})
        assert status == 422 and "invalid PTA configuration 'HXH'" in bad["detail"]
    finally:
        checker.set_config("HHH")


def test_health_ready_docs_and_page(server):
    assert server.request("GET", "/healthz")[:1] == (200,)
    status, _, ready = server.request("GET", "/readyz")
    assert status == 200 and ready["status"] == "ready"
    status, _, spec = server.request("GET", "/openapi.json")
    assert status == 200 and "/v1/liveness" in spec["paths"] and "multipart/form-data" in json.dumps(spec["paths"]["/v1/liveness"])
    status, _, docs = server.request("GET", "/docs")
    assert status == 200 and b"swagger" in docs.lower()
    status, _, page = server.request("GET", "/")
    assert status == 200 and b"/v1/liveness" in page and b"getUserMedia" in page


def test_bad_inputs_status_and_message(server, face_jpeg):
    from test_liveness import png_bomb

    cases = [
        (b"hello", {"Content-Type": "text/plain"}, 415, "unsupported media type"),
        (b"this is not an image", {"Content-Type": "image/jpeg"}, 422, "not an image"),
        (face_jpeg[: len(face_jpeg) // 2], {"Content-Type": "image/jpeg"}, 422, "truncated"),
        (png_bomb(12_000), {"Content-Type": "image/png"}, 413, "pixels is over the limit"),
        (b"", {"Content-Type": "image/jpeg"}, 422, "empty"),
        (*multipart(b"x" * 10, name="note", filename=None, ctype="text/plain"), 422, "without a file field"),
        (b"--nothing\r\n", {"Content-Type": "multipart/form-data; boundary=zzz"}, 422, ""),
    ]
    for body, headers, code, message in cases:
        status, _, answer = server.request("POST", "/v1/liveness", body, headers)
        assert status == code, (headers, answer)
        assert message in answer["detail"]
    # The server is still fine afterwards.
    assert server.request("POST", "/v1/liveness", face_jpeg, {"Content-Type": "image/jpeg"})[0] == 200


def test_body_over_the_limit_is_refused_before_it_is_read(server):
    # Declared too large: answered from the headers, with the body not sent at all.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/liveness")
    conn.putheader("Content-Type", "image/jpeg")
    conn.putheader("Content-Length", str(10 ** 9))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "over the limit" in json.loads(r.read())["detail"]
    conn.close()
    # Chunked (no length): counted while streaming, refused once past the limit.
    def chunks():
        for _ in range(100):
            yield b"\0" * 10_000

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("POST", "/v1/liveness", body=chunks(), headers={"Content-Type": "image/jpeg"}, encode_chunked=True)
        r = conn.getresponse()
        assert r.status == 413 and "over the limit" in json.loads(r.read())["detail"]
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may close before the client finishes sending; then it never read it whole
    conn.close()


def test_full_queue_answers_503_and_a_crash_does_not_stop_the_server(tiny_model, face_jpeg, monkeypatch):
    checker = LivenessChecker(tiny_model, detect="haar")
    server = Server(create_app(checker, max_body=MAX_BODY, queue=1, workers=1))
    try:
        release, entered = threading.Event(), threading.Event()
        original = checker.check

        def slow_check(data, box=None):
            entered.set()
            release.wait(30)
            return original(data, box)

        monkeypatch.setattr(checker, "check", slow_check)
        first = {}
        t = threading.Thread(target=lambda: first.update(
            r=server.request("POST", "/v1/liveness", face_jpeg, {"Content-Type": "image/jpeg"})))
        t.start()
        assert entered.wait(30)
        status, headers, body = server.request("POST", "/v1/liveness", face_jpeg, {"Content-Type": "image/jpeg"})
        assert status == 503 and headers.get("retry-after") == "1" and "busy" in body["detail"]
        assert server.request("GET", "/healthz")[0] == 200  # the event loop is free while a check runs
        # Graceful shutdown: asked to stop while a request is in flight, the server finishes it first.
        server.server.should_exit = True
        time.sleep(0.3)
        release.set()
        t.join(30)
        assert first["r"][0] == 200 and len(first["r"][2]["faces"]) == 1
        server.thread.join(30)
        assert not server.thread.is_alive()
    finally:
        release.set()
        server.stop()

    checker = LivenessChecker(tiny_model, detect="haar")
    server = Server(create_app(checker, max_body=MAX_BODY))
    try:
        calls = []

        def crash_once(data, box=None):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("boom")
            return LivenessChecker.check(checker, data, box)

        monkeypatch.setattr(checker, "check", crash_once)
        status, _, body = server.request("POST", "/v1/liveness", face_jpeg, {"Content-Type": "image/jpeg"})
        assert status == 500 and "RuntimeError" in body["detail"]
        status, _, body = server.request("POST", "/v1/liveness", face_jpeg, {"Content-Type": "image/jpeg"})
        assert status == 200 and len(body["faces"]) == 1
    finally:
        server.stop()


def test_ptanet_serve_process_stops_on_sigterm(tiny_model, face_jpeg, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "ptanet", "serve", str(tiny_model), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "ptanet serve did not become ready"
            time.sleep(0.3)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/liveness", body=face_jpeg, headers={"Content-Type": "image/jpeg"})
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["faces"]
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal, so the exit status says SIGTERM.
        assert proc.wait(60) in (0, -signal.SIGTERM)
        log = proc.stdout.read()
        assert b"Shutting down" in log and b"Application shutdown complete" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_service_runs_a_switchable_folder(tiny_model, face_jpeg, tmp_path):
    """What a deployment ships: the exported folder; the service lists and switches the configurations
    it holds, and scores as that configuration's static file does."""
    from ptanet.export import export_onnx, export_switchable_folder

    folder = export_switchable_folder(tiny_model, tmp_path / "model_switchable", ["HHH", "LLL"])["path"]
    static = export_onnx(tiny_model, tmp_path / "model_LLL.onnx", config="LLL")["path"]
    exported, reference = LivenessChecker(folder, detect="haar"), LivenessChecker(static, detect="haar")
    s = Server(create_app(exported, max_body=MAX_BODY, queue=4, workers=2))
    try:
        status, _, configs = s.request("GET", "/v1/configs")
        assert status == 200 and [c["config"] for c in configs["configs"]] == ["HHH", "LLL"]
        status, _, body = s.request("PUT", "/v1/config", json.dumps({"config": "LLL"}), {"Content-Type": "application/json"})
        assert status == 200 and body == {"config": "LLL"}
        status, _, result = s.request("POST", "/v1/liveness", face_jpeg, {"Content-Type": "image/jpeg"})
        want = reference.check(face_jpeg)  # the LLL graph alone, as a static file
        assert status == 200 and result["config"] == "LLL"
        assert result["faces"][0]["spoof_probability"] == pytest.approx(want.faces[0].spoof_probability, abs=1e-6)
        status, _, bad = s.request("PUT", "/v1/config", json.dumps({"config": "BBB"}), {"Content-Type": "application/json"})
        assert status == 422 and "it holds configurations HHH, LLL" in bad["detail"]
    finally:
        s.stop()
