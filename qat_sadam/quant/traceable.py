"""Traceable forms of the modules torch.fx cannot see into.

prepare_qat quantizes what the traced graph shows: Linear modules it calls and the matmuls between
activations. ``nn.MultiheadAttention`` is a leaf of torch.fx, ``F.scaled_dot_product_attention``
one opaque call, and torchvision's Swin attention a wrapped function that reads the weights of its
Linear modules directly. Here each becomes the same computation in visible parts (Linear modules,
matmul, softmax), with the same weights, before tracing. Swin's window partition and merge stay
wrapped functions (their padding depends on the input size), which move values without changing
them: they are grid-preserving ops for the placement (graph.py). timm's BatchNormAct2d (a
BatchNorm2d with its activation inside) becomes BatchNorm2d, dropout, activation, so that the
BatchNorm folds into its conv; timm's Conv2dSame becomes a wrapped 'SAME' padding and a Conv2d.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2


class DecomposedMultiheadAttention(nn.Module):
    """nn.MultiheadAttention as q/k/v Linear layers, two matmuls and a softmax (no masks, no
    bias_k/bias_v); returns (output, None) like ``need_weights=False``."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("MultiheadAttention with bias_k/bias_v or add_zero_attn is not supported by prepare_qat")
        e, bias = mha.embed_dim, mha.in_proj_bias is not None
        self.num_heads, self.head_dim, self.batch_first, self.dropout = (
            mha.num_heads,
            mha.head_dim,
            mha.batch_first,
            mha.dropout,
        )
        self.q_proj, self.k_proj, self.v_proj = (
            nn.Linear(e, e, bias),
            nn.Linear(mha.kdim, e, bias),
            nn.Linear(mha.vdim, e, bias),
        )
        with torch.no_grad():
            weights = (
                mha.in_proj_weight.chunk(3)
                if mha._qkv_same_embed_dim
                else (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            )
            for proj, w, b in zip(
                (self.q_proj, self.k_proj, self.v_proj), weights, mha.in_proj_bias.chunk(3) if bias else (None,) * 3
            ):
                proj.weight.copy_(w)
                if b is not None:
                    proj.bias.copy_(b)
        self.out_proj = nn.Linear(e, e, mha.out_proj.bias is not None)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())

    def _heads(self, x: torch.Tensor, b, n) -> torch.Tensor:
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ValueError("MultiheadAttention with a mask is not supported by prepare_qat")
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, n, s = query.shape[0], query.shape[1], key.shape[1]
        q = self._heads(self.q_proj(query), b, n) * (self.head_dim**-0.5)
        k, v = self._heads(self.k_proj(key), b, s), self._heads(self.v_proj(value), b, s)
        attn = F.dropout(torch.matmul(q, k.transpose(-2, -1)).softmax(dim=-1), self.dropout, self.training)
        out = self.out_proj(torch.matmul(attn, v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """F.scaled_dot_product_attention in visible ops (matmul, softmax), for tracing."""
    if is_causal or enable_gqa:
        raise ValueError("scaled_dot_product_attention with is_causal or enable_gqa is not supported by prepare_qat")
    q = query * (scale if scale is not None else query.shape[-1] ** -0.5)
    attn = torch.matmul(q, key.transpose(-2, -1))
    if attn_mask is not None:
        attn = attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn + attn_mask
    return torch.matmul(F.dropout(attn.softmax(dim=-1), dropout_p), value)


_EINSUM = torch.einsum


def einsum(equation: str, *operands):
    """torch.einsum of two operands that is a batched matrix product (one contracted index, at most
    one free index per operand) as permutes and a matmul, which ORT runs as QLinearMatMul (it has
    no integer Einsum); any other equation is torch.einsum itself."""
    operands = tuple(operands[0]) if len(operands) == 1 and isinstance(operands[0], (list, tuple)) else operands
    spec = equation.replace(" ", "")
    if "->" not in spec or "." in spec or len(operands) != 2 or spec.count(",") != 1:
        return _EINSUM(equation, *operands)
    (a, b), out = spec.split("->")[0].split(","), spec.split("->")[1]
    batch = [c for c in out if c in a and c in b]
    contracted = [c for c in a if c in b and c not in out]
    a_free, b_free = [c for c in a if c not in b], [c for c in b if c not in a]
    if (
        len(contracted) != 1
        or len(a_free) > 1
        or len(b_free) > 1
        or len(set(a)) < len(a)
        or len(set(b)) < len(b)
        or sorted(out) != sorted(batch + a_free + b_free)
    ):
        return _EINSUM(equation, *operands)
    x = operands[0].permute([a.index(c) for c in batch + a_free + contracted])
    y = operands[1].permute([b.index(c) for c in batch + contracted + b_free])
    r = torch.matmul(x if a_free else x.unsqueeze(-2), y if b_free else y.unsqueeze(-1))
    r = r if b_free else r.squeeze(-1)
    r = r if a_free else r.squeeze(-2 if b_free else -1)
    order = batch + a_free + b_free
    return r.permute([order.index(c) for c in out])


def _pads(x: torch.Tensor, window: list[int]) -> tuple[int, int]:
    return (window[0] - x.shape[1] % window[0]) % window[0], (window[1] - x.shape[2] % window[1]) % window[1]


def _shift(padded_hw: tuple[int, int], window: list[int], shift: list[int]) -> list[int]:
    # A window as large as the feature map does not shift (torchvision's rule).
    return [0 if window[i] >= padded_hw[i] else shift[i] for i in range(2)]


def window_partition(x: torch.Tensor, window: list[int], shift: list[int]) -> torch.Tensor:
    """(B, H, W, C) -> (B * windows, window area, C): pad, cyclic shift, cut into windows."""
    pad_b, pad_r = _pads(x, window)
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    b, h, w, c = x.shape
    s = _shift((h, w), window, shift)
    if sum(s) > 0:
        x = torch.roll(x, shifts=(-s[0], -s[1]), dims=(1, 2))
    x = x.view(b, h // window[0], window[0], w // window[1], window[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], c)


def window_mask(x: torch.Tensor, window: list[int], shift: list[int]) -> torch.Tensor:
    """The additive attention mask of shifted windows, (B * windows, 1, area, area): -100 between
    positions that the cyclic shift brought together, 0 elsewhere (torchvision's mask)."""
    pad_b, pad_r = _pads(x, window)
    h, w = x.shape[1] + pad_b, x.shape[2] + pad_r
    s = _shift((h, w), window, shift)
    windows = (h // window[0]) * (w // window[1])
    area = window[0] * window[1]
    if sum(s) == 0:
        return x.new_zeros((x.shape[0] * windows, 1, area, area))
    ids = x.new_zeros((h, w))
    count = 0
    for hs in ((0, -window[0]), (-window[0], -s[0]), (-s[0], None)):
        for ws in ((0, -window[1]), (-window[1], -s[1]), (-s[1], None)):
            ids[hs[0] : hs[1], ws[0] : ws[1]] = count
            count += 1
    ids = ids.view(h // window[0], window[0], w // window[1], window[1]).permute(0, 2, 1, 3).reshape(windows, area)
    mask = ids.unsqueeze(1) - ids.unsqueeze(2)
    mask = mask.masked_fill(mask != 0, -100.0)
    return mask.unsqueeze(1).repeat(x.shape[0], 1, 1, 1)


def window_merge(y: torch.Tensor, x: torch.Tensor, window: list[int], shift: list[int]) -> torch.Tensor:
    """The inverse of window_partition for the input x: windows back in place, shift undone, unpadded."""
    pad_b, pad_r = _pads(x, window)
    b, h, w, c = x.shape[0], x.shape[1] + pad_b, x.shape[2] + pad_r, y.shape[-1]
    s = _shift((h, w), window, shift)
    y = y.view(b, h // window[0], w // window[1], window[0], window[1], c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
    if sum(s) > 0:
        y = torch.roll(y, shifts=(s[0], s[1]), dims=(1, 2))
    return y[:, : x.shape[1], : x.shape[2], :].contiguous()


def same_pad(x: torch.Tensor, kernel: tuple, stride: tuple, dilation: tuple) -> torch.Tensor:
    """TensorFlow's 'SAME' padding for a conv, from the input's size (timm's pad_same)."""
    pads = []
    for size, k, s, d in zip(x.shape[-2:], kernel, stride, dilation):
        total = max((-(size // -s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    return F.pad(x, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]))


def _patches(size, patch: int):
    """ceil(size / patch) without a negative floor division: the ONNX exporter traces sizes as int
    tensors, and ONNX's Div truncates toward zero (-(1 // -2) would export as 0)."""
    return (size + patch - 1) // patch


def mobilevit_unfold(x: torch.Tensor, patch: tuple) -> torch.Tensor:
    """MobileViT's (B, C, H, W) -> (B * patch area, patches, C), resized to whole patches first (timm)."""
    b, c, h, w = x.shape
    nh, nw = _patches(h, patch[0]), _patches(w, patch[1])
    if (nh * patch[0], nw * patch[1]) != (h, w):
        x = F.interpolate(x, size=(nh * patch[0], nw * patch[1]), mode="bilinear", align_corners=False)
    x = x.reshape(b * c * nh, patch[0], nw, patch[1]).transpose(1, 2)
    return x.reshape(b, c, nh * nw, patch[0] * patch[1]).transpose(1, 3).reshape(b * patch[0] * patch[1], nh * nw, -1)


def mobilevit_fold(t: torch.Tensor, x: torch.Tensor, patch: tuple) -> torch.Tensor:
    """The inverse of mobilevit_unfold for the feature map x."""
    b, c, h, w = x.shape
    nh, nw = _patches(h, patch[0]), _patches(w, patch[1])
    t = (
        t.contiguous()
        .view(b, patch[0] * patch[1], nh * nw, -1)
        .transpose(1, 3)
        .reshape(b * c * nh, nw, patch[0], patch[1])
    )
    y = t.transpose(1, 2).reshape(b, c, nh * patch[0], nw * patch[1])
    return (
        y
        if (nh * patch[0], nw * patch[1]) == (h, w)
        else F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
    )


class _TraceableMobileVitBlock:
    """timm's MobileVitBlock with its shape-dependent unfold and fold as wrapped functions (they may
    resize, so they are float ops, not grid-preserving ones)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_1x1(self.conv_kxk(x))
        y = self.conv_proj(
            mobilevit_fold(self.norm(self.transformer(mobilevit_unfold(y, self.patch_size))), y, self.patch_size)
        )
        return y if self.conv_fusion is None else self.conv_fusion(torch.cat((x, y), dim=1))


def mobilevitv2_resize(x: torch.Tensor, patch: tuple) -> torch.Tensor:
    """MobileViTv2's input resized to whole patches, as timm does (bilinear, corners aligned); x itself
    when it already is."""
    h, w = x.shape[-2:]
    size = (_patches(h, patch[0]) * patch[0], _patches(w, patch[1]) * patch[1])
    return x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def mobilevitv2_unfold(x: torch.Tensor, patch: tuple) -> torch.Tensor:
    """MobileViTv2's (B, C, H, W) -> (B, C, patch area, patches): a permutation of whole patches."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch[0], patch[0], w // patch[1], patch[1]).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c, patch[0] * patch[1], -1)


def mobilevitv2_fold(t: torch.Tensor, x: torch.Tensor, patch: tuple) -> torch.Tensor:
    """The inverse of mobilevitv2_unfold for the feature map x."""
    b, c, h, w = t.shape[0], t.shape[1], x.shape[2], x.shape[3]
    t = t.reshape(b, c, patch[0], patch[1], h // patch[0], w // patch[1]).permute(0, 1, 4, 2, 5, 3)
    return t.reshape(b, c, h, w)


class _TraceableMobileVitV2Block:
    """timm's MobileVitV2Block with its shape-dependent resize, unfold and fold as wrapped functions
    (the unfold and fold permute values: grid-preserving; the resize is a float op)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_1x1(self.conv_kxk(mobilevitv2_resize(x, self.patch_size)))
        return self.conv_proj(
            mobilevitv2_fold(self.norm(self.transformer(mobilevitv2_unfold(x, self.patch_size))), x, self.patch_size)
        )


class _TraceableLiteMLA:
    """timm's EfficientViT (MIT) attention without its device test (``v.device.type != 'meta'``, a
    value fx cannot branch on) and the autocast guard around it, a no-op in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        qkv = self.qkv(x)
        scales = torch.cat([qkv, *(op(qkv) for op in self.aggreg)], dim=1)
        q, k, v = scales.reshape(b, -1, 3 * self.dim, h * w).transpose(-1, -2).chunk(3, dim=-1)
        out = self._attn(self.kernel_func(q), self.kernel_func(k), F.pad(v, (0, 1), mode="constant", value=1.0))
        return self.proj(out.transpose(-1, -2).reshape(b, -1, h, w))


def efficientvit_windows(x: torch.Tensor, ws: int) -> torch.Tensor:
    """EfficientViT (MSRA)'s (B, C, H, W) -> (B * windows, C, ws, ws), zero-padded to whole windows
    (one window, x itself, when H = W = ws)."""
    b, c, h, w = x.shape
    pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
    x = F.pad(x, (0, pad_r, 0, pad_b))
    nh, nw = (h + pad_b) // ws, (w + pad_r) // ws
    return x.view(b, c, nh, ws, nw, ws).permute(0, 2, 4, 1, 3, 5).reshape(b * nh * nw, c, ws, ws)


def efficientvit_unwindows(y: torch.Tensor, x: torch.Tensor, ws: int) -> torch.Tensor:
    """The inverse of efficientvit_windows for the feature map x: windows back in place, unpadded."""
    b, h, w = x.shape[0], x.shape[2], x.shape[3]
    nh, nw, c = (h + ws - 1) // ws, (w + ws - 1) // ws, y.shape[1]
    y = y.view(b, nh, nw, c, ws, ws).permute(0, 3, 1, 4, 2, 5).reshape(b, c, nh * ws, nw * ws)
    return y[:, :, :h, :w].contiguous()


class _TraceableLocalWindowAttention:
    """timm's EfficientViT (MSRA) window attention with its size-dependent windowing as wrapped,
    grid-preserving functions (zero padding, permutations)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ws = self.attn.resolution
        return efficientvit_unwindows(self.attn(efficientvit_windows(x, ws)), x, ws)


class _TraceableCascadedGroupAttention:
    """timm's EfficientViT (MSRA) attention with its position biases read from the parameters on
    every call (a constant of the traced graph), not from a cache keyed by the device."""

    def get_attention_biases(self, device: torch.device) -> torch.Tensor:
        return self.attention_biases[:, self.attention_bias_idxs]


# timm classes made traceable by name, without importing timm.
_TRACEABLE_BY_NAME = {
    "MobileVitBlock": _TraceableMobileVitBlock,
    "MobileVitV2Block": _TraceableMobileVitV2Block,
    "LiteMLA": _TraceableLiteMLA,
    "LocalWindowAttention": _TraceableLocalWindowAttention,
    "CascadedGroupAttention": _TraceableCascadedGroupAttention,
}

for _name in (
    "window_partition",
    "window_mask",
    "window_merge",
    "same_pad",
    "mobilevit_unfold",
    "mobilevit_fold",
    "mobilevitv2_resize",
    "mobilevitv2_unfold",
    "mobilevitv2_fold",
    "efficientvit_windows",
    "efficientvit_unwindows",
):
    torch.fx.wrap(_name)  # shape-dependent Python: one opaque node each in the traced graph
DATA_MOVEMENT_FUNCS = {
    window_partition,
    window_merge,
    same_pad,
    mobilevitv2_unfold,
    mobilevitv2_fold,
    efficientvit_windows,
    efficientvit_unwindows,
}
MASK_FUNCS = {window_mask}


class SamePad(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.kernel, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation

    def forward(self, x):
        return same_pad(x, self.kernel, self.stride, self.dilation)


def _split_same_conv(m: nn.Conv2d) -> nn.Sequential:
    conv = nn.Conv2d(
        m.in_channels, m.out_channels, m.kernel_size, m.stride, 0, m.dilation, m.groups, m.bias is not None
    )
    conv.load_state_dict(m.state_dict())
    return nn.Sequential(SamePad(m), conv)


def _split_norm_act(m: nn.BatchNorm2d) -> nn.Sequential:
    bn = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    bn.load_state_dict({k: v for k, v in m.state_dict().items() if "." not in k})
    return nn.Sequential(bn, m.drop, m.act)


class _TraceableWindowAttention:
    """torchvision's shifted_window_attention with the Linear modules called and the matmuls visible."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        windows = window_partition(x, self.window_size, self.shift_size)
        b, n, c = windows.shape[0], windows.shape[1], windows.shape[2]
        qkv = self.qkv(windows).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (
            self._logits(q, k) + self.get_relative_position_bias() + window_mask(x, self.window_size, self.shift_size)
        )
        attn = F.dropout(attn.softmax(dim=-1), self.attention_dropout, self.training)
        y = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, c)
        y = F.dropout(self.proj(y), self.dropout, self.training)
        return window_merge(y, x, self.window_size, self.shift_size)


class TraceableShiftedWindowAttention(_TraceableWindowAttention, ShiftedWindowAttention):
    def _logits(self, q, k):
        return torch.matmul(q * (q.shape[-1] ** -0.5), k.transpose(-2, -1))


class TraceableShiftedWindowAttentionV2(_TraceableWindowAttention, ShiftedWindowAttentionV2):
    """Cosine attention; the key part of the qkv bias is zero and stays so (torchvision zeroes it
    on every forward)."""

    def _logits(self, q, k):
        attn = torch.matmul(F.normalize(q, dim=-1), F.normalize(k, dim=-1).transpose(-2, -1))
        return attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()


def _keep_key_bias_zero(m: ShiftedWindowAttentionV2) -> None:
    if m.qkv.bias is None:
        return
    n = m.qkv.bias.numel() // 3
    keep = torch.ones_like(m.qkv.bias)
    keep[n : 2 * n] = 0
    with torch.no_grad():
        m.qkv.bias.mul_(keep)
    m.qkv.bias.register_hook(lambda g: g * keep)


def _replacement(m: nn.Module) -> nn.Module | None:
    if isinstance(m, nn.MultiheadAttention):
        return DecomposedMultiheadAttention(m)
    if isinstance(m, nn.BatchNorm2d) and type(m).__name__ == "BatchNormAct2d":  # timm, without importing it
        return _split_norm_act(m)
    if isinstance(m, nn.Conv2d) and type(m).__name__ == "Conv2dSame":
        return _split_same_conv(m)
    return None


def make_traceable(model: nn.Module) -> nn.Module:
    """Swap, in place, the modules torch.fx cannot see into for their traceable forms."""
    for name, m in list(model.named_modules()):
        new = _replacement(m)
        if new is not None:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, new)
        elif type(m).__name__ in _TRACEABLE_BY_NAME:
            m.__class__ = type(f"Traceable{type(m).__name__}", (_TRACEABLE_BY_NAME[type(m).__name__], type(m)), {})
        elif type(m) is ShiftedWindowAttentionV2:
            _keep_key_bias_zero(m)
            m.__class__ = TraceableShiftedWindowAttentionV2
        elif type(m) is ShiftedWindowAttention:
            m.__class__ = TraceableShiftedWindowAttention
    return model


@contextlib.contextmanager
def visible_ops():
    """While tracing, F.scaled_dot_product_attention and torch.einsum are the decomposed versions above."""
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention, torch.einsum = scaled_dot_product_attention, einsum
    try:
        yield
    finally:
        F.scaled_dot_product_attention, torch.einsum = sdpa, _EINSUM
