"""CUDA-graph capture of a model for one fixed input shape (low-latency inference)."""
from __future__ import annotations

from typing import Callable

import torch


def capture(model: torch.nn.Module, example: torch.Tensor, *, warmup: int = 3) -> Callable[[torch.Tensor], torch.Tensor]:
    """Capture ``model(example)`` in a CUDA graph and return a function that replays it.

    The returned ``run(x)`` copies ``x`` (same shape, dtype and device as ``example``) into
    the graph's static input, replays the graph and returns the static output tensor,
    which the next call overwrites (clone it to keep it). Launch overhead drops to one graph
    launch, which is what makes batch-1 latency low. Capture in the mode you will run
    (``model.eval()`` and ``torch.inference_mode()``/``no_grad`` for inference); the warm-up
    calls run first so that autotuning, folded-weight caches and cuDNN plans exist before
    capture (nothing in the forward synchronises with the host).
    """
    if example.device.type != "cuda":
        raise ValueError(f"capture: CUDA graphs need a CUDA input, got {example.device}")
    # A normal (not inference-mode) tensor, so that run() may refill it outside inference_mode.
    with torch.inference_mode(False):
        static_in = example.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            model(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(static_in)

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape != static_in.shape or x.dtype != static_in.dtype or x.device != static_in.device:
            raise ValueError(f"capture: the graph was captured for {tuple(static_in.shape)} {static_in.dtype} on "
                             f"{static_in.device}, got {tuple(x.shape)} {x.dtype} on {x.device}")
        static_in.copy_(x)
        graph.replay()
        return static_out

    run.graph = graph
    return run
