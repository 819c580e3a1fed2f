"""CUDA-graph replay of a whole sampler call (prior loop and decoder) for one batch size.

Sampling launches hundreds of small kernels (T UNet calls, then the ladder); capturing the
sequence once and replaying it removes the launch overhead. CUDA only.
"""
from __future__ import annotations

import torch


class GraphSampler:
    """Captures ``sample()`` (a no-argument callable returning images) in a CUDA graph;
    ``run()`` replays it.

    The captured draws come from the CUDA default generator, whose offset CUDA graphs
    advance on every replay, so each replay gives fresh samples. Outputs are cloned so that
    later replays do not overwrite what a caller holds.
    """

    def __init__(self, sample, warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("GraphSampler needs a CUDA device")
        self.graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):  # lazy init (autotuning, allocator pools) off the graph
                sample()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.static_out = sample()

    def run(self) -> torch.Tensor:
        self.graph.replay()
        return self.static_out.clone()
