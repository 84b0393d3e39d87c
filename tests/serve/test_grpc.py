"""gRPC beside HTTP: tritonclient.grpc unchanged, the same answers, errors with the protocol's status codes and the
same messages, the same limits and metrics, the admin token as metadata, and a drain that answers what it took."""
import signal
import threading

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.utils import InferenceServerException

from tests._server import free_port, wait_for
from tests.serve.test_server import _refuses_connections, images

pytestmark = pytest.mark.slow


def infer(url, x, model="digits-cnn", datatype="FP32", name="image", **kw):
    client = tgrpc.InferenceServerClient(url)
    inp = tgrpc.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], **kw)


def test_tritonclient_grpc_gets_what_http_gets(server, digits_bundle):
    from torchship import load_bundle
    port = free_port()
    s = server(digits_bundle, "--grpc-port", str(port))
    url = f"127.0.0.1:{port}"
    client = tgrpc.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits-cnn")
    meta = client.get_model_metadata("digits-cnn", as_json=True)
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": ["-1", "1", "28", "28"]}]
    x = images(5)
    want = load_bundle(digits_bundle)({"image": x})["logits"]
    np.testing.assert_allclose(infer(url, x).as_numpy("logits"), want, rtol=1e-5, atol=1e-5)
    cases = [  # (what is sent, the gRPC status, the message HTTP gives too)
        (dict(model="nope"), "StatusCode.NOT_FOUND", "unknown model 'nope'"),
        (dict(x=x.astype(np.float64), datatype="FP64"), "StatusCode.INVALID_ARGUMENT", "datatype FP64 does not match"),
        (dict(name="pixels"), "StatusCode.INVALID_ARGUMENT", "unknown input 'pixels'"),
        (dict(x=np.full_like(x, np.nan)), "StatusCode.INVALID_ARGUMENT", "NaN or infinite"),
        (dict(x=x[:, :, :27]), "StatusCode.INVALID_ARGUMENT", "must be 28"),
    ]
    for kw, status, fragment in cases:
        with pytest.raises(InferenceServerException) as info:
            infer(url, kw.pop("x", x), **kw)
        assert info.value.status() == status and fragment in info.value.message(), (status, info.value)
    assert s.metric("torchship_request_success_total") == 1
    assert s.metric("torchship_request_failure_total") == len(cases)
    assert infer(url, x).as_numpy("logits").shape == (5, 10)  # and it still serves


def test_grpc_sheds_a_full_queue_and_drains_on_sigterm(server, slow_bundle, gate):
    port = free_port()
    s = server(slow_bundle, "--trust-code", "--grpc-port", str(port), "--max-queue", "2", "--max-batch-size", "1",
               "--drain-timeout", "60", env=gate.env)
    url = f"127.0.0.1:{port}"
    x = np.ones((1, 4), np.float32)
    results = []

    def one():
        try:
            res = infer(url, x, model="slow", name="x")
            results.append(float(res.as_numpy(res.get_response().outputs[0].name)[0, 0]))
        except InferenceServerException as exc:
            results.append(exc)
    gate.close()
    threads = [threading.Thread(target=one)]
    threads[0].start()
    gate.wait_held(1)  # one runs, held in the model
    for n in (1, 2):  # two wait in the queue
        threads.append(threading.Thread(target=one))
        threads[-1].start()
        wait_for(lambda: s.metric("torchship_queue_depth") == n, f"{n} queued")
    with pytest.raises(InferenceServerException) as shed:  # the next is shed at once, while nothing can finish
        infer(url, x, model="slow", name="x")
    assert shed.value.status() == "StatusCode.UNAVAILABLE" and "queue full" in shed.value.message()
    assert results == [] and s.metric("torchship_rejected_total") == 1
    s.proc.send_signal(signal.SIGTERM)  # while requests are queued and running
    wait_for(lambda: _refuses_connections(s), "the drain begun (new connections refused)")
    gate.open()
    for t in threads:
        t.join(60)
    assert s.proc.wait(60) == 0
    assert results == [2.0] * 3  # every request it took was answered


def test_grpc_repository_rpcs_take_the_token_as_metadata(server, repository):
    token = "grpc-admin-token-0123"
    port = free_port()
    server(repository, "--repository", repository, "--grpc-port", str(port), env={"TORCHSHIP_ADMIN_TOKEN": token})
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{port}")
    with pytest.raises(InferenceServerException) as info:
        client.load_model("digits-cnn")
    assert info.value.status() == "StatusCode.PERMISSION_DENIED"
    client.load_model("digits-cnn", headers={"authorization": f"Bearer {token}"})
    assert client.is_model_ready("digits-cnn")
    client.unload_model("digits-cnn", headers={"authorization": f"Bearer {token}"})
    assert not client.is_model_ready("digits-cnn")
