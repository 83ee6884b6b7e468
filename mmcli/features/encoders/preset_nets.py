"""The networks of the foundation-model presets, with the published checkpoints' key layouts.

Each network is one ``nn.Module`` whose output is the preset's (B, dim) tile embedding, built from timm /
transformers where those hold the architecture. Hand-written here only what no library ships, each as its
authors' code computes it:

- CONCH v1.5's attentional pooler (TRIDENT's ``conchv1_5.AttentionalPooler``: bias-free ``to_q`` / ``to_kv`` /
  ``to_out``, one query, 8 heads) and the run-time re-gridding of its 224-px position embedding to 448 px
  (TRIDENT builds a 224-px trunk and interpolates bicubically at every forward; done once here, at load);
- CONCH v1's pooler (open_clip CoCa's ``AttentionalPooler``: an ``nn.MultiheadAttention`` over the tokens);
- CTransPath's convolutional stem for timm's Swin (the published checkpoints are timm-0.5 Swin layouts, whose
  key names :func:`swin_v1_keys` maps to timm's current ones, as timm's own ``checkpoint_filter_fn`` does).

:func:`to_network` maps published keys (with tensors, or with shapes for a check without loading) to the
network's; :func:`build_network` builds the network, on the meta device when asked.
"""
from __future__ import annotations

import math
import re
from typing import Any

SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}  # named in the presets, resolved to classes here
CONCH15_POOLER = {"d_model": 768, "context_dim": 1024, "n_head": 8}
CONCH1_POOLER = {"d_model": 512, "context_dim": 768, "n_head": 8}
CONCH15_TRAIN_GRID = 14  # TRIDENT's CONCH v1.5 trunk is built at 224 px / 16 px patches


def resolved_args(args: dict[str, Any]) -> dict[str, Any]:
    """Preset architecture arguments with layer classes named by string replaced by the classes."""
    import timm
    import torch

    out = dict(args)
    if out.get("mlp_layer") == "SwiGLUPacked":
        out["mlp_layer"] = timm.layers.SwiGLUPacked
    if out.get("act_layer") == "SiLU":
        out["act_layer"] = torch.nn.SiLU
    return out


