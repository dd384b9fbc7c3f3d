"""skyfuse's ML core: plain data in, plain data out; no cloud, no bus.

- `skyfuse.ml.data`   (numpy, scikit-learn): `Dataset`, CSV load/save, train/validation/test split,
  shard partitioning (iid, stratified, kmeans, label-skew), the bundled sample datasets, pooled
  feature statistics.
- `skyfuse.ml.model`  (TensorFlow/Keras): `ModelSpec`, `build`, `train`, `save`/`load`, and
  `load_user_model`/`check_user_model` for a user's own model (`skyfuse train --model`).
- `skyfuse.ml.export` (TensorFlow, tf2onnx): Keras model -> ONNX bytes, parity check, `describe`.
- `skyfuse.ml.fusion` (onnx, onnxruntime, numpy; never TensorFlow): fuse member ONNX models into
  one ONNX graph (wavg, vote, confidence, fedavg), the numpy reference `combine`, and serving
  helpers (`Session`, `predict`, `accuracy`, `lineage`); `with_parameters` for a server step's model.
- `skyfuse.ml.federated` (numpy): the server strategies over weight lists (FedAvg, FedProx, FedAdam,
  FedYogi), their state as bytes, and `FUSIONS`, every fusion a run may ask for.

Import the submodule you need; this package imports nothing heavy.
"""
