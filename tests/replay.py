"""``GraphedStep``'s contract on the CPU, for the tests of its callers (the pretraining app, the
benchmark, torchrun runs through tests/pretrain_replayed.py): a CUDA graph needs a GPU."""

import torch

from spark_sparse.model.graphed import GraphedStep
from spark_sparse.model.spark import SparK


class EagerReplay(GraphedStep):
    """``GraphedStep``'s contract on the CPU, for the caller's side of it: the capture runs the step
    once and restores the buffers (as the real warm-up and capture leave them), and each replay
    runs the step again eagerly on the captured tensors, writing its gradients into the tensors
    the capture made, as a CUDA graph's replay does; it fails where the caller replaced them."""

    def __init__(self, model: SparK, forward, images: torch.Tensor, plan, backward: bool = True, warmup: int = 3):
        model.copy_plan_(plan, plan)
        self.model, self.forward, self.backward, self.plan = model, forward, backward, plan
        self.images = images.clone()
        kept = [b.clone() for b in model.buffers()]
        model.zero_grad(set_to_none=True)
        self.output = self._step()
        self.grads = [p.grad for p in model.parameters()]
        for buffer, value in zip(model.buffers(), kept):
            buffer.copy_(value)
        self.graph = self

    def replay(self) -> None:
        for p, captured in zip(self.model.parameters(), self.grads):
            assert p.grad is captured, "a replay writes the captured gradients, no longer the parameters'"
            if captured is not None:
                captured.zero_()  # the backward below adds to them
        self.output.copy_(self._step())
