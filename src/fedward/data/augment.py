"""Batched tensor augmentation on the training device, reproducible with an explicit generator.

``BatchAugment`` applies the reference Fed-MAS train transforms (random horizontal and vertical
flips, an always-on Gaussian blur with a (5 wide, 9 high) kernel and sigma ~ U[0.1, 5], a random
rotation in [-10, 10] degrees, then ImageNet normalisation) to a whole uint8 batch at once.

Why not kornia: kornia's random augmentations draw from torch's global RNG and take no
``torch.Generator``, so per-(seed, round, client) generators could not be honoured and a client's
augmentations would depend on the order clients run in. These ops are written here instead.

Departures from the reference, on purpose:
- The reference blurs and rotates the full-resolution JPEG and only then resizes to 224 px.
  fedward applies the same ops to the cached fixed-size tensor, so a 5x9 kernel is relatively
  stronger at small cache sizes. ``blur_scale`` shrinks sigma and the kernel extent to compensate
  (e.g. ``image_size / original_width``, about 0.2 for ISIC JPEGs cached at 224 px).
- The reference rounds the blurred image back to uint8 (torchvision blurs PIL images that way);
  here the batch stays float after the blur.
- torchvision's ``RandomRotation`` defaults to nearest interpolation; the default here is
  bilinear (``rotation_interpolation="nearest"`` gives the reference behaviour).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fedward.config import AUGMENT_BACKENDS
from fedward.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel, as float32; channels are dimension -3."""
    return _normalize_unit(images_uint8.float() / 255.0, mean, std)


