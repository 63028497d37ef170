"""MoCo-v2's two-view augmentation as batch ops on uint8 (B, 3, H, W) tensors, drawn from an
explicit generator (kornia's random ops draw from the global stream, which would break
per-(seed, epoch, step) reproducibility).

MoCo-v2 ("aug+"): RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3), ColorJitter(0.4, 0.4, 0.4, 0.1)
with p 0.8, RandomGrayscale p 0.2, GaussianBlur(sigma 0.1-2.0 at 224 px) with p 0.5, horizontal
flip, ImageNet normalisation. Departures, all small and stated:
- the crop box is drawn once and clamped to the image (torchvision retries up to 10 times and
  falls back to a centre crop);
- colour jitter applies brightness, contrast, saturation, hue in a fixed order (torchvision shuffles
  the order per image), and the hue shift rotates the chroma plane in YIQ space rather than
  shifting the HSV hue (a smooth linear approximation that needs no colour-space round trip);
- the blur sigma scales with the image size (sigma x size / 224), so small images are not
  blurred out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fedward.data.augment import IMAGENET_MEAN, IMAGENET_STD, _normalize_unit, gaussian_blur

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
# RGB <-> YIQ, used to rotate hue about the luma axis.
RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
YIQ_TO_RGB = torch.linalg.inv(RGB_TO_YIQ)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma of float RGB images."""
    weights = torch.tensor(GRAY_WEIGHTS, dtype=images.dtype, device=images.device)
    return (images * weights[:, None, None]).sum(dim=1, keepdim=True)


def resized_crop_theta(n: int, scale: tuple[float, float], ratio: tuple[float, float], hflip: torch.Tensor,
                       generator: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) affine matrices (affine_grid convention) of random crops, optionally mirrored."""
    area = _uniform(n, *scale, generator)
    log_ratio = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator)
    aspect = torch.exp(log_ratio)
    width = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the image side
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    centre_x = (_uniform(n, 0.0, 1.0, generator) * 2 - 1) * (1 - width)
    centre_y = (_uniform(n, 0.0, 1.0, generator) * 2 - 1) * (1 - height)
    sign = torch.where(hflip, -1.0, 1.0).double()
    zero = torch.zeros(n, dtype=torch.float64)
    theta = torch.stack([torch.stack([width * sign, zero, centre_x], 1), torch.stack([zero, height, centre_y], 1)], 1)
    return theta.float()


class MocoV2Augment:
    """One random MoCo-v2 view of every image in a batch; call twice for the two views."""

    def __init__(self, image_size: int, *, crop_scale: tuple[float, float] = (0.2, 1.0),
                 crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1), jitter_p: float = 0.8,
                 grayscale_p: float = 0.2, blur_sigma: tuple[float, float] = (0.1, 2.0), blur_p: float = 0.5,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        self.image_size = image_size
        self.crop_scale, self.crop_ratio = crop_scale, crop_ratio
        self.jitter, self.jitter_p, self.grayscale_p, self.blur_p = jitter, jitter_p, grayscale_p, blur_p
        factor = image_size / 224
        self.blur_sigma = (blur_sigma[0] * factor, blur_sigma[1] * factor)
        # torchvision's MoCo blur at 224 px uses a kernel of about 10% of the image (23 px).
        half = max(1, round(0.05 * image_size))
        self.kernel = 2 * half + 1
        self.mean, self.std = mean, std

    def __call__(self, images_uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise ValueError(f"MocoV2Augment expects uint8 (B, C, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}")
        n = len(images_uint8)
        device = images_uint8.device
        # Every draw is made for every image, in a fixed order, whatever the outcome.
        hflip = torch.rand(n, generator=generator) < 0.5
        theta = resized_crop_theta(n, self.crop_scale, self.crop_ratio, hflip, generator)
        brightness, contrast, saturation = (_uniform(n, 1 - j, 1 + j, generator).float() for j in self.jitter[:3])
        hue = _uniform(n, -self.jitter[3], self.jitter[3], generator).float()
        do_jitter = torch.rand(n, generator=generator) < self.jitter_p
        do_gray = torch.rand(n, generator=generator) < self.grayscale_p
        sigma = _uniform(n, *self.blur_sigma, generator).float()
        do_blur = torch.rand(n, generator=generator) < self.blur_p

        images = images_uint8.float().div_(255.0)
        grid = F.affine_grid(theta.to(device), [n, 3, self.image_size, self.image_size], align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        images = torch.where(do_jitter.to(device)[:, None, None, None], self._jitter(images, brightness, contrast,
                                                                                      saturation, hue), images)
        images = torch.where(do_gray.to(device)[:, None, None, None], grayscale(images).expand_as(images), images)
        blurred = gaussian_blur(images, sigma.to(device), (self.kernel, self.kernel))
        images = torch.where(do_blur.to(device)[:, None, None, None], blurred, images)
        return _normalize_unit(images, self.mean, self.std)

    @staticmethod
    def _jitter(images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor,
                hue: torch.Tensor) -> torch.Tensor:
        per_image = lambda t: t.to(images.device)[:, None, None, None]  # noqa: E731
        images = (images * per_image(brightness)).clamp(0, 1)
        mean_gray = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
        images = ((images - mean_gray) * per_image(contrast) + mean_gray).clamp(0, 1)
        gray = grayscale(images)
        images = ((images - gray) * per_image(saturation) + gray).clamp(0, 1)
        # Hue: rotate (I, Q) by 2 pi hue about the Y (luma) axis.
        angle = 2 * math.pi * hue.to(images.device)
        cos, sin = torch.cos(angle), torch.sin(angle)
        one, zero = torch.ones_like(cos), torch.zeros_like(cos)
        rotation = torch.stack([torch.stack([one, zero, zero], 1), torch.stack([zero, cos, -sin], 1),
                                torch.stack([zero, sin, cos], 1)], 1)
        to_yiq, to_rgb = RGB_TO_YIQ.to(images), YIQ_TO_RGB.to(images)
        transform = to_rgb @ rotation @ to_yiq  # (B, 3, 3)
        images = torch.einsum("bij,bjhw->bihw", transform, images)
        return images.clamp(0, 1)
