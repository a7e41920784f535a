"""SR-ViT: a Vision Transformer whose blocks recurse, mixed per token by a soft router (SoftMoR)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SRViTConfig:
    img_size: int = 224  # input height and width in pixels
    patch_size: int = 16  # side of a patch; the token grid is img_size // patch_size squared
    in_chans: int = 3  # 3 for RGB, 1 for grayscale
    num_classes: int = 1000
    embed_dim: int = 384  # token width
    num_blocks: int = 12  # distinct transformer blocks (each one recursed up to max_depth times)
    num_heads: int = 6
    mlp_ratio: float = 4.0
    max_depth: int = 4  # recursion steps per block; forward() accepts any depth in 1..max_depth
    router_hidden: int = 384  # hidden width of each block's router MLP
    stem: str = "patch"  # "patch": one strided conv; "conv": 3x3 convs with BatchNorm, two of stride 2 (patch_size 4)
    stem_convs: int = 3  # "conv" stem: its 3x3 convs; those beyond 3 are stride-1 convs at half resolution
    pool: str = "cls"  # "cls": the head reads a class token (DeiT); "mean": the mean of the patch tokens

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {self.stem!r}")
        if self.stem == "conv" and self.patch_size != 4:
            raise ValueError("the 'conv' stem downsamples by 4, so it needs patch_size=4")
        if self.stem == "conv" and self.stem_convs < 3:
            raise ValueError(f"the 'conv' stem has at least 3 convs, got stem_convs={self.stem_convs}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {self.max_depth}")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Tokens the blocks see: the patches, plus the class token when the head reads one."""
        return self.num_patches + (self.pool == "cls")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SRViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; this srvit knows {sorted(known)}")
        return cls(**d)


