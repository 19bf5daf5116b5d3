"""Plain-torch twins of every native kernel: the specification and the fallback path.

Each function has the same signature and semantics as its native counterpart in ops.py; tests
compare the two on random inputs. Shapes in comments: T tokens, B sequences, H query heads,
Hkv kv heads, D head dim, N hidden size, V vocabulary.
"""

from __future__ import annotations

import torch


def paged_attention_decode(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32, includes the current token
    scale: float,
    alibi_slopes: torch.Tensor | None = None,  # [H]
) -> torch.Tensor:  # [B, H, D]
    B, H, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = H // Hkv
    out = torch.zeros_like(q)
    flat_k = k_cache.reshape(-1, Hkv, D)
    flat_v = v_cache.reshape(-1, Hkv, D)
    for b in range(B):
        n = int(context_lens[b])
        if n <= 0:
            continue
        pos = torch.arange(n, device=q.device)
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size
        k = flat_k[slots].float().repeat_interleave(group, dim=1)  # [n, H, D]
        v = flat_v[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float() * scale, k)  # [H, n]
        if alibi_slopes is not None:
            scores = scores + alibi_slopes.float()[:, None] * (pos - (n - 1)).float()[None, :]
        probs = torch.softmax(scores, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", probs, v).to(q.dtype)
    return out


def fused_add_rms_norm(
    x: torch.Tensor,  # [T, N]
    residual: torch.Tensor | None,  # [T, N]
    weight: torch.Tensor,  # [N]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual_out = x + residual (in x's dtype); out = weight * rmsnorm(residual_out) (HF Llama)."""
    r = x if residual is None else x + residual.to(x.dtype)
    h = r.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(x.dtype) * h.to(x.dtype), r.clone() if residual is None else r


def fused_add_layer_norm(
    x: torch.Tensor,  # [T, N]
    residual: torch.Tensor | None,  # [T, N]
    weight: torch.Tensor,  # [N]
    bias: torch.Tensor | None,  # [N]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual_out = x + residual; out = layer_norm(residual_out) * weight + bias, in fp32."""
    r = x if residual is None else x + residual.to(x.dtype)
    b = None if bias is None else bias.float()
    out = torch.nn.functional.layer_norm(r.float(), (r.shape[-1],), weight.float(), b, eps)
    return out.to(x.dtype), r.clone() if residual is None else r


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    # x: [T, heads, rot_dim] fp32; cos, sin: [T, 1, rot_dim/2]
    if is_neox:  # rotate-half (HF Llama / GPT-NeoX)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # interleaved pairs (GPT-J)
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)


def rotary_cache_write(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    positions: torch.Tensor,  # [T] int64
    cos_sin_cache: torch.Tensor,  # [max_pos, rot_dim]: cos half, then sin half
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], written in place
    v_cache: torch.Tensor,  # same
    slot_mapping: torch.Tensor,  # [T] int64, slot = block * block_size + offset; < 0 skips
    is_neox: bool,
    rot_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # (q_rot [T,H,D], k_rot [T,Hkv,D])
    cs = cos_sin_cache[positions.long()].float()  # [T, rot_dim]
    cos, sin = cs[:, None, : rot_dim // 2], cs[:, None, rot_dim // 2 :]
    q_rot, k_rot = q.clone(), k.clone()
    q_rot[..., :rot_dim] = _rotate(q[..., :rot_dim].float(), cos, sin, is_neox).to(q.dtype)
    k_rot[..., :rot_dim] = _rotate(k[..., :rot_dim].float(), cos, sin, is_neox).to(k.dtype)
    slots = slot_mapping.long()
    keep = slots >= 0
    Hkv, D = k.shape[1], k.shape[2]
    k_cache.view(-1, Hkv, D)[slots[keep]] = k_rot[keep].to(k_cache.dtype)
    v_cache.view(-1, Hkv, D)[slots[keep]] = v[keep].to(v_cache.dtype)
    return q_rot, k_rot


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w ~= qw * scales[:, None]. w: [out, in]."""
    wf = w.float()
    scales = (wf.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [out]
    qw = torch.round(wf / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return qw, scales


def int8_linear(
    x: torch.Tensor,  # [..., in]
    qw: torch.Tensor,  # [out, in] int8
    scales: torch.Tensor,  # [out] fp32
    bias: torch.Tensor | None = None,  # [out]
) -> torch.Tensor:  # [..., out], x's dtype
    y = torch.nn.functional.linear(x.float(), qw.float()) * scales.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-row int8 (the w8a8 activations): x [T, in] ~= q * scales[:, None].

    scales = max(amax(|x|) / 127, 1e-12), q = round-half-even(x / scales) clamped to [-127, 127],
    all in fp32 with true division (the native kernel computes the same codes bit for bit)."""
    xf = x.float()
    scales = (xf.abs().amax(dim=-1) / 127.0).clamp(min=1e-12)
    q = torch.round(xf / scales[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def int8_gemm(qx: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """[T, in] int8 . [out, in]^T int8 -> [T, out] int32, exact (float64 holds every partial sum
    while in * 127 * 127 < 2**53)."""
    return (qx.double() @ qw.double().T).to(torch.int32)


def w8a8_linear(
    x: torch.Tensor,  # [..., in]
    qw: torch.Tensor,  # [out, in] int8 (quantize_int8)
    scales: torch.Tensor,  # [out] fp32
    bias: torch.Tensor | None = None,  # [out]
) -> torch.Tensor:  # [..., out], x's dtype
    """Activations quantized per token at run time (quantize_rows_int8), int32 accumulation, then
    y = (float(acc) * x_scale[t]) * scales[o] (+ bias), rounded in that order."""
    in_f = qw.shape[1]
    qx, xs = quantize_rows_int8(x.reshape(-1, in_f))
    y = int8_gemm(qx, qw).float() * xs[:, None] * scales.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], qw.shape[0])


def quantize_int4(
    w: torch.Tensor, group_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Asymmetric group-wise int4: w ~= (q - zeros) * scales per group of `group_size` inputs.

    Returns packed uint8 [out, in_p/2] (in each run of 32 weights, byte j holds weight j in its low
    nibble and weight j+16 in its high nibble: the layout the CPU kernel unpacks fastest), and
    scales, zeros fp32 [out, in_p/group_size], where in_p = in rounded up to a multiple of the group:
    an `in` the group does not divide gets its last group padded with zero weights (quantized to
    exactly their zero point, so they dequantize to 0; the linear layers also multiply them by zero
    inputs), so every shape quantizes. group_size = in_p / scales.shape[1] = 2 * packed.shape[1] /
    scales.shape[1].
    """
    out_f, in_f = w.shape
    if group_size <= 0 or group_size % 32:
        raise ValueError(f"group_size {group_size} must be a positive multiple of 32")
    in_p = -(-in_f // group_size) * group_size
    wf = w.float()
    if in_p != in_f:
        wf = torch.nn.functional.pad(wf, (0, in_p - in_f))
    g = wf.reshape(out_f, in_p // group_size, group_size)
    lo = g.amin(dim=-1).clamp(max=0.0)
    hi = g.amax(dim=-1).clamp(min=0.0)
    scales = ((hi - lo) / 15.0).clamp(min=1e-12)
    zeros = torch.round(-lo / scales).clamp(0, 15)
    q = torch.round(g / scales[..., None] + zeros[..., None]).clamp(0, 15).to(torch.uint8)
    return pack_int4(q.reshape(out_f, in_p)), scales, zeros


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q: [out, in] values 0..15 -> packed uint8 [out, in/2] in the 32-run layout above."""
    out_f, in_f = q.shape
    runs = q.to(torch.uint8).reshape(out_f, in_f // 32, 2, 16)
    return (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(out_f, in_f // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: [out, in/2] uint8 -> [out, in] uint8 values 0..15."""
    out_f, half = packed.shape
    runs = packed.reshape(out_f, half // 16, 16)
    return torch.stack([runs & 15, runs >> 4], dim=2).reshape(out_f, half * 2)


def int4_dequantize(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """[out, in_p] fp32 weight (in_p = 2 * packed.shape[1], padding included); zeros None means 8."""
    q = unpack_int4(packed).float()
    out_f, in_f = q.shape
    z = torch.full_like(scales, 8.0) if zeros is None else zeros.float()
    g = q.reshape(out_f, in_f // group_size, group_size)
    return ((g - z[..., None]) * scales.float()[..., None]).reshape(out_f, in_f)


def int4_linear(
    x: torch.Tensor,  # [..., in]
    packed: torch.Tensor,  # [out, in_p/2] uint8; in_p = in rounded up to the group size
    scales: torch.Tensor,  # [out, in_p/group_size]
    zeros: torch.Tensor | None,  # [out, in_p/group_size] or None (= 8)
    bias: torch.Tensor | None = None,
    group_size: int = 128,
) -> torch.Tensor:  # [..., out], x's dtype
    """y = x . W[:, :in]^T (+ bias): the padded tail of the last group meets no input."""
    in_f, in_p = x.shape[-1], packed.shape[1] * 2
    if not (in_p - group_size < in_f <= in_p):
        raise ValueError(f"x has {in_f} features; packed weights hold {in_p} (group {group_size})")
    w = int4_dequantize(packed, scales, zeros, group_size)[:, :in_f]
    y = torch.nn.functional.linear(x.float(), w)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def draw_uniforms(batch: int, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One float64 uniform in [0, 1) per row from that row's generator (None: torch's default).

    Each call consumes exactly one draw from each row's generator, greedy rows included, so a
    row's stream never depends on the other rows of the batch.
    """
    if len(generators) != batch:
        raise ValueError(f"need one generator per row: {len(generators)} for {batch} rows")
    draws = [
        torch.rand((), generator=g, dtype=torch.float64, device=g.device if g is not None else "cpu")
        for g in generators
    ]
    return torch.stack([d.cpu() for d in draws]) if draws else torch.empty(0, dtype=torch.float64)


def kept_distribution(
    logits: torch.Tensor,  # [B, V]
    temperature: torch.Tensor,  # [B]; <= 0 means greedy (z = logits)
    top_k: torch.Tensor,  # [B] int; 0 (or >= V) means off
    top_p: torch.Tensor,  # [B]; >= 1 means off
) -> tuple[torch.Tensor, torch.Tensor]:
    """(p [B, V] float64 on the host: softmax of z over the top-k kept set, keep [B, V] bool: the
    tokens kept after top-k and top-p), as `sample_with_uniforms` specifies them. The distribution
    a row samples from is p restricted to keep, renormalised (see `target_probs`)."""
    B, V = logits.shape
    x = logits.float().cpu()
    t = temperature.float().cpu()
    greedy = ~(t > 0.0)
    z = x.double() / torch.where(greedy, 1.0, t).double()[:, None]
    order = torch.sort(z, dim=1, descending=True, stable=True).indices  # [B, V]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(V).expand(B, V))  # id -> place in order
    k = top_k.cpu().long()
    k_on = (k > 0) & (k < V)
    keep = ~k_on[:, None] | (rank < k[:, None])  # [B, V] in id order
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    p = e / torch.where(keep, e, 0.0).sum(dim=1, keepdim=True)
    tp = top_p.float().cpu().double()
    ps = torch.where(keep, p, 0.0).gather(1, order)  # kept mass in order; dropped ones come last as 0
    before = torch.cat([ps.new_zeros(B, 1), torch.cumsum(ps, 1)[:, :-1]], dim=1)  # mass before each
    m = (before < tp[:, None]).sum(1).clamp(min=1)
    m = torch.where(k_on, torch.minimum(m, k), m)
    keep = torch.where((tp < 1.0)[:, None], rank < m[:, None], keep)
    return p, keep


def target_probs(logits, temperature, top_k, top_p) -> torch.Tensor:
    """[B, V] float64 on the host: the distribution `sample_with_uniforms` draws each row from (its
    kept tokens' probabilities, renormalised; 0 elsewhere). Speculative decoding verifies with it."""
    p, keep = kept_distribution(logits, temperature, top_k, top_p)
    kept = torch.where(keep, p, 0.0)
    return kept / kept.sum(dim=1, keepdim=True)


def sample_with_uniforms(
    logits: torch.Tensor,  # [B, V]
    temperature: torch.Tensor,  # [B]; <= 0 means greedy
    top_k: torch.Tensor,  # [B] int; 0 (or >= V) means off
    top_p: torch.Tensor,  # [B]; >= 1 means off
    uniforms: torch.Tensor,  # [B] float64 in [0, 1)
) -> torch.Tensor:  # [B] int64
    """The sampling specification, in float64 (vectorised over rows; each row on its own).

    z = logits / temperature. Order tokens by z descending, ties by lower id. Keep the first
    top_k. p = softmax of z over the kept set. If top_p < 1, keep (in that order) each token whose
    preceding probability mass is < top_p (at least one). Then walk kept tokens in id order and
    return the first whose running mass exceeds uniform * (kept mass); else the last kept.
    """
    V = logits.shape[1]
    x = logits.float().cpu()
    greedy = ~(temperature.float().cpu() > 0.0)
    p, keep = kept_distribution(logits, temperature, top_k, top_p)
    cum = torch.cumsum(torch.where(keep, p, 0.0), 1)  # running kept mass in id order
    target = uniforms.cpu().double() * cum[:, -1]
    hit = cum > target[:, None]  # first True is a kept id: cum only rises at kept ids
    last_kept = V - 1 - keep.flip(1).int().argmax(1)
    out = torch.where(hit.any(1), hit.int().argmax(1), last_kept)
    out = torch.where(greedy, x.argmax(1), out)
    return out.to(logits.device)


def sample_top_k_top_p(
    logits: torch.Tensor,  # [B, V] fp32
    temperature: torch.Tensor,  # [B]
    top_k: torch.Tensor,  # [B] int, 0 = off
    top_p: torch.Tensor,  # [B], 1 = off
    generators: list[torch.Generator | None],
) -> torch.Tensor:  # [B] int64
    uniforms = draw_uniforms(logits.shape[0], generators)
    return sample_with_uniforms(logits, temperature, top_k, top_p, uniforms)
