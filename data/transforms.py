"""Image transforms for the streaming loader: decode, square crop + antialiased resize, flip, scaling.

Pure functions, no ``nn.Module`` and no hidden global randomness: the random choices of one sample
(crop offset, flip) come from :func:`sample_augmentation`, a function of explicit integer seed words,
so a resumed stream reproduces the augmentations of an uninterrupted one bit for bit.

The geometry is "shorter-side resize to S, then an S x S crop", computed in the cheaper order:
cut the square of side ``min(H, W)`` from the source (offset along the longer axis), then resize that
square to ``S x S`` with antialiasing. Both decoders share this code path after decoding.

:func:`decode_sample` is the one sample decoder of the training stream and of tokenize: what the sample holds
(data.tar.sample_contents), then the caller's image decoding, every failure a :class:`data.tar.BadSample`.
"""
from __future__ import annotations

import io
import math
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from data.tar import BadSample, RawSample, sample_contents

DECODERS = ("pil", "torchvision")
CROPS = ("random", "center")

# Refuse images whose header declares more pixels than this (decompression bombs), before decoding: PIL's
# default hard limit (2 x 89.5 Mpx), checked here explicitly because PIL's MAX_IMAGE_PIXELS is a process-wide
# global that other code may change.
MAX_PIXELS = 178_956_970


def _check_declared_size(img: Image.Image) -> None:
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise ValueError(f"image declares {width}x{height} pixels, above the {MAX_PIXELS} limit "
                         f"(decompression bomb?)")


def sample_augmentation(seed_words: Sequence[int], crop: str, flip: bool) -> tuple[float, bool]:
    """The random choices of one sample, a pure function of ``seed_words`` (non-negative ints).

    Returns ``(crop_offset, flipped)``: ``crop_offset`` in ``[0, 1]`` is where the square crop starts
    along the longer axis as a fraction of the slack (0.5 = centered); ``flipped`` says whether to
    mirror horizontally.
    """
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    rng = np.random.default_rng(list(seed_words))
    offset, coin = rng.random(2)
    return (float(offset) if crop == "random" else 0.5), bool(flip and coin < 0.5)


def _alpha_over_white(image: torch.Tensor) -> torch.Tensor:
    """uint8 ``C x H x W`` with C in {1, 2, 3, 4} (gray, gray+alpha, RGB, RGBA) -> uint8 ``3 x H x W``.

    Transparent pixels are composited over white (plain channel dropping would expose whatever colour
    the encoder left under alpha = 0, often black).
    """
    channels = image.shape[0]
    if channels in (2, 4):
        alpha = image[-1:].to(torch.float32) / 255.0
        color = image[:-1].to(torch.float32) * alpha + 255.0 * (1.0 - alpha)
        image = color.round_().to(torch.uint8)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    if image.shape[0] != 3:
        raise ValueError(f"unsupported channel count {channels}")
    return image


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    """16-bit samples (uint16 / int32 from PIL 'I' modes) scaled to uint8; uint8 passes through."""
    if image.dtype == torch.uint8:
        return image
    return (image.to(torch.float32) / 257.0).round_().clamp_(0, 255).to(torch.uint8)


