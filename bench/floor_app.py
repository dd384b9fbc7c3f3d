"""The floor of HTTP inference: the least an ASGI app can do to serve the model, under uvicorn.

    FLOOR_MODEL=model.onnx uvicorn floor_app:app --app-dir bench --host 127.0.0.1 --port 8090 \
        --loop uvloop --http httptools --lifespan off

Every request, whatever its method or path: read the body, parse it with orjson, run the session
(one onnxruntime thread), answer the probabilities with orjson. No routing, validation, metrics or
model swaps: what skyfuse's hosts do on top of this is what `bench/http_serving.py` measures.
"""
import os

import numpy as np
import onnxruntime as ort
import orjson


def _session() -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(os.environ["FLOOR_MODEL"], options, providers=["CPUExecutionProvider"])


SESSION = _session()
INPUT = SESSION.get_inputs()[0].name
HEADERS = [(b"content-type", b"application/json")]


async def app(scope, receive, send):
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    rows = np.array(orjson.loads(body)["instances"], dtype=np.float32)
    probabilities = SESSION.run(None, {INPUT: rows})[0]
    answer = orjson.dumps({"predictions": probabilities}, option=orjson.OPT_SERIALIZE_NUMPY)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": answer})
