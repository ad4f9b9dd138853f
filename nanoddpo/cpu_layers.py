"""
SD's wide Linear and Conv2d layers on a CPU: the same parameters, keys and numbers (up to float rounding) as nn.Linear
and nn.Conv2d, faster. nanoddpo/model.py builds every network from these two classes; on a GPU, under autocast or
torch.compile, and for the tiny model's narrow layers they are exactly torch's. docs/RESULTS.md has the measurements:

    python -m nanoddpo.bench --threads 2      # ours against diffusers at SD v1-4's size on this CPU
"""
import weakref
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

# On a CPU in float32, SD's wide layers (from 320 features or 512 channels) call oneDNN's kernels directly where torch
# takes slower paths (SD v1-4's full training call at 16 x 16 latents, 2 threads: 2.2 s against 2.8 s):
# - every matmul (Linear's and, below, small maps' convs) is oneDNN's, not the MKL sgemm torch calls, which is slow on
#   few rows: 8 x 11520 @ 11520 x 1280 took 3.6 ms against 5.4 ms, its input gradient 3.7 ms against 7.7 ms;
# - oneDNN copies a weight into its blocked layout on every call, which on few positions (pixels or tokens x batch) costs
#   more than the arithmetic (2560 -> 1280 channels, 3x3 at 2 x 2, batch 2: 21.0 ms a call, 8.4 ms from a kept copy).
#   So a frozen weight (sampling, the reference model, LoRA's base) keeps its copy for calls of at most 256 positions,
#   keyed on the weight tensor, its version counter and storage: an optimizer step or load_state_dict makes a new one
#   (changes through `.data` are not seen). It costs memory (SD v1-4 at 128 px: 3.7 GB; training frees a layer's copy).
# Rounding differs from aten's (oneDNN's blocked sums: relative error 7e-7 per conv, aten's 2e-7). GPUs, autocast,
# torch.compile and the tiny model's narrow layers take torch's own path.
KEPT_MAX_POSITIONS = 256
# oneDNN's ops, as torch's own CPU compiler calls them; False inside torch_layers()
_onednn = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
           and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
_kept = weakref.WeakKeyDictionary()  # layer -> (its weight, the weight's version, blocked copy); not in state_dict


@contextmanager
def torch_layers():
    """Inside this block Linear and Conv2d take torch's own path: FlopCounterMode, for one, counts only aten's ops."""
    global _onednn
    before, _onednn = _onednn, False
    try:
        yield
    finally:
        _onednn = before