def _open_checked(data: bytes) -> Image.Image:
    """Open lazily (header only) and refuse decompression bombs; PIL's global limit is not relied on."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{exc} (limit {MAX_PIXELS} pixels)") from None
    _check_declared_size(img)
    return img


def decode_pil(data: bytes, min_side: int = 0) -> torch.Tensor:
    """Encoded image bytes -> uint8 ``3 x H x W`` RGB tensor, decoded with PIL.

    ``min_side`` > 0 lets JPEG decoding use DCT downscaling (``Image.draft``) while keeping the
    shorter side at least ``min_side`` pixels, which is much faster for large photos.
    """
    with _open_checked(data) as img:
        if min_side > 0 and img.format == "JPEG":
            width, height = img.size
            scale = min_side / min(width, height)
            img.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        if img.mode == "P" or img.mode == "PA":
            img = img.convert("RGBA")
        elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV", "1"):
            img = img.convert("RGB")
        array = np.array(img)  # writable copy: torch refuses read-only buffers
    if array.ndim == 2:
        array = array[:, :, None]
    image = torch.from_numpy(array.astype(np.int32) if array.dtype.itemsize > 1 else array).permute(2, 0, 1)
    return _alpha_over_white(_to_uint8(image))


def decode_torchvision(data: bytes, min_side: int = 0) -> torch.Tensor:
    """Encoded image bytes -> uint8 ``3 x H x W`` RGB tensor, decoded with ``torchvision.io.decode_image``.

    ``min_side`` is accepted for signature parity with :func:`decode_pil`; torchvision has no
    reduced-size JPEG decoding.
    """
    from torchvision.io import ImageReadMode, decode_image

    _open_checked(data).close()
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 marks its decoders deprecated
        image = decode_image(raw, mode=ImageReadMode.UNCHANGED)
    return _alpha_over_white(_to_uint8(image))


def crop_resize_flip(image: torch.Tensor, size: int, crop_offset: float, flipped: bool) -> torch.Tensor:
    """uint8 ``3 x H x W`` -> uint8 ``3 x size x size``: square crop of side ``min(H, W)`` starting at
    ``crop_offset`` (fraction of the slack along the longer axis), antialiased bilinear resize, and a
    horizontal mirror when ``flipped``."""
    height, width = image.shape[-2:]
    side = min(height, width)
    top = round(crop_offset * (height - side))
    left = round(crop_offset * (width - side))
    square = image[:, top:top + side, left:left + side]
    if side != size:
        # imported here: torchvision loads torch._dynamo (~3 s per process), and images stored at the training
        # size (varitok shard's output) never need it
        import torchvision.transforms.v2.functional as TF

        square = TF.resize(square, [size, size], antialias=True)
    return square.flip(-1) if flipped else square


def to_unit_range(image: torch.Tensor) -> torch.Tensor:
    """uint8 ``... x 3 x H x W`` in [0, 255] -> float32 in [-1, 1] (``image / 127.5 - 1``, exactly).

    On the CPU it works image by image, so that the cast, divide and subtract passes run on memory that
    is still in cache: about 2x faster than three passes over a whole batch."""
    if image.device.type != "cpu" or image.dim() < 4:
        return image.to(torch.float32).div_(127.5).sub_(1.0)
    out = torch.empty(image.shape, dtype=torch.float32)
    for source, target in zip(image.reshape(-1, *image.shape[-3:]), out.view(-1, *image.shape[-3:])):
        target.copy_(source).div_(127.5).sub_(1.0)
    return out


def load_image(data: bytes, size: int, crop_offset: float = 0.5, flipped: bool = False,
               decoder: str = "pil") -> torch.Tensor:
    """Encoded bytes -> uint8 ``3 x size x size`` RGB: decode, crop, resize, flip (see module docstring)."""
    if decoder == "pil":
        image = decode_pil(data, min_side=size)
    elif decoder == "torchvision":
        image = decode_torchvision(data, min_side=size)
    else:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    return crop_resize_flip(image, size, crop_offset, flipped)


def decode_sample(sample: RawSample, decode: Callable[[bytes], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``(decode(image bytes), label)`` of a shard sample (label -1 without ``.cls``).

    ``decode`` maps the encoded image member to the tensor the caller wants (e.g. :func:`load_image` with the
    sample's crop and flip). Raises :class:`data.tar.BadSample` for an unusable sample (see
    ``sample_contents``) and with reason ``decode_error`` when ``decode`` fails on the bytes.
    """
    ext, label = sample_contents(sample)
    try:
        return decode(sample.members[ext]), label
    except Exception as exc:  # any decoder failure on bad bytes (PIL, libjpeg, libpng, libwebp) is data
        raise BadSample("decode_error", repr(exc)) from None