# ---- poolers ----------------------------------------------------------------------------------------------
def conch15_pooler() -> Any:
    """TRIDENT's CONCH v1.5 ``AttentionalPooler`` (one query): keys ``query``, ``ln_q``, ``ln_k``, ``to_q``,
    ``to_kv``, ``to_out`` (no biases). Same arithmetic as TRIDENT's einsum version, max-subtracted softmax
    included."""
    import torch
    from torch import nn

    class AttentionalPooler(nn.Module):
        def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1) -> None:
            super().__init__()
            self.query = nn.Parameter(torch.randn(n_queries, d_model))
            self.heads = n_head
            dim_head = d_model // n_head
            self.scale = dim_head ** -0.5
            self.ln_k = nn.LayerNorm(context_dim)
            self.ln_q = nn.LayerNorm(d_model)
            self.to_q = nn.Linear(d_model, dim_head * n_head, bias=False)
            self.to_kv = nn.Linear(context_dim, dim_head * n_head * 2, bias=False)
            self.to_out = nn.Linear(dim_head * n_head, d_model, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, n_queries, d_model)
            b, h = x.shape[0], self.heads
            q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)
            k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)
            q, k, v = (t.reshape(b, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
            sim = (q * self.scale) @ k.transpose(-1, -2)
            attn = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
            out = (attn @ v).transpose(1, 2).reshape(b, -1, h * v.shape[-1])
            return self.to_out(out)

    return AttentionalPooler(**CONCH15_POOLER)


def openclip_pooler() -> Any:
    """open_clip CoCa's ``AttentionalPooler`` (CONCH v1): learned queries attend over the tokens through an
    ``nn.MultiheadAttention`` (keys ``query``, ``attn.*``, ``ln_q``, ``ln_k``)."""
    import torch
    from torch import nn

    class AttentionalPooler(nn.Module):
        def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1) -> None:
            super().__init__()
            self.query = nn.Parameter(torch.randn(n_queries, d_model))
            self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True)
            self.ln_q = nn.LayerNorm(d_model)
            self.ln_k = nn.LayerNorm(context_dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.ln_k(x)
            q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
            return self.attn(q, x, x, need_weights=False)[0]

    return AttentionalPooler(**CONCH1_POOLER)


# ---- CTransPath's stem for timm's Swin ---------------------------------------------------------------------
def conv_stem_cls() -> Any:
    """CTransPath's ``ConvStem`` (two stride-2 3x3 convs with BatchNorm, a 1x1 projection; keys
    ``proj.{0,1,3,4,6}``, ``norm``) with the call signature and NHWC output timm's Swin expects of its
    ``embed_layer``."""
    from torch import nn

    class ConvStem(nn.Module):
        def __init__(self, img_size: Any = 224, patch_size: Any = 4, in_chans: int = 3, embed_dim: int = 96,
                     norm_layer: Any = None, strict_img_size: bool = True, output_fmt: str = "NHWC",
                     **_: Any) -> None:
            super().__init__()
            size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            self.img_size, self.patch_size = size, (4, 4)
            self.grid_size = (size[0] // 4, size[1] // 4)
            self.num_patches = self.grid_size[0] * self.grid_size[1]
            stem: list[nn.Module] = []
            cin, cout = in_chans, embed_dim // 8
            for _i in range(2):
                stem += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True)]
                cin, cout = cout, cout * 2
            stem.append(nn.Conv2d(cin, embed_dim, kernel_size=1))
            self.proj = nn.Sequential(*stem)
            self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

        def forward(self, x: Any) -> Any:
            return self.norm(self.proj(x).permute(0, 2, 3, 1))

    return ConvStem


def swin_v1_keys(key: str) -> str | None:
    """A timm-0.5 Swin key (CTransPath's checkpoints) as timm >= 0.9 names it; None for the buffers timm now
    recomputes (``relative_position_index``, ``attn_mask``). The patch merging moved from the end of stage N to
    the start of stage N+1 (the rule of timm's own ``swin_transformer.checkpoint_filter_fn``)."""
    if "relative_position_index" in key or key.endswith("attn_mask"):
        return None
    return re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)


# ---- CONCH v1.5 position embedding -------------------------------------------------------------------------
def conch15_pos_embed(pos: Any, grid: int) -> Any:
    """TRIDENT's CONCH v1.5 position embedding for a ``grid`` x ``grid`` token input: the checkpoint's embedding
    resampled to the 224-px trunk's 14 x 14 grid (``resize_pos_embed``: timm ``resample_abs_pos_embed``,
    bilinear, no antialias; a no-op for a 14 x 14 checkpoint), then interpolated as TRIDENT's
    ``interpolate_pos_encoding`` does at run time (bicubic, scale factor (grid + 0.1) / 14)."""
    import torch
    from timm.layers import resample_abs_pos_embed

    g = CONCH15_TRAIN_GRID
    if pos.shape[1] != 1 + g * g:
        pos = resample_abs_pos_embed(pos, new_size=(g, g), num_prefix_tokens=1, interpolation="bilinear",
                                     antialias=False, verbose=False)
    if grid == g:
        return pos
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    dim = pos.shape[-1]
    w0 = h0 = grid + 0.1
    patch_pos = torch.nn.functional.interpolate(
        patch_pos.reshape(1, g, g, dim).permute(0, 3, 1, 2).float(), scale_factor=(w0 / g, h0 / g),
        mode="bicubic").to(pos.dtype)
    if patch_pos.shape[-2:] != (grid, grid):
        raise ValueError(f"position-embedding grid {tuple(patch_pos.shape[-2:])} != {grid}")
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def square_tokens(shape: tuple[int, ...]) -> bool:
    """A (1, 1 + g*g, C) position embedding of a square grid."""
    return len(shape) == 3 and shape[0] == 1 and math.isqrt(shape[1] - 1) ** 2 == shape[1] - 1