def _on_onednn(x, weight):
    return (_onednn and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def _mm(a, b, bias=None):
    """a @ b.T (+ bias) by oneDNN's matmul; b may be a weight in its blocked layout."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


def _kept_blocked_weight(layer, x, reorder):
    """A frozen layer's weight in oneDNN's blocked layout, kept from the last call if unchanged since; None on many
    positions or when the layer trains (a training call drops the kept copy: stale after the step)."""
    weight = layer.weight
    if torch.is_grad_enabled() and (weight.requires_grad or layer.bias is not None and layer.bias.requires_grad):
        _kept.pop(layer, None)
        return None
    if x.numel() > KEPT_MAX_POSITIONS * weight.shape[1]:
        return None
    kept = _kept.get(layer)
    if kept is None or kept[0]() is not weight or kept[1] != (weight._version, weight.data_ptr()):
        kept = (weakref.ref(weight), (weight._version, weight.data_ptr()), reorder(weight.detach()))
        _kept[layer] = kept
    return kept[2]


class _Matmul(torch.autograd.Function):
    """x @ weight.T + bias (from the kept blocked weight if given), and each gradient asked for: one oneDNN matmul."""

    @staticmethod
    def forward(ctx, x, weight, bias, blocked):
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)  # x only for the weight's gradient
        return _mm(x, weight if blocked is None else blocked, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = _mm(grad, weight.t()) if ctx.needs_input_grad[0] else None
        grad = grad.reshape(-1, grad.shape[-1])
        grad_weight = (_mm(grad.t().contiguous(), x.reshape(-1, x.shape[-1]).t().contiguous())
                       if ctx.needs_input_grad[1] else None)
        return grad_x, grad_weight, grad.sum(0) if ctx.needs_input_grad[2] else None, None


class Linear(nn.Linear):
    """nn.Linear, on oneDNN's matmul for a wide float32 layer on a CPU, from a kept blocked weight if frozen (above)."""

    blocked_min_features = 320  # SD's narrowest; the bundled tiny model's widest is 256

    def forward(self, x):
        if self.in_features < self.blocked_min_features or not _on_onednn(x, self.weight):
            return super().forward(x)
        blocked = _kept_blocked_weight(self, x, torch.ops.mkldnn._reorder_linear_weight)
        return _Matmul.apply(x, self.weight, self.bias, blocked)


class _FrozenConv(torch.autograd.Function):
    """A frozen conv's forward from its kept blocked weight; the backward gives the input's gradient only."""

    @staticmethod
    def forward(ctx, x, weight, forward, input_grad):
        ctx.save_for_backward(weight)
        ctx.input_grad, ctx.x_shape = input_grad, x.shape
        return forward(x)

    @staticmethod
    def backward(ctx, grad):
        weight, = ctx.saved_tensors
        return ctx.input_grad(ctx.x_shape, weight, grad), None, None, None


class Conv2d(nn.Conv2d):
    """nn.Conv2d, with CPU float32 shortcuts for SD's 3x3 convs of 512+ channels (same numbers up to float rounding):
    a frozen weight's blocked copy is kept (above; 1x1 convs are left out: kept, they ran 15x slower); on maps of 12 x
    12 or less a trained weight's gradient is one matmul with the unfolded input patches (im2col), half oneDNN's time
    (1280 channels at 6 x 6); from 1024 channels at 6 x 6 or less the forward and the input gradient are matmuls too
    (at 8 x 8 oneDNN's convs are faster). Everywhere else (GPUs, autocast, larger maps, the tiny models): nn.Conv2d."""

    matmul_grad_max_pixels, matmul_grad_min_channels, matmul_all_min_channels, matmul_all_max_pixels = 144, 512, 1024, 36
    blocked_min_features = 512

    def forward(self, x):
        if (self.kernel_size == (1, 1) or self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros"
                or not _on_onednn(x, self.weight)):
            return super().forward(x)
        stride, padding, pixels = self.stride, self.padding, x.shape[-2] * x.shape[-1]
        all_matmul = self.in_channels >= self.matmul_all_min_channels and pixels <= self.matmul_all_max_pixels
        blocked = (_kept_blocked_weight(self, x, lambda w: torch._C._nn.mkldnn_reorder_conv2d_weight(
            w.to_mkldnn(), padding, stride, (1, 1), 1))  # no input shape: the layout depends on the weight alone
            if self.in_channels >= self.blocked_min_features else None)
        if blocked is not None:
            return _FrozenConv.apply(x, self.weight, lambda x: torch.ops.mkldnn._convolution_pointwise(
                x, blocked, self.bias, padding, stride, (1, 1), 1, "none", [], ""),
                lambda shape, w, grad: _conv_input_grad(shape, w, grad, stride, padding, all_matmul))
        if (self.in_channels >= self.matmul_grad_min_channels and pixels <= self.matmul_grad_max_pixels
                and self.weight.requires_grad and torch.is_grad_enabled()):
            return _ConvIm2col.apply(x, self.weight, self.bias, stride, padding, all_matmul)
        return super().forward(x)


def _conv_input_grad(shape, weight, grad, stride, padding, as_matmul):
    """A conv's input gradient: oneDNN's, or as_matmul the output gradient times the weight, folded back to pixels."""
    if not as_matmul:
        return torch.nn.grad.conv2d_input(shape, weight, grad, stride, padding)
    rows = _mm(grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1]), weight.flatten(1).t())  # (B H' W', C_in k k)
    return F.fold(rows.view(shape[0], -1, rows.shape[1]).transpose(1, 2), shape[-2:], weight.shape[-2:],
                  padding=padding, stride=stride)


class _ConvIm2col(torch.autograd.Function):
    """The weight gradient as one matmul with the unfolded input patches (im2col); with `all_matmul` the forward and
    the input gradient too, so no per-call copy of the weight (above; 1280 channels at 2 x 2, batch 2, forward and
    backward: 14 ms against oneDNN's 33). Each product has a row per output pixel (B H' W' rows), so the weight is
    read once: as weight @ patches, torch ran a matmul per image, each reading the whole weight."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, all_matmul):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.all_matmul = stride, padding, all_matmul
        if not all_matmul:
            return F.conv2d(x, weight, bias, stride, padding)
        patches = F.unfold(x, weight.shape[-2:], padding=padding, stride=stride)  # (B, C_in k k, H' W')
        out = _mm(patches.transpose(1, 2).reshape(-1, patches.shape[1]), weight.flatten(1), bias)  # (B H' W', C_out)
        height = (x.shape[-2] + 2 * padding[0] - weight.shape[-2]) // stride[0] + 1
        return out.view(len(x), height, -1, out.shape[1]).permute(0, 3, 1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _conv_input_grad(x.shape, weight, grad, ctx.stride, ctx.padding, ctx.all_matmul)
        if ctx.needs_input_grad[1]:
            patches = F.unfold(x, weight.shape[-2:], padding=ctx.padding, stride=ctx.stride)  # (B, C_in k k, H'W')
            grad_weight = _mm(grad.transpose(0, 1).reshape(grad.shape[1], -1),
                              patches.transpose(0, 1).reshape(patches.shape[1], -1)).view_as(weight)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None, None
