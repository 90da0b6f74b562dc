"""A network's eval forward pass exported to ONNX and run on the CPU by ONNX Runtime or OpenVINO.

ONNX Runtime: 2.6x faster than eager PyTorch per LiteMedSAM window on a 2-core AVX2 CPU (2.1-2.3x per whole image) at
the same outputs (logits within 4e-5), where bfloat16 is emulated and torch's int8 dynamic quantisation gained 7 %;
its own int8 dynamic quantisation of the MatMul nodes is the ``int8`` option. OpenVINO: its ``bfloat16`` option runs
the graph in bfloat16 where the CPU has it natively (AVX-512 BF16, AMX) and in float32 elsewhere; on a 2-core AVX-512
BF16 CPU it ran a window 1.3x faster than ONNX Runtime int8 (``docs/results/inference_runtime.md`` in the
repository)."""

import io
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

RUNTIME_CHOICES = ("torch", "onnxruntime", "openvino")
ONNX_PRECISION_CHOICES = ("float32", "int8")  # ONNX Runtime's
OPENVINO_PRECISION_CHOICES = ("float32", "bfloat16")


def runtime_of(precision: str) -> str:
    """The exported runtime that runs ``precision`` on the CPU: ``openvino`` for bfloat16, else ``onnxruntime``."""
    return "openvino" if precision == "bfloat16" else "onnxruntime"


def check_runtime(option: str, runtime: str, precision: str, torch_precisions: tuple[str, ...] = ("float32",)) -> None:
    """A clear error unless ``runtime`` is one of ``RUNTIME_CHOICES`` and runs ``precision`` (torch: those its caller
    runs, ``torch_precisions``); ``option`` names the pair in the message (e.g. ``encoder`` for ``encoder_runtime``)."""
    if runtime not in RUNTIME_CHOICES:
        raise ValueError(f"{option}_runtime must be one of {RUNTIME_CHOICES}, got {runtime!r}")
    runs = {"torch": torch_precisions, "onnxruntime": ONNX_PRECISION_CHOICES,
            "openvino": OPENVINO_PRECISION_CHOICES}[runtime]
    if precision not in runs:
        raise ValueError(f"{option}_runtime {runtime} runs {option}_precision {' or '.join(runs)}, not {precision!r} "
                         f"(int8: onnxruntime; bfloat16: openvino)")


def exported_forward(runtime: str, function: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], owner: nn.Module,
                     examples: tuple[torch.Tensor, ...], precision: str, spinning: bool = True,
                     **export) -> "OnnxRuntimeForward | OpenVinoForward":
    """``OnnxRuntimeForward`` (``runtime`` onnxruntime) or ``OpenVinoForward`` (openvino) of ``function``;
    ``export``: ``dynamic_axes``, ``outputs``, ``threads``. ``spinning`` is ONNX Runtime's."""
    if runtime == "onnxruntime":
        return OnnxRuntimeForward(function, owner, examples, precision=precision, spinning=spinning, **export)
    return OpenVinoForward(function, owner, examples, precision=precision, **export)


class _Traced(nn.Module):
    """``forward`` of a plain callable, for the exporter (which traces an ``nn.Module``); ``owner``'s weights, which
    the callable reads, become the graph's initializers."""

    def __init__(self, function: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], owner: nn.Module):
        super().__init__()
        self.function, self.owner = function, owner

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return self.function(*inputs)


def exported_onnx(function: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], owner: nn.Module,
                  examples: tuple[torch.Tensor, ...], dynamic_axes: dict[str, dict[int, str]] | None = None,
                  outputs: int = 1) -> bytes:
    """``function`` (float32 tensors -> ``outputs`` float32 tensors: a forward pass of ``owner`` with its current
    weights) traced on ``examples`` into an ONNX graph in memory, inputs ``input0``... and outputs ``output0``...
    Without ``dynamic_axes`` every shape is fixed to the examples'; nothing is written to disk."""
    graph = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(_Traced(function, owner).eval(), tuple(examples), graph,
                          input_names=[f"input{index}" for index in range(len(examples))],
                          output_names=[f"output{index}" for index in range(outputs)], dynamic_axes=dynamic_axes,
                          opset_version=17, dynamo=False)
    return graph.getvalue()


class _ExportedForward:
    """Calls an exported graph with CPU tensors. Without ``dynamic_axes`` the trace fixes every shape to the
    examples' and the inputs' first axis must be 1 there: a call with a batch of B runs the graph B times (TinyViT's
    reshapes and the prompt-free decoder's loop over the batch are traced with constant sizes)."""

    def __init__(self, examples: tuple[torch.Tensor, ...], dynamic_axes: dict | None, precision: str):
        self.input_names = [f"input{index}" for index in range(len(examples))]
        self.one_at_a_time = not dynamic_axes
        self.precision = precision

    def _run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """CPU tensors, one per example -> the function's output(s) as CPU float32 tensors."""
        arrays = [tensor.detach().float().contiguous().numpy() for tensor in inputs]
        if self.one_at_a_time:
            runs = [self._run({name: array[row : row + 1] for name, array in zip(self.input_names, arrays)})
                    for row in range(len(arrays[0]))]
            outputs = [np.concatenate(parts) for parts in zip(*runs)]
        else:
            outputs = self._run(dict(zip(self.input_names, arrays)))
        tensors = tuple(torch.from_numpy(output) for output in outputs)
        return tensors[0] if len(tensors) == 1 else tensors


class OnnxRuntimeForward(_ExportedForward):
    """``function`` (see ``exported_onnx``) exported once and run by an ONNX Runtime CPU session.

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
        super().__init__(examples, dynamic_axes, precision)
        graph = exported_onnx(function, owner, examples, dynamic_axes, outputs)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        model = graph if precision == "float32" else _quantised_int8(graph)
        self.session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def _run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feed)


class OpenVinoForward(_ExportedForward):
    """``function`` (see ``exported_onnx``) exported once and compiled by OpenVINO for the CPU (latency hint).
    ``function``, ``owner``, ``examples``, ``dynamic_axes``, ``outputs`` and ``threads`` as ``OnnxRuntimeForward``'s;
    ``precision``: ``float32``, or ``bfloat16`` (OpenVINO's inference precision hint: bfloat16 arithmetic where the CPU
    has it natively, float32 elsewhere; inputs and outputs stay float32)."""

    def __init__(self, function: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], owner: nn.Module,
                 examples: tuple[torch.Tensor, ...], dynamic_axes: dict[str, dict[int, str]] | None = None,
                 outputs: int = 1, threads: int | None = None, precision: str = "bfloat16"):
        import openvino

        if precision not in OPENVINO_PRECISION_CHOICES:
            raise ValueError(f"OpenVINO precision must be one of {OPENVINO_PRECISION_CHOICES}, got {precision!r}")
        super().__init__(examples, dynamic_axes, precision)
        core = openvino.Core()
        model = core.read_model(model=exported_onnx(function, owner, examples, dynamic_axes, outputs))
        self.compiled = core.compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bfloat16" else "f32"})
        self.request = self.compiled.create_infer_request()

    def _run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.request.infer(feed)
        return [np.array(results[output], dtype=np.float32) for output in self.compiled.outputs]  # a copy: reused


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
