"""An OpenAI-compatible front: ``POST /v1/embeddings`` and ``GET /v1/models``, so that the ``openai`` client (and
whatever speaks its embeddings API) works unchanged against a bundle that takes text.

One more front on the server's one request path: the same admission, limits, processing, batching and metrics as
the Open Inference Protocol's infer; only the wire format differs. Errors come in OpenAI's shape
(``{"error": {"message", "type", "param", "code"}}``) with the same HTTP statuses as the protocol's.
"""
from __future__ import annotations

import base64
from typing import Awaitable, Callable, Literal

import msgspec
import numpy as np
import orjson

from ..errors import BadRequest, NotFound, ServeError
from .raw import Decoded, RawInput, items

_INPUTS = (msgspec.json.Decoder(str), msgspec.json.Decoder(list[str]), msgspec.json.Decoder(list[list[int]]),
           msgspec.json.Decoder(list[int]))


class EmbeddingsRequest(msgspec.Struct):
    input: msgspec.Raw
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


_REQUEST = msgspec.json.Decoder(EmbeddingsRequest)


def error(status: int, message: str, headers: dict | None = None, param: str | None = None):
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return status, orjson.dumps(body), {"content-type": "application/json", **(headers or {})}


def parse(body: bytes, limits) -> tuple[EmbeddingsRequest, list[str] | None, list[list[int]] | None]:
    """The request, and its input as strings (texts, or images in base64) or as token arrays (a string alone is one
    item, a flat list of integers one token array)."""
    try:
        req = _REQUEST.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise BadRequest(f"the request does not fit OpenAI's embeddings API: {exc}") from None
    if req.dimensions is not None:
        raise BadRequest("'dimensions' is not supported: the bundle gives the model's own embedding size")
    raw = bytes(req.input)
    for i, decoder in enumerate(_INPUTS):
        try:
            value = decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError):
            continue
        if i in (0, 1):
            values = [value] if i == 0 else value
            if not values:
                raise BadRequest("input 'input': no text given (an empty list)")
            return req, values, None
        ids = value if i == 2 else [value]
        if not ids:
            raise BadRequest("input 'input': an empty list")
        if len(ids) > limits.max_items:
            raise BadRequest(f"input 'input': {len(ids)} items, over the limit of {limits.max_items} a request")
        return req, None, ids
    raise BadRequest("'input' must be a string, a list of strings, a list of token ids or a list of token-id lists")


def answer(req: EmbeddingsRequest, outputs: dict, name: str, output: str | None, tokens: int):
    """OpenAI's embeddings answer from the model's outputs (``output``: the one that is the embedding, if known)."""
    outputs = {k: v for k, v in outputs.items() if k not in ("label", "score")}
    if output is None:
        if len(outputs) != 1:
            raise BadRequest(f"model {name!r} gives {list(outputs)}, not one embedding: use the Open Inference Protocol")
        output = next(iter(outputs))
    emb = np.asarray(outputs[output], dtype=np.float32)
    if emb.ndim != 2:
        raise BadRequest(f"model {name!r} gives {output!r} of shape {list(emb.shape)}, not one vector an item: not an "
                         "embedding model (optimize a sentence-embedding source, e.g. a sentence-transformers directory)")
    if req.encoding_format == "base64":
        data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(row.astype("<f4").tobytes()).decode()}
                for i, row in enumerate(emb)]
    else:
        data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(emb)]
    body = {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return 200, orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), {"content-type": "application/json"}


async def embeddings(server, read: Callable[[], Awaitable[bytes]]):
    """POST /v1/embeddings: ``read`` the body (within the server's limits) and parse it (the model's name is inside
    it), admit, then the one request path; the answer in OpenAI's shape."""
    try:
        req, strings, ids = parse(await read(), server.config.raw)
    except ServeError as exc:
        server.count(None, exc)
        return error(exc.status, str(exc), exc.headers)
    try:
        e = server.find(req.model, None)
    except NotFound as exc:
        server.count(None, exc)
        return error(404, str(exc), param="model")
    if e.labels is not None:
        exc = BadRequest(f"model {e.name!r} is a classifier: ask it through the Open Inference Protocol's infer "
                         f"(/v2/models/{e.name}/infer), whose answer carries label and score")
        server.count(e, exc)
        return error(400, str(exc), param="model")
    refused = server.cannot_take(e)
    if refused is not None:
        server.count(e, refused)
        return error(refused.status, str(refused), refused.headers)

    async def decode(e) -> Decoded:
        if strings is None:
            return Decoded(req, ids=ids)
        kind = e.raw.kind if e.raw is not None else "text"  # an image model takes base64 images
        return Decoded(req, items=items(strings, len(strings), RawInput("input", kind), server.config.raw))
    try:
        e, d, outputs = await server.submit(e, req.model, None, decode)
        result = answer(req, outputs, e.name, e.embedding, e.pipeline.tokens(d.feeds) if e.pipeline else 0)
    except ServeError as exc:
        server.count(e, exc)
        return error(exc.status, str(exc), exc.headers)
    e.metrics.success.inc()
    return result


def models(server):
    """GET /v1/models: every model served, in OpenAI's list shape."""
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "torchship"} for name in sorted(server.models)]
    return 200, orjson.dumps({"object": "list", "data": data}), {"content-type": "application/json"}