# ---- building --------------------------------------------------------------------------------------------
def build_network(kind: str, arch: str, args: dict[str, Any]) -> Any:
    """The network of a preset: ``kind`` is its pooling (``token``, ``cls+mean``, ``conch-v1.5``, ``conch-v1``,
    ``swin-avg``, ``dinov2-cls``), ``arch`` the timm architecture, ``args`` its arguments (for ``dinov2-cls``:
    the published ``config.json``). Its ``state_dict`` has the network keys of :func:`to_network`."""
    import timm
    import torch
    from torch import nn

    if kind == "dinov2-cls":
        from transformers import Dinov2Config, Dinov2Model

        class Dinov2Cls(nn.Module):  # Phikon-v2: last_hidden_state[:, 0] (TRIDENT, the model card)
            def __init__(self) -> None:
                super().__init__()
                self.model = Dinov2Model(Dinov2Config(**args))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.model(pixel_values=x).last_hidden_state[:, 0]

        return Dinov2Cls()
    if kind == "swin-avg":
        return timm.create_model(arch, pretrained=False, num_classes=0, embed_layer=conv_stem_cls(), **args)
    trunk = timm.create_model(arch, pretrained=False, num_classes=0, **resolved_args(args))
    if kind == "token":
        return trunk

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = trunk
            if kind == "conch-v1.5":
                self.attn_pool_contrast = conch15_pooler()
                self.ln_contrast = nn.LayerNorm(CONCH15_POOLER["d_model"])
            elif kind == "conch-v1":
                self.attn_pool_contrast = openclip_pooler()
                self.ln_contrast = nn.LayerNorm(CONCH1_POOLER["d_model"])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if kind == "cls+mean":  # Virchow: CLS token + mean of the patch tokens (registers left out)
                out = self.trunk(x)
                return torch.cat([out[:, 0], out[:, self.trunk.num_prefix_tokens:].mean(1)], dim=-1)
            tokens = self.trunk.forward_features(x)
            return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])

    return Pooled()


def network_prefix(kind: str) -> str:
    """What the network's keys lack of the published ones: the trunk of a ``token`` timm model is the whole
    checkpoint; Virchow's is the trunk too; CONCH v1's vision tower sits under ``visual.`` of the CoCa file."""
    return {"cls+mean": "trunk.", "conch-v1": "visual.", "dinov2-cls": "model."}.get(kind, "")


def to_network(kind: str, published: dict[str, Any], extra: tuple[str, ...] = (), grid: int | None = None) \
        -> dict[str, Any]:
    """Published checkpoint entries -> the network's (values are tensors, or shapes for a check without loading).

    ``extra``: published key prefixes the tile encoder does not use (CONCH v1's text tower, captioning pooler and
    projection), dropped. ``grid``: CONCH v1.5's input grid, to which its position embedding is re-gridded.
    """
    out: dict[str, Any] = {}
    pre = network_prefix(kind)
    for k, v in published.items():
        if any(k == e or k.startswith(e if e.endswith(".") else e + ".") for e in extra):
            continue
        if kind == "conch-v1":
            if not k.startswith(pre):
                out[k] = v  # unexpected: reported by the strict check
                continue
            k = k[len(pre):]
        if kind == "swin-avg":
            k2 = swin_v1_keys(k)
            if k2 is None:
                continue
            k = k2
        if kind == "conch-v1.5" and k == "trunk.pos_embed" and grid:
            v = _regrid(v, grid)
        out[(pre if kind in ("cls+mean", "dinov2-cls") else "") + k] = v
    return out


def _regrid(v: Any, grid: int) -> Any:
    if isinstance(v, tuple):  # a shape: any square grid is re-gridded
        return (1, 1 + grid * grid, v[2]) if square_tokens(v) else v
    return conch15_pos_embed(v, grid) if square_tokens(tuple(v.shape)) else v
