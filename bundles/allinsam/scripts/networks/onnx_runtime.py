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

    def __init__(self, function: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], owner: nn.Module):
        super().__init__()
        self.function, self.owner = function, owner

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return self.function(*inputs)


class OnnxRuntimeForward:
    """``function`` (float32 tensors -> one float32 tensor or a tuple of them: a forward pass of ``owner`` with its
    current weights) exported once to ONNX in memory and run by an ONNX Runtime CPU session. Nothing is written to
    disk.

    Without ``dynamic_axes`` the trace fixes every shape to the examples' and the inputs' first axis must be 1 there:
    a call with a batch of B runs the session B times (TinyViT's reshapes and the prompt-free decoder's loop over
    the batch are traced with constant sizes). With ``dynamic_axes`` one call runs the whole batch.

    Args:
        function: the eval forward pass to export (traced: no Python branching on tensor values).
        owner: the module whose weights ``function`` reads.
        examples: one example per input, e.g. ``(torch.zeros(1, 3, S, S),)``.
        dynamic_axes: per input name (``input0``, ``input1``, ...; outputs ``output0``, ...) the axes whose size may
            change between calls, as ONNX's exporter takes them; None = every shape fixed.
        outputs: how many tensors ``function`` returns (a tuple when more than one).
        threads: ONNX Runtime's intra-op threads; None uses torch's current count.
        precision: ``float32``, or ``int8``: every MatMul node with a constant weight (the linear layers) quantised
            dynamically, weights int8 per output channel, activations uint8 per call; the attention products between
            two activations, the inputs, the outputs and every other node stay float32.
        spinning: whether the session's idle threads spin waiting for work: False where torch work runs between the
            session's calls (the box annotator), whose cores the spinning threads would take.
    """

    def __init__(self, function: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], owner: nn.Module,
                 examples: tuple[torch.Tensor, ...], dynamic_axes: dict[str, dict[int, str]] | None = None,
                 outputs: int = 1, threads: int | None = None, precision: str = "float32", spinning: bool = True):
        import onnxruntime

        if precision not in ONNX_PRECISION_CHOICES:
            raise ValueError(f"ONNX Runtime precision must be one of {ONNX_PRECISION_CHOICES}, got {precision!r}")
        self.input_names = [f"input{index}" for index in range(len(examples))]
        graph = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            output_names = [f"output{index}" for index in range(outputs)]
            torch.onnx.export(_Traced(function, owner).eval(), tuple(examples), graph, input_names=self.input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes, opset_version=17, dynamo=False)
        self.one_at_a_time = not dynamic_axes
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        model = graph.getvalue() if precision == "float32" else _quantised_int8(graph.getvalue())
        self.session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.precision = precision

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """CPU tensors, one per example -> ``function``'s output(s) as CPU float32 tensors."""
        arrays = [tensor.detach().float().contiguous().numpy() for tensor in inputs]
        if self.one_at_a_time:
            feeds = [{name: array[row : row + 1] for name, array in zip(self.input_names, arrays)}
                     for row in range(len(arrays[0]))]
            runs = [self.session.run(None, feed) for feed in feeds]
            outputs = [np.concatenate(parts) for parts in zip(*runs)]
        else:
            outputs = self.session.run(None, dict(zip(self.input_names, arrays)))
        tensors = tuple(torch.from_numpy(output) for output in outputs)
        return tensors[0] if len(tensors) == 1 else tensors


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
