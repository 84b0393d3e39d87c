"""A served classifier that takes images: encoded files as BYTES over HTTP JSON (base64), the binary extension and
gRPC, answered with labels and scores (tritonclient unchanged); bad images get a 400 that says why, and the server
goes on serving."""
import base64

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp

from tests._server import free_port
from tests.processing.test_image import _png_header
from torchship import load_bundle
from torchship.processing.build import sample_images

pytestmark = pytest.mark.slow


def test_images_over_every_front_are_answered_with_labels(server, vit_bundle):
    files, _ = sample_images()
    want = load_bundle(vit_bundle)(files, top_k=2)
    port = free_port()
    s = server(vit_bundle, "--grpc-port", str(port))
    meta = s.http("GET", "/v2/models/vit").json()
    assert meta["inputs"][0] == {"name": "image", "datatype": "BYTES", "shape": [-1]}
    assert {"name": "label", "datatype": "BYTES", "shape": [-1]} in meta["outputs"]
    body = {"inputs": [{"name": "image", "shape": [len(files)], "datatype": "BYTES",
                        "data": [base64.b64encode(f).decode() for f in files]}], "parameters": {"top_k": 2}}
    got = {o["name"]: o for o in s.http("POST", "/v2/models/vit/infer", json=body).json()["outputs"]}
    assert got["label"]["shape"] == [len(files), 2] and got["label"]["data"] == want["label"].reshape(-1).tolist()
    np.testing.assert_allclose(got["score"]["data"], want["score"].reshape(-1), rtol=1e-4)
    for binary in (False, True):
        inp = thttp.InferInput("image", [len(files)], "BYTES")
        inp.set_data_from_numpy(np.array(files, dtype=object), binary_data=True)
        outs = [thttp.InferRequestedOutput(n, binary_data=binary) for n in ("label", "score", "logits")]
        res = thttp.InferenceServerClient(s.url).infer("vit", [inp], outputs=outs)
        assert [x.decode() if isinstance(x, bytes) else x for x in res.as_numpy("label")] == want["label"][:, 0].tolist()
        np.testing.assert_allclose(res.as_numpy("logits"), want["logits"], atol=1e-4)
    inp = tgrpc.InferInput("image", [len(files)], "BYTES")
    inp.set_data_from_numpy(np.array(files, dtype=object))
    res = tgrpc.InferenceServerClient(f"127.0.0.1:{port}").infer("vit", [inp])
    assert [x.decode() for x in res.as_numpy("label")] == want["label"][:, 0].tolist()
    np.testing.assert_allclose(res.as_numpy("score"), want["score"][:, 0], rtol=1e-4)
    assert s.metric("torchship_processing_duration_seconds_count") >= 4
    assert s.metric("torchship_request_failure_total") == 0


def test_bad_images_get_a_400_that_says_why_and_harm_nothing(server, vit_bundle):
    files, _ = sample_images()
    s = server(vit_bundle, "--max-image-mb", "0.01")  # 10 KB

    def send(items, **params):
        inputs = [{"name": "image", "shape": [len(items)], "datatype": "BYTES", "data": items}]
        return s.http("POST", "/v2/models/vit/infer", json={"inputs": inputs, **({"parameters": params} if params else {})})
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    cases = [
        (send([b64(b"not an image at all")]), "item 0 is not an image"),
        (send([b64(files[0]), b64(_png_header(100_000, 100_000))]), "item 1 is over the limit of"),
        (send(["***not base64***"]), "item 0 is not base64"),
        (send([b64(b"\0" * 20_000)]), "over the limit of 10,485"),
        (send([]), "no image given"),
        (send([b64(files[0])], top_k="all"), "parameter 'top_k' must be an integer"),
        (s.http("POST", "/v1/embeddings", json={"model": "vit", "input": b64(files[0])}), "is a classifier"),
    ]
    for r, fragment in cases:
        message = r.json()["error"]
        message = message["message"] if isinstance(message, dict) else message
        assert r.status_code == 400 and fragment in message, (fragment, r.status_code, r.text)
    assert s.http("GET", "/v2/health/ready").status_code == 200
    ok = send([b64(files[0])])
    assert ok.status_code == 200 and ok.json()["outputs"][-2]["name"] == "label"
