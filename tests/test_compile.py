"""torch.compile and the training step: one graph, and no recompiles from step to step.

A recompile every step would make --compile slower than eager, and TORCH_LOGS=recompiles is
how a user would notice. Here a counting backend stands in for inductor: graph capture and
its guards (what decides a recompile) are dynamo's work, the same whatever backend follows,
so the check runs on a CPU in seconds.
"""
import torch

from minisnr.io.data import ImageSet, InMemoryLoader
from minisnr.model import build_model
from minisnr.tools.bench import train_step
from minisnr.rf import NoiseSampler
from minisnr.io.device import autocast_context, make_grad_scaler


def test_compiled_train_step_is_one_graph_and_never_recompiles():
    """Six train steps with new images, labels and t: the model compiles once, as a single graph."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = build_model("tiny", num_classes=3)
    ema = build_model("tiny", num_classes=3).requires_grad_(False)
    compiled = torch.compile(model, backend=counting_backend, fullgraph=True)   # fullgraph: a graph break raises
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    loader = InMemoryLoader(ImageSet(images, torch.arange(16) % 3, ["a", "b", "c"]), 4, device, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0, foreach=True)
    scaler, ctx, noise = make_grad_scaler(device, "fp32"), autocast_context(device, "fp32"), NoiseSampler()
    model.train()
    counts = []
    try:
        for _ in range(6):
            x0, y = loader.next()
            loss = train_step(compiled, optimizer, scaler, ctx, x0, y, noise(len(y)), 1.0, list(model.parameters()),
                              list(ema.parameters()), ema_decay=0.99)
            counts.append(len(graphs))
    finally:
        torch._dynamo.reset()
    assert torch.isfinite(loss)
    assert counts == [1] * 6, f"graphs compiled after each step: {counts}; run with TORCH_LOGS=recompiles to see why"
