"""How skyfuse opens an onnxruntime session, serving and fusion alike: on the CPU, with a set
number of intra-op threads, one inter-op thread, no spinning (an idle session burns no CPU), all
graph optimisations, quiet. onnxruntime only: the serving path imports this without onnx.
"""
from __future__ import annotations

from typing import Any


def ort() -> Any:  # the onnxruntime module, which ships no types
    """onnxruntime, imported on first use: a process that imports it and then forks (gunicorn's
    master before its workers) gets children that abort at exit (std::system_error from its
    static thread state), so the entry points must not import it at module level."""
    import onnxruntime

    return onnxruntime


def options(threads: int = 1) -> Any:  # an onnxruntime.SessionOptions
    """The session options: `threads` intra-op threads, no spinning, quiet."""
    rt = ort()
    opts = rt.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = rt.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def open_session(model_bytes: bytes, threads: int = 1) -> Any:  # an onnxruntime.InferenceSession
    """An onnxruntime CPU session over an ONNX model's bytes, with `options(threads)`."""
    return ort().InferenceSession(bytes(model_bytes), sess_options=options(threads),
                                  providers=["CPUExecutionProvider"])
