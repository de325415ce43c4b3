"""The encoder's convolutions: SmallMapConv2d computes an output of at most 2x2 pixels as matrix products, and
must stay the same function (outputs and every gradient) as nn.Conv2d and torchvision's ResNet18, with the same
state-dict keys."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from facessl.common.models import SmallMapConv2d, build_encoder

# (in, out, kernel, stride, padding, input size, bias, matrix-product path): the path is taken where the output
# has at most 4 pixels and the input fits in the kernel
SHAPES = [
    (16, 24, 3, 1, 1, 1, False, True),
    (16, 24, 3, 2, 1, 2, True, True),
    (3, 8, 7, 2, 3, 1, False, True),
    (16, 24, 1, 1, 0, 1, True, True),
    (16, 24, 3, 1, 1, 2, False, True),
    (16, 24, 3, 2, 1, 3, True, True),
    (16, 24, 3, 2, 0, 3, False, True),
    (16, 24, 3, 1, 0, 3, False, True),
    # a 1x1 kernel whose padding gives output pixels that read only zeros (the bias alone)
    (16, 24, 1, 2, 1, 1, True, True),
    (16, 24, 3, 1, 1, 3, False, False),
    (16, 24, 1, 2, 0, 2, False, False),
    (16, 24, 3, 2, 1, 4, False, False),
    (3, 8, 7, 2, 3, 24, True, False),
]


def pair(cin, cout, k, stride, padding, bias):
    """An nn.Conv2d and a SmallMapConv2d copy of it (the same weights)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)
    return conv, SmallMapConv2d.from_conv(copy.deepcopy(conv))


@pytest.mark.parametrize(("cin", "cout", "k", "stride", "padding", "size", "bias", "matmul"), SHAPES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_small_map_conv_is_the_same_function_as_conv2d(cin, cout, k, stride, padding, size, bias, matmul, layout):
    conv, fast = pair(cin, cout, k, stride, padding, bias)
    assert type(fast) is SmallMapConv2d and list(fast.state_dict()) == list(conv.state_dict())
    assert (fast._windows(size, size) is not None) == matmul
    conv.double()
    fast.double()
    x = torch.randn(5, cin, size, size, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    grad_out = torch.randn_like(conv(x))
    results = []
    for layer in (conv, fast):
        layer.zero_grad()
        x.grad = None
        y = layer(x)
        y.backward(grad_out)
        grads = [x.grad, layer.weight.grad] + ([layer.bias.grad] if bias else [])
        results.append((y.detach(), [g.clone() for g in grads]))
    (y_ref, grads_ref), (y_fast, grads_fast) = results
    assert y_fast.shape == y_ref.shape
    # a 1x1 input is both layouts at once: its output is NCHW
    assert y_fast.is_contiguous(memory_format=layout if size > 1 else torch.contiguous_format)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-10, atol=1e-10)
    for g_fast, g_ref in zip(grads_fast, grads_ref):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-10)


def test_small_map_conv_follows_bf16_autocast_like_conv2d():
    conv, fast = pair(16, 24, 3, 1, 1, False)
    x = torch.randn(4, 16, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y_fast = conv(x), fast(x)
    assert y_fast.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y_fast.float(), y_ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "size"),
    # windows wholly in the padding: above, and (stride 3) below the input
    [((2, 2), (3, 1), (3, 0), (2, 2)), ((1, 3), (3, 1), (2, 1), (1, 2)), ((3, 3), (5, 1), (4, 1), (2, 2))],
)
def test_small_map_conv_with_padding_beyond_the_kernel(kernel, stride, padding, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel, stride=stride, padding=padding).double()
    fast = SmallMapConv2d.from_conv(copy.deepcopy(conv))
    x = torch.randn(2, 2, *size, dtype=torch.float64)
    assert fast._windows(*size) is not None
    torch.testing.assert_close(fast(x), conv(x), rtol=1e-10, atol=1e-10)


def test_small_map_conv_takes_unbatched_input_and_refuses_other_ranks_like_conv2d():
    conv, fast = pair(16, 24, 3, 1, 1, True)
    x = torch.randn(16, 2, 2)
    torch.testing.assert_close(fast(x), conv(x))
    with pytest.raises(RuntimeError, match="4D"):
        fast(torch.randn(1, 16, 4, 2, 2))


def test_small_map_conv_takes_an_empty_batch_like_conv2d():
    conv, fast = pair(16, 24, 3, 1, 1, True)
    x = torch.randn(0, 16, 2, 2)
    assert fast(x).shape == conv(x).shape == (0, 24, 2, 2)


def test_a_convolution_the_fast_path_does_not_cover_keeps_conv2d_errors():
    _, fast = pair(16, 24, 3, 1, 0, False)
    with pytest.raises(RuntimeError):
        # a 3x3 kernel without padding on a 1x1 input has no output at all
        fast(torch.randn(2, 16, 1, 1))


@pytest.mark.parametrize("size", [24, 32, 64])
def test_the_encoder_is_torchvisions_resnet18_with_the_same_keys(size):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    reference.fc = nn.Identity()
    encoder = build_encoder()
    assert list(encoder.state_dict()) == list(reference.state_dict())
    encoder.load_state_dict(reference.state_dict(), strict=True)
    assert sum(isinstance(m, SmallMapConv2d) for m in encoder.modules()) == 20
    # float64, so that the summation order of the two paths cannot hide a wrong gradient in rounding
    reference, encoder = reference.double(), encoder.double()
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    outputs = []
    for net in (reference, encoder):
        net.zero_grad()
        y = net(x)
        y.square().mean().backward()
        outputs.append((y.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}))
    (y_ref, grads_ref), (y_enc, grads_enc) = outputs
    torch.testing.assert_close(y_enc, y_ref, rtol=1e-9, atol=1e-9)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads_enc[name], grad, rtol=1e-9, atol=1e-9, msg=name)
