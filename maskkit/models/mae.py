"""The masked autoencoder: a ViT encoder over kept tokens and a light decoder with mask tokens.

It follows ``facebookresearch/mae`` (``models_mae.py``) and the MLO-MAE reference model on
timm's ``PatchEmbed`` and ``Block``. Masking is not decided here: the model exposes the steps
(:meth:`embed`, :meth:`encode`, :meth:`decode`, :meth:`reconstruction_error`) and a mask
policy decides which tokens :meth:`encode` keeps.

Shapes: B images, L = (H / p)² patches, K kept patches, D encoder width, D' decoder width.
"""

from __future__ import annotations

import torch
from timm.layers import PatchEmbed
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from maskkit.config import ModelConfig
from maskkit.runtime import full_precision


def sincos_pos_embed(grid_size: int, dim: int) -> Tensor:
    """2-D sin-cos position embeddings with a zero row for the CLS token: ``[1, 1 + L, dim]``."""
    table = build_sincos2d_pos_embed([grid_size, grid_size], dim=dim, temperature=10000.0)
    return torch.cat([torch.zeros(1, dim), table.float()], dim=0).unsqueeze(0)


class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT backbone; the encoder sees only the tokens a mask policy keeps.

    As in the reference, position embeddings start as 2-D sin-cos and stay trainable.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        dim, dec_dim = config.embed_dim, config.decoder_embed_dim
        self.patch_embed = PatchEmbed(config.img_size, config.patch_size, config.in_chans, dim)
        self.num_patches = self.patch_embed.num_patches
        self.grid_size = config.img_size // config.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(self.grid_size, dim))
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads, config.mlp_ratio, qkv_bias=True, norm_layer=_norm)
            for _ in range(config.depth)
        )
        self.norm = _norm(dim)

        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(self.grid_size, dec_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(dec_dim, config.decoder_num_heads, config.mlp_ratio, qkv_bias=True, norm_layer=_norm)
            for _ in range(config.decoder_depth)
        )
        self.decoder_norm = _norm(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, config.patch_size**2 * config.in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        # The reference: patch projection xavier as a linear layer, Linear xavier-uniform,
        # LayerNorm (1, 0), cls and mask tokens normal(0.02).
        projection = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(projection.view(projection.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def encoder(self) -> nn.Module:
        """The encoder's parameters (no decoder) under one module, for an optimiser."""
        view = nn.Module()
        view.patch_embed, view.blocks, view.norm = self.patch_embed, self.blocks, self.norm
        view.cls_token, view.pos_embed = self.cls_token, self.pos_embed
        return view

    def patchify(self, images: Tensor) -> Tensor:
        """``[B, C, H, W]`` → ``[B, L, p·p·C]``."""
        p, channels = self.config.patch_size, images.shape[1]
        g = images.shape[2] // p
        x = images.reshape(images.shape[0], channels, g, p, g, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(images.shape[0], g * g, p * p * channels)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """``[B, L, p·p·C]`` → ``[B, C, H, W]``."""
        p, g = self.config.patch_size, self.grid_size
        channels = patches.shape[2] // (p * p)
        x = patches.reshape(patches.shape[0], g, g, p, p, channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(patches.shape[0], channels, g * p, g * p)

    def embed(self, images: Tensor) -> Tensor:
        """Patch tokens with position embeddings: ``[B, C, H, W]`` → ``[B, L, D]``."""
        return self.patch_embed(images) + self.pos_embed[:, 1:, :]

    def encode(self, tokens: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """Run the encoder on the kept tokens.

        Args:
            tokens: ``[B, L, D]`` from :meth:`embed`.
            ids_keep: ``[B, K]`` indices of the tokens to keep; None keeps all.

        Returns:
            ``[B, 1 + K, D]`` normalised latents, CLS first.
        """
        if ids_keep is not None:
            index = ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
            tokens = torch.gather(tokens, dim=1, index=index)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def decode(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Predict every patch's pixels.

        Args:
            latent: ``[B, 1 + K, D]`` from :meth:`encode`.
            ids_restore: ``[B, L]`` permutation that restores ``[kept ++ masked]`` order.

        Returns:
            ``[B, L, p·p·C]`` pixel predictions.
        """
        x = self.decoder_embed(latent)
        num_masked = ids_restore.shape[1] + 1 - x.shape[1]
        mask_tokens = self.mask_token.expand(x.shape[0], num_masked, -1)
        patches = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        index = ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2])
        patches = torch.gather(patches, dim=1, index=index)
        x = torch.cat([x[:, :1, :], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def reconstruction_error(self, images: Tensor, pred: Tensor) -> Tensor:
        """Per-patch mean squared error ``[B, L]``, against per-patch normalised pixels
        when ``norm_pix_loss`` is on (subtract the mean, divide by sqrt(var + 1e-6))."""
        target = self.patchify(images)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return ((full_precision(pred) - full_precision(target)) ** 2).mean(dim=-1)

    def forward(self, images: Tensor, ids_keep: Tensor, ids_restore: Tensor) -> tuple[Tensor, Tensor]:
        """Reconstruct ``images`` under a mask decided elsewhere.

        Args:
            images: ``[B, C, H, W]``.
            ids_keep: ``[B, K]`` the tokens the encoder sees.
            ids_restore: ``[B, L]`` the matching restore permutation.

        Returns:
            ``(tokens [B, L, D], pred [B, L, p·p·C])``: the patch tokens a policy reads, and the
            pixel predictions. ``torch.func.functional_call`` evaluates it at other weights.
        """
        tokens = self.embed(images)
        return tokens, self.decode(self.encode(tokens, ids_keep), ids_restore)

    def features(self, images: Tensor) -> Tensor:
        """CLS feature of the unmasked encoder: ``[B, C, H, W]`` → ``[B, D]``."""
        return self.encode(self.embed(images))[:, 0]

    def denormalized_prediction(self, images: Tensor, pred: Tensor) -> Tensor:
        """Map norm-pix predictions back to pixel space using each target patch's statistics.

        Returns ``[B, L, p·p·C]`` in the images' (normalised) space, for pictures.
        """
        if not self.config.norm_pix_loss:
            return pred
        target = self.patchify(images)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        return pred * (var + 1.0e-6) ** 0.5 + mean


def _norm(dim: int, **factory: object) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6, **factory)
