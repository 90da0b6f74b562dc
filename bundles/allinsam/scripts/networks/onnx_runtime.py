"""A network's eval forward pass run by ONNX Runtime on the CPU: 2.6x faster than eager PyTorch per LiteMedSAM window
on a 2-core AVX2 CPU (2.1-2.3x per whole image) at the same outputs (logits within 4e-5), where bfloat16 is emulated
and torch's int8 dynamic quantisation gained 7 %. ONNX Runtime's own int8 dynamic quantisation of the MatMul nodes is
the ``int8`` option (``docs/results/inference_runtime.md`` in the repository)."""

import io
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

RUNTIME_CHOICES = ("torch", "onnxruntime")
ONNX_PRECISION_CHOICES = ("float32", "int8")


class _Traced(nn.Module):
    """``forward`` of a plain callable, for the exporter (which traces an ``nn.Module``); ``owner``'s weights, which
    the callable reads, become the graph's initializers."""

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor], owner: nn.Module):
        super().__init__()
        self.function, self.owner = function, owner

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.function(image)


class OnnxRuntimeForward:
    """``function`` (a (1, 3, S, S) float32 image -> one float32 tensor (1, ...): a forward pass of ``owner`` with its
    current weights) exported once to ONNX in memory and run by an ONNX Runtime CPU session, one window at a time
    (the trace fixes the batch of one: the prompt-free decoder loops over the batch in Python). Nothing is written
    to disk.

    Args:
        function: the eval forward pass to export (traced: no Python branching on tensor values).
        owner: the module whose weights ``function`` reads.
        image_size: S.
        threads: ONNX Runtime's intra-op threads; None uses torch's current count.
        precision: ``float32``, or ``int8``: every MatMul node (the linear layers and the attention products)
            quantised dynamically, weights int8 per output channel, activations uint8 per call; inputs, outputs and
            every other node stay float32.
    """

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor], owner: nn.Module, image_size: int,
                 threads: int | None = None, precision: str = "float32"):
        import onnxruntime

        if precision not in ONNX_PRECISION_CHOICES:
            raise ValueError(f"ONNX Runtime precision must be one of {ONNX_PRECISION_CHOICES}, got {precision!r}")
        graph = io.BytesIO()
        example = torch.zeros(1, 3, image_size, image_size)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(_Traced(function, owner).eval(), (example,), graph, input_names=["image"],
                              output_names=["output"], opset_version=17, dynamo=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        model = graph.getvalue() if precision == "float32" else _quantised_int8(graph.getvalue())
        self.session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.image_size, self.precision = image_size, precision

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float32 CPU tensor -> ``function``'s output for each window, concatenated: (B, ...)."""
        windows = image.detach().float().contiguous().numpy()
        outputs = [self.session.run(None, {"image": windows[index:index + 1]})[0] for index in range(len(windows))]
        return torch.from_numpy(np.concatenate(outputs))


def _quantised_int8(model: bytes) -> bytes:
    """ONNX ``model`` with its MatMul nodes dynamically quantised (int8 weights per channel). ONNX Runtime's quantiser
    reads and writes files only, so it works in a temporary folder that is removed at once."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as folder:
        quantised = Path(folder) / "int8.onnx"
        quantize_dynamic(onnx.load_from_string(model), quantised, op_types_to_quantize=["MatMul"],
                         per_channel=True, weight_type=QuantType.QInt8)
        return quantised.read_bytes()
