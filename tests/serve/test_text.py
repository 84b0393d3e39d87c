"""A served bundle that takes text: the Open Inference Protocol's BYTES over HTTP JSON, the binary extension and gRPC
(tritonclient unchanged), and OpenAI's /v1/embeddings (the openai client unchanged) all give the bundle's answer;
hostile text gets a 400 that says what was wrong, and the server goes on serving."""
import base64
import json
import struct

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp

from tests._server import free_port
from torchship import load_bundle

pytestmark = pytest.mark.slow
TEXTS = ["the quick brown fox", "", "naïve café 🚀 日本語", "hello world " * 30]


def test_text_over_every_front_gives_the_bundles_answer(server, st_bundle):
    from openai import OpenAI
    want = load_bundle(st_bundle)(TEXTS)["embedding"]
    port = free_port()
    s = server(st_bundle, "--grpc-port", str(port), "--max-batch-tokens", "64")  # the longest request goes alone
    meta = s.http("GET", "/v2/models/st").json()
    assert meta["inputs"][0] == {"name": "text", "datatype": "BYTES", "shape": [-1]}
    body = {"inputs": [{"name": "text", "shape": [len(TEXTS)], "datatype": "BYTES", "data": TEXTS}]}
    got = s.http("POST", "/v2/models/st/infer", json=body).json()["outputs"][0]
    np.testing.assert_allclose(np.array(got["data"]).reshape(got["shape"]), want, atol=1e-5)
    for binary in (False, True):
        inp = thttp.InferInput("text", [len(TEXTS)], "BYTES")
        inp.set_data_from_numpy(np.array(TEXTS, dtype=object), binary_data=binary)
        out = thttp.InferenceServerClient(s.url).infer("st", [inp]).as_numpy("embedding")
        np.testing.assert_allclose(out, want, atol=1e-5)
    inp = tgrpc.InferInput("text", [len(TEXTS)], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
    np.testing.assert_allclose(tgrpc.InferenceServerClient(f"127.0.0.1:{port}").infer("st", [inp]).as_numpy("embedding"),
                               want, atol=1e-5)
    client = OpenAI(base_url=f"http://{s.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["st"]
    for fmt in ("float", "base64", None):  # None: the client's default asks for base64 and decodes it itself
        res = client.embeddings.create(model="st", input=TEXTS, **({"encoding_format": fmt} if fmt else {}))
        rows = [np.frombuffer(base64.b64decode(d.embedding), "<f4") if fmt == "base64" else d.embedding for d in res.data]
        np.testing.assert_allclose(np.array(rows), want, atol=1e-5)
        assert [d.index for d in res.data] == list(range(len(TEXTS))) and res.usage.prompt_tokens > len(TEXTS)
    one = client.embeddings.create(model="st", input="the quick brown fox").data[0].embedding
    np.testing.assert_allclose(one, want[0], atol=1e-5)
    assert s.metric("torchship_tokens_total") > 0 and s.metric("torchship_processing_duration_seconds_count") >= 8
    assert s.metric("torchship_request_failure_total") == 0
    assert s.metric("torchship_batch_tokens_sum") == s.metric("torchship_tokens_total")  # each real token, once


def _binary_text(items: list[bytes], declared: int | None = None) -> tuple[bytes, dict]:
    raw = b"".join(struct.pack("<I", len(b) if declared is None else declared) + b for b in items)
    head = json.dumps({"inputs": [{"name": "text", "shape": [len(items)], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def test_hostile_text_gets_a_400_that_says_what_and_harms_nothing(server, st_bundle):
    s = server(st_bundle, "--max-items", "4", "--max-item-kb", "1")

    def text(data, shape=None, datatype="BYTES", **extra):
        inputs = [{"name": "text", "shape": shape or [len(data)], "datatype": datatype, "data": data}]
        return s.http("POST", "/v2/models/st/infer", json={"inputs": inputs + extra.get("more", [])})
    cases = [
        (lambda: s.http("POST", "/v2/models/st/infer", content=_binary_text([b"ok", b"\xff\xfe bad"])[0],
                        headers=_binary_text([b"ok", b"\xff\xfe bad"])[1]), "item 1 is not UTF-8"),
        (lambda: s.http("POST", "/v2/models/st/infer", content=_binary_text([b"abc"], declared=99)[0],
                        headers=_binary_text([b"abc"], declared=99)[1]), "says 99 bytes"),
        (lambda: text([], shape=[0]), "no text given"),
        (lambda: text(["a"] * 5), "over the limit of 4"),
        (lambda: text(["x" * 2000]), "item 0 has 2000 bytes, over the limit of 1024"),
        (lambda: text(["a", "b"], shape=[3]), "do not fill its shape"),
        (lambda: text([1.5], datatype="FP32"), "its datatype is BYTES"),
        (lambda: text([{"a": 1}]), "must be a list of strings"),
        (lambda: text(["a"], more=[{"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [2, 3]}]),
         "not both"),
        # a shape far larger than its data: refused before anything is allocated (it tried 292 GiB once)
        (lambda: s.http("POST", "/v2/models/st/infer", json={"inputs": [
            {"name": "input_ids", "shape": [100000000, 8], "datatype": "INT64", "data": [2] * 8},
            {"name": "attention_mask", "shape": [100000000, 8], "datatype": "INT64", "data": [1] * 8}]}),
         "8 values do not fill shape [100000000, 8] (800000000 values)"),
        (lambda: s.http("POST", "/v2/models/st/infer", content=b"{}", headers={"Inference-Header-Content-Length": "12abc"}),
         "must be a number of bytes"),
        (lambda: s.http("POST", "/v1/embeddings", json={"model": "st", "input": {"a": 1}}), "must be a string"),
        (lambda: s.http("POST", "/v1/embeddings", json={"model": "st", "input": []}), "no text given"),
        (lambda: s.http("POST", "/v1/embeddings", json={"model": "st", "input": "a", "dimensions": 8}), "dimensions"),
        (lambda: s.http("POST", "/v1/embeddings", json={"model": "st", "input": [[2, 99999, 3]]}), "ids must lie in"),
        (lambda: s.http("POST", "/v1/embeddings", content=b"not json", headers={"content-type": "application/json"}),
         "does not fit OpenAI's embeddings API"),
    ]
    for send, fragment in cases:
        r = send()
        message = r.json()["error"]
        message = message["message"] if isinstance(message, dict) else message
        assert r.status_code == 400 and fragment in message, (fragment, r.status_code, r.text)
    r = s.http("POST", "/v1/embeddings", json={"model": "nope", "input": "a"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert s.http("GET", "/v1/embeddings").status_code == 405
    assert s.metric("torchship_request_failure_total") == len(cases) + 2  # and the 404 and 405
    # nothing else was harmed: the server is ready and answers
    assert s.http("GET", "/v2/health/ready").status_code == 200
    good = s.http("POST", "/v1/embeddings", json={"model": "st", "input": ["still here"]})
    assert good.status_code == 200 and len(good.json()["data"][0]["embedding"]) == 32
    with httpx.Client() as c:  # a tensor request to the same model still works too
        ids = {"inputs": [{"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [2, 5, 3]},
                          {"name": "attention_mask", "shape": [1, 3], "datatype": "INT64", "data": [1, 1, 1]}]}
        assert c.post(f"http://{s.url}/v2/models/st/infer", json=ids).status_code == 200
