"""The row operators that trade a stored tensor for a recomputation compute exactly what the
plain torch expressions compute, and keep no more than they promise for backward."""

import pytest
import torch
from torch import nn

from spark_sparse.sparse.norm_act import batch_norm_act
from spark_sparse.sparse.rowwise import ImageScale

ACTS = [nn.SiLU(), nn.Hardswish(), nn.ReLU(), nn.GELU(), nn.Identity()]  # GELU, Identity: via autograd


def saved_row_tensors(fn, rows: int) -> int:
    """How many tensors with ``rows`` rows the graph of ``fn()`` keeps for backward."""
    count = 0

    def pack(t):
        nonlocal count
        count += t.dim() == 2 and t.shape[0] == rows
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return count


def grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("act", ACTS, ids=lambda a: type(a).__name__)
def test_batch_norm_act_equals_batch_norm_then_activation(act, momentum):
    torch.manual_seed(0)
    x = torch.randn(300, 8, dtype=torch.float64) * 3 + 1
    ours, ref = (nn.BatchNorm1d(8, momentum=momentum).double() for _ in range(2))
    with torch.no_grad():
        for bn in (ours, ref):
            bn.weight.copy_(torch.linspace(0.5, 2, 8))
            bn.bias.copy_(torch.linspace(-1, 1, 8))
    for train in (True, True, False):  # two steps move the running statistics, then eval
        ours.train(train), ref.train(train)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        got, want = batch_norm_act(xa, ours, act), act(ref(xb))
        assert torch.allclose(got, want, atol=1e-12)
        for a, b in zip(grads(got, [xa, ours.weight, ours.bias]), grads(want, [xb, ref.weight, ref.bias])):
            assert torch.allclose(a, b, atol=1e-10)
        for name, buf in ref.named_buffers():
            assert torch.equal(ours.get_buffer(name), buf), name


def test_batch_norm_act_keeps_only_its_input_for_backward():
    x = torch.randn(300, 8, requires_grad=True)
    bn = nn.BatchNorm1d(8)
    assert saved_row_tensors(lambda: nn.SiLU()(bn(x)), 300) == 2  # the norm's input and output
    assert saved_row_tensors(lambda: batch_norm_act(x, bn, nn.SiLU()), 300) == 1


def test_image_scale_equals_gathered_gates_and_keeps_no_gathered_copy():
    torch.manual_seed(0)
    image = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    got, want = ImageScale.apply(x, scale, image), x * scale[image]
    assert torch.allclose(got, want)
    for a, b in zip(grads(got, [x, scale]), grads(want, [x, scale])):
        assert torch.allclose(a, b)
    assert saved_row_tensors(lambda: x * scale[image], 9) == 2
    assert saved_row_tensors(lambda: ImageScale.apply(x, scale, image), 9) == 1
