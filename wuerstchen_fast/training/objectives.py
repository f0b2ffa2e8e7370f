"""The three training objectives, each an nn.Module whose forward returns the loss, so DDP / FSDP wrap
exactly the parameters that train (the stage, plus the jointly trained compressor or discriminator).

Randomness (t, noise, dropout masks) is an *input*: the trainer draws it for the whole global batch
from one generator and hands each rank its slice, so a run's numbers do not depend on the world size.

Stage C (spec §2, §6):  x0 = (compressor(image) + 1) / 42;  x_t = sqrt(ᾱ)x0 + sqrt(1 − ᾱ)ε, t ~ U(0, 1);
    loss = mean_b[(1 − ᾱ(t_b)) · mean(ε̂ − ε)²]   (p2 weight; `p2_weight=False` drops it).
Stage B (spec §3, §5):  x0 = StageA.encode(image) / scale_factor (the unquantized latent the pipeline
    decodes with `decode(scale_factor · x)`); the semantic embedding e = compressor(image) trains
    jointly; with probability `effnet_noise_prob` it is noised to a level t_e ~ U(0, effnet_noise_max),
    with probability `effnet_drop` replaced by zeros (the decoder's unconditional input); same ε loss.
    `effnet_space="prior"` feeds the decoder's effnet mappers (e + 1) / 42 instead of e (unit scale when the
    compressor is calibrated for Stage C); `fold_effnet_space` turns such a decoder into one that takes e.
Stage A (spec §4):  recon = decode(quantize(encode(x))); loss = mse(recon, x) + l1_weight·|recon − x|
    + vq_weight·(mse(q, z.detach()) + 0.25·mse(z, q.detach())) [+ disc_weight·hinge GAN loss].
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..diffusion import add_noise, alpha_cumprod

__all__ = ["StageCObjective", "StageBObjective", "StageAObjective", "eps_loss", "effnet_input", "fold_effnet_space"]

LATENT_SCALE, LATENT_SHIFT = 42.0, 1.0  # Stage C latents are (effnet + 1) / 42 (spec §2)


def eps_loss(eps_hat: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, p2: bool):
    """-> (loss to optimize, unweighted mse), both fp32 scalars."""
    per = F.mse_loss(eps_hat.float(), noise.float(), reduction="none").mean(dim=tuple(range(1, noise.dim())))
    w = (1 - alpha_cumprod(t)) if p2 else torch.ones_like(per)
    return (per * w).mean(), per.mean().detach()


class StageCObjective(nn.Module):
    def __init__(self, model: nn.Module, p2: bool = True):
        super().__init__()
        self.model, self.p2 = model, p2

    def forward(self, x0: torch.Tensor, text: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
        x_t = add_noise(x0, noise, t)
        eps_hat = self.model(x_t, t.to(x_t.dtype), text)
        return eps_loss(eps_hat, noise, t, self.p2)


def effnet_input(e: torch.Tensor, space: str) -> torch.Tensor:
    """The compressor's output e as a decoder trained in `space` ("raw" or "prior") sees it."""
    return (e + LATENT_SHIFT) / LATENT_SCALE if space == "prior" else e


@torch.no_grad()
def fold_effnet_space(decoder: nn.Module) -> nn.Module:
    """A decoder trained with effnet_space="prior" -> the same function of the raw e, in place: every effnet
    mapper (a 1x1 conv, W z + b with z = (e + 1) / 42) becomes (W / 42) e + (b + W·1 / 42) (new parameter
    tensors; the old ones are left untouched). Exact, because
    the resize in front of the mappers is linear with weights summing to one."""
    for m in decoder.effnet_mappers:
        if m is None:
            continue
        w = m.weight / LATENT_SCALE
        b = m.bias + w.sum(dim=tuple(range(1, w.dim()))) * LATENT_SHIFT
        # New tensors, never an in-place update: the module may share storage with a live training run's
        # parameters or EMA (the trainer exports checkpoints from them).
        m.weight, m.bias = nn.Parameter(w, m.weight.requires_grad), nn.Parameter(b, m.bias.requires_grad)
    return decoder


class StageBObjective(nn.Module):
    """`cond` is the compressor's input images, or (`embedded=True`) its output e, precomputed."""

    def __init__(self, model: nn.Module, compressor: nn.Module, p2: bool = True, *, effnet_space: str = "raw",
                 embedded: bool = False):
        super().__init__()
        self.model, self.compressor, self.p2 = model, compressor, p2
        self.effnet_space, self.embedded = effnet_space, embedded

    def forward(self, x0, cond, text, t, noise, e_noise_t, e_noise, e_noise_on, e_drop):
        emb = cond.float() if self.embedded else self.compressor(cond).float()
        emb = effnet_input(emb, self.effnet_space)
        noised = add_noise(emb, e_noise, e_noise_t)
        emb = torch.where(e_noise_on[:, None, None, None], noised, emb)
        emb = torch.where(e_drop[:, None, None, None], torch.zeros_like(emb), emb)
        x_t = add_noise(x0, noise, t)
        eps_hat = self.model(x_t, t.to(x_t.dtype), emb, text)
        return eps_loss(eps_hat, noise, t, self.p2)


class StageAObjective(nn.Module):
    def __init__(self, model: nn.Module, discriminator: nn.Module | None = None, *, vq_weight: float = 1.0,
                 l1_weight: float = 0.0, disc_weight: float = 0.0):
        super().__init__()
        self.model, self.discriminator = model, discriminator
        self.vq_weight, self.l1_weight, self.disc_weight = vq_weight, l1_weight, disc_weight

    def forward(self, images: torch.Tensor, disc_on: bool = False):
        z = self.model.encode(images)
        q, _, vq_loss = self.model.quantize(z.float())
        recon = self.model.decode(q).float()
        mse = F.mse_loss(recon, images)
        loss = mse + self.vq_weight * vq_loss
        if self.l1_weight:
            loss = loss + self.l1_weight * F.l1_loss(recon, images)
        if self.discriminator is not None:
            # One backward trains both: the generator term sees the discriminator with detached weights, the
            # discriminator term sees detached images. (Computed even before disc_start, weighted 0, so
            # every parameter always gets a gradient as DDP expects.)
            frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            g_adv = -functional_call(self.discriminator, frozen, (recon,)).float().mean()
            d_real = self.discriminator(images).float()
            d_fake = self.discriminator(recon.detach()).float()
            d_loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
            w = self.disc_weight if disc_on else 0.0
            loss = loss + w * (g_adv + d_loss)
        return loss, mse.detach()
