"""A network's eval forward pass run by ONNX Runtime on the CPU: 2.6x faster than eager PyTorch per LiteMedSAM window
on a 2-core AVX2 CPU (2.1-2.3x per whole image) at the same outputs (logits within 4e-5), where neither bfloat16
(emulated there) nor int8 dynamic quantisation (7 %) paid (``docs/results/inference_runtime.md`` in the repository)."""

import io
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

RUNTIME_CHOICES = ("torch", "onnxruntime")


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
    """

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor], owner: nn.Module, image_size: int,
                 threads: int | None = None):
        import onnxruntime

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
        self.session = onnxruntime.InferenceSession(graph.getvalue(), options, providers=["CPUExecutionProvider"])
        self.image_size = image_size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float32 CPU tensor -> ``function``'s output for each window, concatenated: (B, ...)."""
        windows = image.detach().float().contiguous().numpy()
        outputs = [self.session.run(None, {"image": windows[index:index + 1]})[0] for index in range(len(windows))]
        return torch.from_numpy(np.concatenate(outputs))