class PatchEmbed(nn.Module):
    """Image to patch tokens: [B, C, H, W] -> [B, num_patches, embed_dim]."""

    def __init__(self, cfg: SRViTConfig):
        super().__init__()
        d = cfg.embed_dim
        if cfg.stem == "patch":
            self.proj = nn.Conv2d(cfg.in_chans, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        else:  # early convolutions (with BatchNorm, as in Xiao et al. 2021) make small ViTs train much faster
            extra = [m for _ in range(cfg.stem_convs - 3) for m in _conv_bn(d // 2, d // 2, stride=1)]
            self.proj = nn.Sequential(
                *_conv_bn(cfg.in_chans, d // 4, stride=1),  # full resolution
                *_conv_bn(d // 4, d // 2, stride=2),  # half resolution
                *extra,  # more locality, cheaply, at half resolution
                nn.Conv2d(d // 2, d, kernel_size=3, stride=2, padding=1),  # a quarter: one token per 4x4 patch
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # [B, D, H/p, W/p]
        return x.flatten(2).transpose(1, 2)  # [B, N, D]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, head_dim]
        x = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, head_dim]
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm transformer block: the shared weights of one recursion."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SoftMoRBlock(nn.Module):
    """One block applied `depth` times; a router mixes the outputs of all steps per token.

    Step r (1-based) computes h_r = block(h_{r-1} + e_r), where e_r is a learned step
    embedding that tells the shared weights which step they are running. The router
    scores every h_r for every token, and the output is sum_r softmax_r(score) * h_r,
    the softmax running over the steps actually taken, so any depth uses the same weights.
    """

    def __init__(self, cfg: SRViTConfig):
        super().__init__()
        d = cfg.embed_dim
        self.max_depth = cfg.max_depth
        self.block = Block(d, cfg.num_heads, cfg.mlp_ratio)
        self.step_embed = nn.Parameter(torch.zeros(cfg.max_depth, d))
        self.router = nn.Sequential(
            nn.LayerNorm(d, eps=1e-6), nn.Linear(d, cfg.router_hidden), nn.GELU(), nn.Linear(cfg.router_hidden, 1)
        )  # fmt: skip

    def steps(self, x: torch.Tensor, depth: int) -> list[torch.Tensor]:
        """The output of every recursion step, each [B, N, D]."""
        outs = []
        for r in range(depth):  # a Python loop, so export unrolls it into a flat graph
            x = self.block(x + self.step_embed[r])
            outs.append(x)
        return outs

    def mix(self, outs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's per-token mixture of step outputs, and its weights [B, N, depth]."""
        stacked = torch.stack(outs, dim=2)  # [B, N, depth, D]
        weights = self.router(stacked).squeeze(-1).softmax(dim=-1)  # [B, N, depth]
        return (weights.unsqueeze(-1) * stacked).sum(dim=2), weights  # [B, N, D], [B, N, depth]

    def route(self, x: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block's output [B, N, D] and the router's weights [B, N, depth], or None at depth 1."""
        outs = self.steps(x, depth)
        if depth == 1:  # a softmax over one step is exactly 1: skip the router's work
            return outs[0], None
        return self.mix(outs)

    def forward(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        return self.route(x, depth)[0]


class SRViT(nn.Module):
    def __init__(self, cfg: SRViTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, d))
        self.blocks = nn.ModuleList(SoftMoRBlock(cfg) for _ in range(cfg.num_blocks))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, cfg.num_classes)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for blk in self.blocks:
            nn.init.trunc_normal_(blk.step_embed, std=0.02)

    def check_depth(self, depth: int | None) -> int:
        depth = self.cfg.max_depth if depth is None else depth
        if not 1 <= depth <= self.cfg.max_depth:
            raise ValueError(f"depth must be in 1..{self.cfg.max_depth}, got {depth}")
        return depth

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # [B, N, D]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [B, N+1, D]
        return x + self.pos_embed  # [B, T, D], T = cfg.num_tokens

    def forward_features(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        return self.routed_features(x, depth)[0]  # [B, T, D]

    def routed_features(self, x: torch.Tensor, depth: int | None = None) -> tuple[torch.Tensor, list]:
        """forward_features, and each block's router weights [B, T, depth] (None at depth 1): the same
        operations, so the graph export traces through forward is unchanged."""
        depth = self.check_depth(depth)
        x, weights = self.embed(x), []
        for blk in self.blocks:
            x, w = blk.route(x, depth)
            weights.append(w)
        return self.norm(x), weights  # [B, T, D], num_blocks x ([B, T, depth] or None)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.cfg.pool == "cls" else x.mean(dim=1)  # [B, D]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, depth))

    def forward_with_router_load(self, x: torch.Tensor, depth: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, num_classes] and this forward's router load [num_blocks, depth]: each step's mean weight
        over the batch and tokens, what `router_balance_loss` reads. At depth 1 the single step has all the
        weight (a load of exactly 1 per block): there is nothing to balance."""
        feats, weights = self.routed_features(x, depth)
        if weights[0] is None:  # depth 1: the router did not run
            load = feats.new_ones(len(self.blocks), 1)  # [blocks, 1]
        else:
            load = torch.stack([w.mean(dim=(0, 1)) for w in weights])  # [blocks, depth]
        return self.forward_head(feats), load

    @torch.no_grad()
    def router_weights(self, x: torch.Tensor, depth: int | None = None) -> list[torch.Tensor]:
        """Each block's mixture weights [B, T, depth]: where the model puts its recursion."""
        depth = self.check_depth(depth)
        x, weights = self.embed(x), []
        for blk in self.blocks:
            x, w = blk.mix(blk.steps(x, depth))
            weights.append(w)
        return weights

    @staticmethod
    def router_balance_loss(router_load: torch.Tensor) -> torch.Tensor:
        """KL(mean step weights || uniform), averaged over blocks, of the forward that returned `router_load`
        (`forward_with_router_load`); exactly 0 at depth 1.

        Without it the router collapses onto step 1 early in training (deeper steps start
        out noisier), which makes depth irrelevant; this keeps every step in use on
        average while each token still chooses its own mix.
        """
        uniform_ratio = router_load * router_load.shape[-1]  # [blocks, depth]: load / (1 / depth)
        return (router_load * uniform_ratio.clamp_min(1e-9).log()).sum(-1).mean()

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for blk in self.blocks for p in blk.router.parameters()]


class FixedDepth(nn.Module):
    """The model at one depth with a single input: what export traces, one graph per depth."""

    def __init__(self, model: SRViT, depth: int):
        super().__init__()
        self.model = model
        self.depth = model.check_depth(depth)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, self.depth)


def _conv_bn(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU()]


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
