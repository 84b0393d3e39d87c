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


def test_grpc_deadline_drops_the_request_before_it_runs_and_malformed_raw_contents_are_400s(server, slow_bundle, gate):
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg
    import grpc
    port = free_port()
    s = server(slow_bundle, "--trust-code", "--grpc-port", str(port), "--max-batch-size", "1", env=gate.env)
    url = f"127.0.0.1:{port}"
    x = np.ones((1, 4), np.float32)
    gate.close()
    first = []
    held = threading.Thread(target=lambda: first.append(infer(url, x, model="slow", name="x")))
    held.start()
    gate.wait_held(1)
    with pytest.raises(InferenceServerException) as late:  # its 200 ms pass while the model is held
        infer(url, x, model="slow", name="x", client_timeout=0.2)
    assert late.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    gate.open()
    held.join(60)
    assert float(first[0].as_numpy(first[0].get_response().outputs[0].name)[0, 0]) == 2.0
    wait_for(lambda: s.metric("torchship_queue_depth") == 0, "the queue empty")
    assert s.metric("torchship_inference_count_total") == 1  # the late one was dropped, never run
    stub = pbg.GRPCInferenceServiceStub(grpc.insecure_channel(url))

    def raw(contents, n_inputs=1):
        req = pb.ModelInferRequest(model_name="slow")
        for _ in range(n_inputs):
            req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        req.raw_input_contents.extend(contents)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(req, timeout=30)
        return info.value.code(), info.value.details()
    code, details = raw([b"abc"])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "3 bytes of raw_input_contents do not fit shape" in details
    code, details = raw([x.tobytes(), x.tobytes()])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents holds 2 tensors for 1 inputs" in details
    res = infer(url, x, model="slow", name="x")  # and it still serves
    assert float(res.as_numpy(res.get_response().outputs[0].name)[0, 0]) == 2.0
