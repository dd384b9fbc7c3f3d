"""The peer: BentoML serving the bench's ONNX model, a sync API, as BentoML's docs show it.

Run by `bench/http_serving.py` from its own venv (build/bench/bentoml):

    PEER_MODEL=model.onnx PEER_WORKERS=1 build/bench/bentoml/bin/bentoml serve peer_bentoml:Classifier \
        --working-dir bench --host 127.0.0.1 --port 3000

POST /predict {"instances": [[...], ...]} answers the same document as skyfuse's /predict (records
format): the class and the class probabilities of each row. One onnxruntime thread, like every
server in the comparison; the access log is off, as it is on skyfuse's hosts.
"""
import json
import os

import bentoml
import numpy as np
import onnxruntime as ort


@bentoml.service(workers=int(os.environ.get("PEER_WORKERS", "1")), logging={"access": {"enabled": False}})
class Classifier:
    def __init__(self) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(os.environ["PEER_MODEL"], options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        lineage = json.loads(self.session.get_modelmeta().custom_metadata_map.get("skyfuse.lineage", "{}"))
        self.labels = [str(c) for c in lineage.get("classes", [])]

    @bentoml.api
    def predict(self, instances: list[list[float]]) -> dict:
        probabilities = self.session.run(None, {self.input: np.asarray(instances, dtype=np.float32)})[0]
        labels = self.labels or [str(i) for i in range(probabilities.shape[1])]
        return {"model_version": "bench", "predictions": [
            {"class": labels[int(row.argmax())], "probabilities": dict(zip(labels, row.tolist(), strict=True))}
            for row in probabilities]}
