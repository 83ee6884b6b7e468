"""The peers' own model code, ported (logic kept, plumbing cut) so tests compare mmcli's networks with it.

- STAMP ``preprocessing/extractor/ctranspath.py`` (v2.5.0): the timm-0.5 Swin Transformer with CTransPath's
  ``ConvStem``, as STAMP strict-loads ``ctranspath.pth`` / ``chief_ctranspath.pth`` (``td['model']``). Its
  ``state_dict`` is the published key layout (``relative_position_index`` and ``attn_mask`` buffers included).
- TRIDENT ``patch_encoder_models/model_zoo/conchv1_5/conchv1_5.py`` (a91fa84): ``AttentionalPooler`` (bias-free
  ``to_q``/``to_kv``/``to_out``), ``resize_pos_embed`` and ``VisionTransformer.interpolate_pos_encoding``
  (the trunk's blocks are timm's, which TRIDENT's file copies), ``CONCHVisionTower.forward``.
- CONCH ``open_clip_custom`` (``vision_tower.VisualModel.forward_no_head``, ``transformer.AttentionalPooler``):
  ``encode_image(x, proj_contrast=False, normalize=False)``.
- CHIEF ``models/CHIEF.py`` (hms-dbmi/CHIEF, as TRIDENT and STAMP load it): the gated-attention slide encoder,
  ``WSI_feature`` = attention-weighted mean of the input tile features.
- MADELEINE ``models/Model.py`` + ``models/abmil.py``: ``MADELEINE.encode_he`` (multi-head gated ABMIL, the
  ``'b t (e c) -> b t e c'`` split written with reshape).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


# ---- STAMP's timm-0.5 Swin (CTransPath) --------------------------------------------------------------------
def _window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c)


def _window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    b = int(windows.shape[0] / (h * w / ws / ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    def __init__(self, dim: int, ws: int, heads: int) -> None:
        super().__init__()
        self.ws, self.heads, self.scale = ws, heads, (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        coords = torch.flatten(torch.stack(torch.meshgrid([torch.arange(ws), torch.arange(ws)], indexing="ij")), 1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += ws - 1
        rel[:, :, 1] += ws - 1
        rel[:, :, 0] *= 2 * ws - 1
        self.register_buffer("relative_position_index", rel.sum(-1))
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b_, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b_, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(b_ // nw, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, n, n)
        attn = attn.softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b_, n, c))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, res: tuple[int, int], heads: int, ws: int = 7, shift: int = 0) -> None:
        super().__init__()
        self.res, self.ws, self.shift = res, ws, shift
        if min(res) <= ws:
            self.shift, self.ws = 0, min(res)
        self.norm1, self.attn = nn.LayerNorm(dim), WindowAttention(dim, self.ws, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, dim * 4)
        attn_mask = None
        if self.shift > 0:
            h, w = res
            img = torch.zeros((1, h, w, 1))
            cnt = 0
            for hs in (slice(0, -self.ws), slice(-self.ws, -self.shift), slice(-self.shift, None)):
                for wsl in (slice(0, -self.ws), slice(-self.ws, -self.shift), slice(-self.shift, None)):
                    img[:, hs, wsl, :] = cnt
                    cnt += 1
            mw = _window_partition(img, self.ws).view(-1, self.ws * self.ws)
            attn_mask = mw.unsqueeze(1) - mw.unsqueeze(2)
            attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)
        self.register_buffer("attn_mask", attn_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.res
        b, _, c = x.shape
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        if self.shift > 0:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        win = _window_partition(x, self.ws).view(-1, self.ws * self.ws, c)
        win = self.attn(win, mask=self.attn_mask).view(-1, self.ws, self.ws, c)
        x = _window_reverse(win, self.ws, h, w)
        if self.shift > 0:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = shortcut + x.view(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, res: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.res = res
        self.reduction, self.norm = nn.Linear(4 * dim, 2 * dim, bias=False), nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.res
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1).view(b, -1, 4 * c)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    def __init__(self, dim: int, res: tuple[int, int], depth: int, heads: int, downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([SwinBlock(dim, res, heads, 7, 0 if i % 2 == 0 else 3) for i in range(depth)])
        self.downsample = PatchMerging(res, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class ConvStem(nn.Module):
    def __init__(self, embed_dim: int = 96) -> None:
        super().__init__()
        stem: list[nn.Module] = []
        cin, cout = 3, embed_dim // 8
        for _ in range(2):
            stem += [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin, cout = cout, cout * 2
        stem.append(nn.Conv2d(cin, embed_dim, kernel_size=1))
        self.proj, self.norm = nn.Sequential(*stem), nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class StampCTransPath(nn.Module):
    """STAMP's ``_swin_tiny_patch4_window7_224(embed_layer=_ConvStem)`` with ``head = nn.Identity()``."""

    def __init__(self, depths: tuple[int, ...] = (2, 2, 6, 2), heads: tuple[int, ...] = (3, 6, 12, 24)) -> None:
        super().__init__()
        self.patch_embed = ConvStem(96)
        grid = 56
        self.layers = nn.Sequential(*[
            BasicLayer(96 * 2 ** i, (grid // 2 ** i, grid // 2 ** i), depths[i], heads[i], i < len(depths) - 1)
            for i in range(len(depths))])
        self.norm = nn.LayerNorm(96 * 2 ** (len(depths) - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.layers(self.patch_embed(x)))
        return torch.flatten(F.adaptive_avg_pool1d(x.transpose(1, 2), 1), 1)


# ---- TRIDENT's CONCH v1.5 ----------------------------------------------------------------------------------
class TridentAttentionalPooler(nn.Module):
    def __init__(self, d_model: int = 768, context_dim: int = 1024, n_head: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        dim_head = d_model // n_head
        self.scale, self.heads = dim_head ** -0.5, n_head
        self.ln_k, self.ln_q = nn.LayerNorm(context_dim), nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, dim_head * n_head, bias=False)
        self.to_kv = nn.Linear(context_dim, dim_head * n_head * 2, bias=False)
        self.to_out = nn.Linear(dim_head * n_head, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1)  # 'b n d -> b 1 n d'
        q = self.query[None, None].expand(x.shape[0], x.shape[1], -1, -1)  # 'n d -> b m n d'
        x, q = self.ln_k(x), self.ln_q(q)
        h = self.heads
        q = self.to_q(q)
        k, v = self.to_kv(x).chunk(2, dim=-1)
        q, k, v = (t.reshape(*t.shape[:3], h, -1).permute(0, 3, 1, 2, 4) for t in (q, k, v))  # b h t n d
        q = q * self.scale
        sim = torch.einsum("... i d, ... j d -> ... i j", q, k)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        out = torch.einsum("... i j, ... j d -> ... i d", sim.softmax(dim=-1), v)
        out = out.permute(0, 2, 3, 1, 4).reshape(out.shape[0], out.shape[2], out.shape[3], -1)  # b t n (h d)
        return self.to_out(out).squeeze(dim=1)


def trident_resize_pos_embed(trunk: Any, pos: torch.Tensor) -> torch.Tensor:
    """TRIDENT's ``resize_pos_embed`` (applied to the checkpoint before its strict load)."""
    from timm.layers import resample_abs_pos_embed

    if pos.shape == trunk.pos_embed.shape:
        return pos
    return resample_abs_pos_embed(pos, new_size=trunk.patch_embed.grid_size, num_prefix_tokens=1,
                                  interpolation="bilinear", antialias=False, verbose=False)


def trident_interpolate_pos_encoding(pos_embed: torch.Tensor, npatch: int, w: int, h: int, patch: int = 16) \
        -> torch.Tensor:
    """TRIDENT's ``VisionTransformer.interpolate_pos_encoding``."""
    n = pos_embed.shape[1] - 1
    if npatch == n and w == h:
        return pos_embed
    class_pos, patch_pos = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    patch_pos = F.interpolate(patch_pos.reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
                              scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
    assert int(w0) == patch_pos.shape[-2] and int(h0) == patch_pos.shape[-1]
    return torch.cat((class_pos.unsqueeze(0), patch_pos.permute(0, 2, 3, 1).view(1, -1, dim)), dim=1)


class TridentConchV15(nn.Module):
    """TRIDENT's ``CONCHVisionTower`` (224-px ViT-L trunk, interpolated at run time) loaded as its
    ``create_model_from_pretrained`` does: ``resize_pos_embed`` on the checkpoint, then a strict load."""

    def __init__(self, depth: int = 24) -> None:
        super().__init__()
        import timm

        self.trunk = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, depth=depth,
                                       init_values=1.0)
        self.trunk.patch_embed.strict_img_size = False  # TRIDENT's PatchEmbed takes any size
        self.attn_pool_contrast = TridentAttentionalPooler()
        self.ln_contrast = nn.LayerNorm(768)

    def load_published(self, sd: dict[str, torch.Tensor]) -> None:
        sd = dict(sd)
        sd["trunk.pos_embed"] = trident_resize_pos_embed(self.trunk, sd["trunk.pos_embed"])
        self.load_state_dict(sd, strict=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        b, _, w, h = x.shape
        x = t.patch_embed(x)
        x = torch.cat((t.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + trident_interpolate_pos_encoding(t.pos_embed, x.shape[1] - 1, w, h)
        x = t.norm(t.blocks(x))
        return self.ln_contrast(self.attn_pool_contrast(x)[:, 0])


# ---- CONCH v1 (open_clip CoCa vision tower) ----------------------------------------------------------------
class OpenClipAttentionalPooler(nn.Module):
    def __init__(self, d_model: int = 512, context_dim: int = 768, n_head: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q, self.ln_k = nn.LayerNorm(d_model), nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x).permute(1, 0, 2)
        q = self.ln_q(self.query)
        out = self.attn(q.unsqueeze(1).repeat(1, x.shape[1], 1), x, x, need_weights=False)[0]
        return out.permute(1, 0, 2)


class ConchV1Visual(nn.Module):
    """CONCH's ``VisualModel`` (contrastive + captioning poolers, ``proj_contrast``) and
    ``forward_no_head``, i.e. ``encode_image(x, proj_contrast=False, normalize=False)``."""

    def __init__(self, depth: int = 12) -> None:
        super().__init__()
        import timm

        self.trunk = timm.models.vision_transformer.VisionTransformer(
            embed_dim=768, depth=depth, num_heads=12, mlp_ratio=4, img_size=448, patch_size=16, num_classes=0,
            dynamic_img_size=True)
        self.attn_pool_contrast = OpenClipAttentionalPooler(512, 768, 8, 1)
        self.ln_contrast = nn.LayerNorm(512)
        self.proj_contrast = nn.Parameter(768 ** -0.5 * torch.randn(512, 512))
        self.attn_pool_caption = OpenClipAttentionalPooler(768, 768, 8, 256)
        self.ln_caption = nn.LayerNorm(768)

    def forward_no_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk.forward_features(x)
        return self.ln_contrast(self.attn_pool_contrast(x)[:, 0])


# ---- CHIEF -------------------------------------------------------------------------------------------------
class AttnNetGated(nn.Module):
    def __init__(self, L: int, D: int, dropout: bool = True, n_classes: int = 1) -> None:  # noqa: N803
        super().__init__()
        a: list[nn.Module] = [nn.Linear(L, D), nn.Tanh()]
        b: list[nn.Module] = [nn.Linear(L, D), nn.Sigmoid()]
        if dropout:
            a.append(nn.Dropout(0.25))
            b.append(nn.Dropout(0.25))
        self.attention_a, self.attention_b = nn.Sequential(*a), nn.Sequential(*b)
        self.attention_c = nn.Linear(D, n_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attention_c(self.attention_a(x).mul(self.attention_b(x))), x


class AttHead(nn.Module):
    def __init__(self, feature_dim: int, im_dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(feature_dim, im_dim), nn.Linear(im_dim, 1)


class Chief(nn.Module):
    """CHIEF (size 'small', dropout, 2 classes) as ``CHIEF_pretraining.pth`` holds it."""

    def __init__(self, size: tuple[int, int, int] = (768, 512, 256)) -> None:
        super().__init__()
        self.attention_net = nn.Sequential(nn.Linear(size[0], size[1]), nn.ReLU(), nn.Dropout(0.25),
                                           AttnNetGated(size[1], size[2], True, 1))
        self.classifiers = nn.Linear(size[1], 2)
        self.instance_classifiers = nn.ModuleList([nn.Linear(size[1], 2) for _ in range(2)])
        self.att_head = AttHead(size[1], size[2])
        self.text_to_vision = nn.Sequential(nn.Linear(768, size[1]), nn.ReLU(), nn.Dropout(p=0.25))
        self.register_buffer("organ_embedding", torch.randn(19, 768))

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        h_ori = h
        A, h = self.attention_net(h)  # noqa: N806
        A = F.softmax(torch.transpose(A, 1, 0), dim=1)  # noqa: N806
        return {"WSI_feature": torch.mm(A, h_ori), "attention": A}


# ---- MADELEINE ---------------------------------------------------------------------------------------------
class BatchedABMIL(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, dropout: bool = True, n_classes: int = 1,
                 activation: str = "softmax") -> None:
        super().__init__()
        self.activation = activation
        a: list[nn.Module] = [nn.Linear(input_dim, hidden_dim), nn.Tanh()]
        b: list[nn.Module] = [nn.Linear(input_dim, hidden_dim), nn.Sigmoid()]
        if dropout:
            a.append(nn.Dropout(0.25))
            b.append(nn.Dropout(0.25))
        self.attention_a, self.attention_b = nn.Sequential(*a), nn.Sequential(*b)
        self.attention_c = nn.Linear(hidden_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A = self.attention_c(self.attention_a(x).mul(self.attention_b(x)))  # noqa: N806
        return F.softmax(A, dim=1) if self.activation == "softmax" else torch.sigmoid(A)


class Madeleine(nn.Module):
    """``MADELEINE`` (stain_encoding=False, wsi_encoder 'abmil') with its ``encode_he``."""

    def __init__(self, patch_dim: int = 512, hidden: int = 512, n_heads: int = 4, activation: str = "softmax") \
            -> None:
        super().__init__()
        self.n_heads = n_heads
        self.wsi_embedders = nn.Module()
        self.wsi_embedders.pre_attn = nn.Sequential(
            nn.Linear(patch_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(0.1),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(0.1),
            nn.Linear(hidden, hidden * n_heads), nn.LayerNorm(hidden * n_heads), nn.GELU(), nn.Dropout(0.1))
        self.wsi_embedders.attn = nn.ModuleList([BatchedABMIL(hidden, 512, True, 1, activation)
                                                 for _ in range(n_heads)])
        self.token_projector = nn.Linear(512 * n_heads, 128)
        self.projector = nn.Linear(512 * n_heads, 512)

    def encode_he(self, feats: torch.Tensor) -> torch.Tensor:
        bs = feats.shape[0]
        emb = self.wsi_embedders.pre_attn(feats)
        emb = emb.reshape(*emb.shape[:2], -1, self.n_heads) if self.n_heads > 1 else emb.unsqueeze(-1)
        attention = torch.stack([net(emb[:, :, :, i]) for i, net in enumerate(self.wsi_embedders.attn)], dim=-1)
        slide = torch.sum(emb * attention, dim=1)
        return self.projector(slide.view(bs, -1)).view(bs, 1, -1).squeeze(dim=1)
