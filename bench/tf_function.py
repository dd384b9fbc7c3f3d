"""The cold-start reference: the inference function as TensorFlow serves it, a Keras model behind
POST /predict, in the fewest lines (stdlib `http.server`, one thread; TensorFlow's import and the
model load are the cost being measured, not the server).

    python bench/tf_function.py save MODEL.keras          # build the bench's 30 → 32 → 16 → 2 MLP
    python bench/tf_function.py serve MODEL.keras --port 8090

POST /predict takes `{"instances": [[x1, ..., x30], ...]}` and answers `{"predictions": [[p0, p1], ...]}`.
"""
from __future__ import annotations

import argparse
import json
import os
from http.server import BaseHTTPRequestHandler, HTTPServer

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow's import: no banner on stderr

import numpy as np
import tensorflow as tf

WIDTH, HIDDEN, CLASSES = 30, (32, 16), 2


def save(path: str) -> None:
    keras = tf.keras
    layers = [keras.Input((WIDTH,), name="features")]
    layers += [keras.layers.Dense(units, activation="relu") for units in HIDDEN]
    layers.append(keras.layers.Dense(CLASSES, activation="softmax", name="prob"))
    keras.Sequential(layers).save(path)


def serve(path: str, port: int) -> None:
    tf.config.threading.set_intra_op_parallelism_threads(1)  # as skyfuse's onnxruntime session
    tf.config.threading.set_inter_op_parallelism_threads(1)
    model = tf.keras.models.load_model(path)

    class Predict(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            if self.path != "/predict":
                return self.answer(404, {"error": f"no route POST {self.path}"})
            try:
                doc = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                rows = np.asarray(doc["instances"], dtype=np.float32)
            except (ValueError, KeyError, TypeError) as exc:
                return self.answer(400, {"error": str(exc)})
            self.answer(200, {"predictions": model(rows, training=False).numpy().tolist()})

        def answer(self, status: int, doc: dict) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # quiet, as the skyfuse hosts run (--no-access-log)
            pass

    HTTPServer(("127.0.0.1", port), Predict).serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("save", "serve"))
    parser.add_argument("model")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args(argv)
    save(args.model) if args.action == "save" else serve(args.model, args.port)


if __name__ == "__main__":
    main()
