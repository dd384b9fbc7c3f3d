"""skyfuse's ML core: plain data in, plain data out; no cloud, no bus.

- `skyfuse.ml.data`   (numpy, scikit-learn): `Dataset`, CSV load/save, train/validation/test split,
  shard partitioning (iid, stratified, kmeans, label-skew), the bundled sample datasets, pooled
  feature statistics.
- `skyfuse.ml.model`  (TensorFlow/Keras): `ModelSpec`, `build`, `train`, `save`/`load`.
- `skyfuse.ml.export` (TensorFlow, tf2onnx): Keras model -> ONNX bytes, parity check, `describe`.
- `skyfuse.ml.fusion` (onnx, onnxruntime, numpy; never TensorFlow): fuse member ONNX models into
  one ONNX graph (wavg, vote, confidence, fedavg), the numpy reference `combine`, and serving
  helpers (`Session`, `predict`, `accuracy`, `lineage`).

Import the submodule you need; this package imports nothing heavy.
"""