def _normalize_unit(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalise float images already in [0, 1]."""
    shape = (3, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).reshape(shape)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).reshape(shape)
    return (images - mean_t) / std_t


def gaussian_kernel1d(size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Normalised 1-d Gaussian kernels of odd ``size`` for each sigma: (len(sigma), size).

    Taps at integer offsets -(size-1)/2 .. (size-1)/2, as torchvision's ``GaussianBlur``.
    """
    half = (size - 1) / 2
    offsets = torch.linspace(-half, half, size, dtype=sigma.dtype, device=sigma.device)
    weights = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    return weights / weights.sum(dim=1, keepdim=True)


def reflect_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Source indices for reflect padding (edge not repeated) of a length-``n`` axis by ``pad``.

    Unlike ``F.pad(mode="reflect")`` this also works when ``pad >= n`` (it keeps reflecting).
    """
    index = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(index)
    period = 2 * (n - 1)
    index = torch.remainder(index, period)
    return torch.where(index >= n, period - index, index)


def blur_matrices(n: int, kernel: torch.Tensor) -> torch.Tensor:
    """(B, n, n) matrices applying each row of ``kernel`` (B, k) along an axis of length ``n`` with
    reflect padding folded in: ``out[i] = sum_j M[i, j] * x[j]``."""
    batch, size = kernel.shape
    source = reflect_index(n, size // 2, kernel.device)
    columns = source[torch.arange(n, device=kernel.device)[:, None] + torch.arange(size, device=kernel.device)[None, :]]
    matrices = torch.zeros(batch, n, n, dtype=kernel.dtype, device=kernel.device)
    # scatter_add: near the edges two taps can reflect onto the same source pixel.
    matrices.scatter_add_(2, columns.expand(batch, n, size), kernel[:, None, :].expand(batch, n, size).contiguous())
    return matrices


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: tuple[int, int]) -> torch.Tensor:
    """Blur each image of a float (B, C, H, W) batch with its own sigma (same on both axes).

    ``kernel_size`` is (width, height), both odd; separable, reflect padding. Each axis is one
    batched matmul with a banded matrix: it wastes multiply-adds on zeros, but on CPU it is several
    times faster than a depthwise (groups = B*C) convolution, and it is one kernel on a GPU.
    """
    batch, channels, height, width = images.shape
    kernel_w, kernel_h = kernel_size
    sigma = sigma.to(device=images.device, dtype=images.dtype)
    out = images
    if kernel_w > 1:
        along_w = blur_matrices(width, gaussian_kernel1d(kernel_w, sigma))
        out = (out.reshape(batch, channels * height, width) @ along_w.transpose(1, 2)).reshape(batch, channels, height, width)
    if kernel_h > 1:
        along_h = blur_matrices(height, gaussian_kernel1d(kernel_h, sigma))
        out = along_h[:, None] @ out
    return out


def rotate(images: torch.Tensor, degrees: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Rotate each image of a float (B, C, H, W) batch counter-clockwise by its angle, about the
    centre, keeping the size and filling uncovered pixels with 0 (as torchvision)."""
    batch, _, height, width = images.shape
    radians = degrees.to(device=images.device, dtype=images.dtype) * (math.pi / 180.0)
    cos, sin = torch.cos(radians), torch.sin(radians)
    zero = torch.zeros_like(cos)
    # Output pixel p' samples the input at R(-angle) p' in pixel units (y points down); the H/W
    # factors convert that to affine_grid's normalised [-1, 1] coordinates for non-square images.
    theta = torch.stack(
        [
            torch.stack([cos, -sin * height / width, zero], dim=1),
            torch.stack([sin * width / height, cos, zero], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def _odd_at_least_one(size: float) -> int:
    half = max(0, int(math.floor((size - 1) / 2 + 0.5)))
    return 2 * half + 1


class BatchAugment:
    """The reference Fed-MAS train transforms as batch ops on (B, 3, H, W) uint8 tensors.

    Order: horizontal flip (p), vertical flip (p), Gaussian blur (always, per-image sigma),
    rotation (per-image angle), normalisation. Every random draw (flip flags, sigma, angle) is made
    for every image even when its op is off, so turning one op off leaves the others' draws unchanged.
    """

    def __init__(
        self,
        *,
        hflip: bool = True,
        vflip: bool = True,
        flip_p: float = 0.5,
        blur: bool = True,
        kernel_size: tuple[int, int] = (5, 9),
        sigma: tuple[float, float] = (0.1, 5.0),
        blur_scale: float = 1.0,
        rotation: bool = True,
        degrees: float | tuple[float, float] = 10.0,
        rotation_interpolation: str = "bilinear",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        backend: str = "torch",
    ) -> None:
        if not 0.0 <= flip_p <= 1.0:
            raise ConfigError(f"flip_p must be in [0, 1], got {flip_p}")
        if len(kernel_size) != 2 or any(k < 1 or k % 2 == 0 for k in kernel_size):
            raise ConfigError(f"kernel_size must be two odd positive ints (width, height), got {kernel_size}")
        if not 0 < sigma[0] <= sigma[1]:
            raise ConfigError(f"sigma must be (min, max) with 0 < min <= max, got {sigma}")
        if not blur_scale > 0:
            raise ConfigError(f"blur_scale must be > 0, got {blur_scale}")
        if backend not in AUGMENT_BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(AUGMENT_BACKENDS)}, got {backend!r}")
        if rotation_interpolation not in ("bilinear", "nearest"):
            raise ConfigError(f"rotation_interpolation must be 'bilinear' or 'nearest', got {rotation_interpolation!r}")
        low, high = (-float(degrees), float(degrees)) if isinstance(degrees, (int, float)) else map(float, degrees)
        if low > high:
            raise ConfigError(f"degrees must be a number d >= 0 or a range (low, high) with low <= high, got {degrees}")
        self.hflip, self.vflip, self.flip_p = hflip, vflip, flip_p
        self.blur, self.rotation = blur, rotation
        self.sigma = (sigma[0] * blur_scale, sigma[1] * blur_scale)
        # Scaling the kernel extent with sigma keeps the kernel's truncation the same relative size.
        self.kernel_size = (_odd_at_least_one(kernel_size[0] * blur_scale), _odd_at_least_one(kernel_size[1] * blur_scale))
        self.degrees = (low, high)
        self.rotation_interpolation = rotation_interpolation
        self.mean, self.std = tuple(mean), tuple(std)
        self.backend = backend

    def draw(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The per-image random parameters, drawn in a fixed order from ``generator``."""
        device = generator.device
        hflip = torch.rand(batch_size, generator=generator, device=device) < self.flip_p
        vflip = torch.rand(batch_size, generator=generator, device=device) < self.flip_p
        unit_sigma = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
        unit_angle = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
        sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * unit_sigma
        angle = self.degrees[0] + (self.degrees[1] - self.degrees[0]) * unit_angle
        return {"hflip": hflip, "vflip": vflip, "sigma": sigma.float(), "angle": angle.float()}

    def __call__(self, images_uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment and normalise a (B, 3, H, W) uint8 batch; returns float32 on the batch's device."""
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise ValueError(f"BatchAugment expects uint8 (B, C, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}")
        params = {k: v.to(images_uint8.device) for k, v in self.draw(len(images_uint8), generator).items()}
        if self.backend == "opencv":
            return self._opencv(images_uint8, params)
        batch, channels, height, width = images_uint8.shape
        images = images_uint8.float()
        mean = torch.as_tensor(self.mean, dtype=images.dtype, device=images.device)
        std = torch.as_tensor(self.std, dtype=images.dtype, device=images.device)
        # 1 / (255 std) is folded into the blur (or applied alone); rotation is linear with zero
        # fill, so subtracting mean / std last gives exactly (rotated / 255 - mean) / std.
        scale = 1.0 / (255.0 * std)
        if self.blur:
            along_w = blur_matrices(width, gaussian_kernel1d(self.kernel_size[0], params["sigma"].to(images.dtype)))
            along_h = blur_matrices(height, gaussian_kernel1d(self.kernel_size[1], params["sigma"].to(images.dtype)))
            # Flip-then-blur is the blur matrix with its columns reversed: the flips cost nothing.
            if self.hflip:
                along_w = torch.where(params["hflip"][:, None, None], along_w.flip(-1), along_w)
            if self.vflip:
                along_h = torch.where(params["vflip"][:, None, None], along_h.flip(-1), along_h)
            images = (images.reshape(batch, channels * height, width) @ along_w.transpose(1, 2)).reshape(images.shape)
            images = (along_h[:, None] * scale[None, :, None, None]) @ images
        else:
            if self.hflip:
                images = torch.where(params["hflip"][:, None, None, None], images.flip(-1), images)
            if self.vflip:
                images = torch.where(params["vflip"][:, None, None, None], images.flip(-2), images)
            images = images * scale[:, None, None]
        if self.rotation:
            images = rotate(images, params["angle"], self.rotation_interpolation)
        return images.sub_((mean / std)[:, None, None])


    def _opencv(self, images_uint8: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The same ops with the same parameters, one image at a time with OpenCV (float32
        throughout, as the batched path): on a CPU at 64 px and above it is several times faster
        (``bench/bench_augment.py``), because OpenCV's blur and warp are SIMD kernels where torch
        has only a banded matmul and ``grid_sample``."""
        import cv2

        if images_uint8.device.type != "cpu":
            raise ValueError(f"the opencv augmentation backend works on CPU tensors, got {images_uint8.device}")
        batch, channels, height, width = images_uint8.shape
        source = images_uint8.permute(0, 2, 3, 1).numpy()
        out = np.empty((batch, height, width, channels), dtype=np.float32)
        hflip, vflip = params["hflip"].tolist(), params["vflip"].tolist()
        sigmas, angles = params["sigma"].tolist(), params["angle"].tolist()
        centre = ((width - 1) / 2.0, (height - 1) / 2.0)  # pixel centres, as affine_grid with align_corners=False
        interpolation = cv2.INTER_LINEAR if self.rotation_interpolation == "bilinear" else cv2.INTER_NEAREST
        for i in range(batch):
            image = source[i].astype(np.float32)
            if self.hflip and hflip[i]:
                image = cv2.flip(image, 1)
            if self.vflip and vflip[i]:
                image = cv2.flip(image, 0)
            if self.blur:
                image = cv2.GaussianBlur(image, self.kernel_size, sigmaX=sigmas[i], sigmaY=sigmas[i],
                                         borderType=cv2.BORDER_REFLECT_101)
            if self.rotation:
                matrix = cv2.getRotationMatrix2D(centre, angles[i], 1.0)
                image = cv2.warpAffine(image, matrix, (width, height), flags=interpolation,
                                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            out[i] = image.reshape(height, width, channels)  # OpenCV drops a single channel's axis
        images = torch.from_numpy(out).permute(0, 3, 1, 2)
        return _normalize_unit(images / 255.0, self.mean, self.std).contiguous()


def _blur_pil_like_torchvision(image: Image.Image, sigma: float, kernel_size: tuple[int, int]) -> Image.Image:
    """torchvision's GaussianBlur on a PIL image, op for op: PIL -> uint8 tensor -> float, reflect
    padding, one 2-d (height x width) depthwise conv, round back to uint8 -> PIL. Pillow's own
    kernels stop at 5x5 and its GaussianBlur is untruncated, so it could not reproduce a 5x9 kernel."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float()
    sigmas = torch.tensor([sigma], dtype=torch.float32)
    kernel = gaussian_kernel1d(kernel_size[1], sigmas)[0][:, None] * gaussian_kernel1d(kernel_size[0], sigmas)[0][None, :]
    channels = pixels.shape[1]
    pad = (kernel_size[0] // 2, kernel_size[0] // 2, kernel_size[1] // 2, kernel_size[1] // 2)
    blurred = F.conv2d(F.pad(pixels, pad, mode="reflect"), kernel.expand(channels, 1, -1, -1), groups=channels)
    out = blurred.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(out)


def reference_pil_transform(
    image: Image.Image,
    output_size: int,
    rng: random.Random,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """The reference per-image train pipeline on a PIL RGB image, without torchvision (Pillow for
    every op but the blur, which copies torchvision's tensor implementation).

    Horizontal flip (p=0.5), vertical flip (p=0.5), Gaussian blur (5x9, sigma ~ U[0.1, 5]),
    rotation ~ U[-10, 10] degrees (nearest, zero fill: torchvision's defaults), bilinear resize to
    ``output_size`` x ``output_size``, to a [0, 1] tensor, normalise. Returns float32 (3, S, S).
    """
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    image = _blur_pil_like_torchvision(image, rng.uniform(0.1, 5.0), (5, 9))
    image = image.rotate(rng.uniform(-10.0, 10.0), resample=Image.Resampling.NEAREST, expand=False, fillcolor=(0, 0, 0))
    image = image.resize((output_size, output_size), Image.Resampling.BILINEAR)
    tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    return normalize(tensor, mean, std)
