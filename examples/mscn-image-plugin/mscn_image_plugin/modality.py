"""The ``image`` modality: 2-D RGB images as fields ``[-1, 1]² → [0, 1]³``.

A network input is a pixel centre, ``(y, x)`` with each axis spanning [-1, 1] whatever
the aspect ratio, so a decoder can ask for any output size and pixel centres of every
size fall on the same continuous image. Values are 8-bit colours divided by 255: a fixed
scaling, so there is no training-set state to keep in the checkpoint.

``n_values`` is the number of *pixels* (not pixels × 3 channels), so the core's "bits
per value" for this modality is bits per pixel (bpp), the number image codecs quote.

This module imports only the public core: ``mscn_core.modality``, ``mscn_core.signals``
and ``mscn_core.atomic``.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin
from torch import Tensor

from mscn_core.atomic import write_atomic
from mscn_core.limits import check_count
from mscn_core.modality import Modality, PredictFn
from mscn_core.signals import Signal

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
PROVENANCE_PREFIX = "mscn_"  # PNG text keys of files this plugin wrote


@dataclass(eq=False)
class ImageItem:
    """One image as read: 8-bit RGB pixels, its file name, and mscn provenance if any."""

    pixels: np.ndarray  # (H, W, 3) uint8
    name: str
    info: dict[str, str] = field(default_factory=dict)  # mscn_* PNG text (bits per value…)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])


@dataclass
class ImageOptions:
    """What an image user picks: a region of the input, a size for the output."""

    # fit/decode: write the image this many pixels on its long side (default: original size)
    size: int | None = None
    # read only the box LEFT,TOP,WIDTH,HEIGHT in pixels, e.g. 96,40,32,32 (files written by
    # mscn are reconstructions of a box already, so they are never cropped again)
    crop: str | None = None


def pixel_grid(height: int, width: int) -> np.ndarray:
    """Pixel centres ``(H·W, 2)`` as ``(y, x)`` in [-1, 1], row-major like the pixel array.

    Centres (not corners) so that a 2× larger grid interleaves with the original one.
    """
    y = (2 * np.arange(height) + 1) / height - 1
    x = (2 * np.arange(width) + 1) / width - 1
    yy, xx = np.meshgrid(y, x, indexing="ij")
    return np.stack([yy, xx], axis=-1).reshape(-1, 2).astype(np.float32)


def output_size(height: int, width: int, size: int | None) -> tuple[int, int]:
    """``(H, W)`` with the long side ``size`` and the aspect ratio kept (None: unchanged)."""
    if size is None:
        return height, width
    if size < 1:
        raise ValueError(f"--size must be a positive number of pixels, got {size}")
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def to_uint8(values: Tensor | np.ndarray) -> np.ndarray:
    """Network outputs in [0, 1] → 8-bit colours, clipped as any image file would be."""
    v = values.detach().cpu().double().numpy() if isinstance(values, Tensor) else values
    return np.rint(np.clip(np.asarray(v, dtype=np.float64), 0.0, 1.0) * 255).astype(np.uint8)


def psnr_db(mse: float, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio; capped at 200 dB so identical images stay finite."""
    return 10 * math.log10(peak**2 / max(mse, peak**2 * 1e-20))


def parse_crop(text: str) -> tuple[int, int, int, int]:
    try:
        left, top, width, height = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--crop wants LEFT,TOP,WIDTH,HEIGHT in pixels, got {text!r}") from None
    if left < 0 or top < 0 or width < 1 or height < 1:
        raise ValueError(f"--crop {text!r}: offsets must be ≥ 0 and sizes ≥ 1")
    return left, top, width, height


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


class ImageModality(Modality):
    """RGB images (PNG, JPEG) ↔ a meta-learned SIREN's sparse modulations; PNG out."""

    name = "image"
    description = "RGB images (PNG/JPEG) as 2-D fields; PSNR on 8-bit colour, bits per pixel"
    in_dim = 2
    out_dim = 3
    magic = (PNG_MAGIC, JPEG_MAGIC)
    file_extensions = (".png", ".jpg", ".jpeg")
    options = ImageOptions

    # -- reading ----------------------------------------------------------------------
    def read(self, path: str | os.PathLike, options: ImageOptions | None = None
             ) -> list[ImageItem]:
        """One item per file; a file Pillow cannot decode is a one-line ``ValueError``.

        Grey, palette and RGBA images become RGB (alpha is dropped); a JPEG's EXIF
        orientation is applied, so photos come out the way viewers show them.
        """
        opts = options if options is not None else ImageOptions()
        path = Path(path)
        try:
            with Image.open(path) as im:
                im.load()  # decode now: a truncated file fails here, not later
                text = {k: str(v) for k, v in (getattr(im, "text", None) or {}).items()
                        if k.startswith(PROVENANCE_PREFIX)}
                rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        except FileNotFoundError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"cannot read image {path}: {_one_line(err)}") from None
        if opts.crop and not text:
            left, top, width, height = parse_crop(opts.crop)
            h, w = rgb.shape[:2]
            if left + width > w or top + height > h:
                raise ValueError(f"--crop {opts.crop} lies outside {path} ({w}×{h} pixels)")
            rgb = rgb[top:top + height, left:left + width]
        return [ImageItem(np.ascontiguousarray(rgb), path.name, text)]

    def item_label(self, item: ImageItem) -> str:
        """Name, size and a content hash: a copy of a validation image under another name
        is still recognised as the same item (meta-train never trains on validation)."""
        digest = hashlib.sha1(item.pixels.tobytes()).hexdigest()[:12]
        h, w = item.shape
        return f"{item.name} {w}x{h} {digest}"

    # -- signals ----------------------------------------------------------------------
    def to_signal(self, item: ImageItem, options: ImageOptions | None = None) -> Signal:
        h, w = item.shape
        coords = torch.from_numpy(pixel_grid(h, w))
        targets = torch.from_numpy(item.pixels.reshape(-1, 3).astype(np.float32) / 255.0)
        return Signal(coords, targets, None, {})

    def item_template(self, item: ImageItem, options: ImageOptions | None = None) -> dict:
        """Size and file name: all a decoder needs besides the modulations."""
        h, w = item.shape
        return {"height": h, "width": w, "name": item.name}

    def n_values(self, signal: Signal) -> int:
        """Pixels, so that the core's bits per value is bits per pixel (bpp)."""
        return signal.n_points

    def metrics(self, signal: Signal, pred: Tensor) -> dict[str, float]:
        """PSNR/MSE of the 8-bit image that would be written (clipped, rounded), on [0, 1];
        ``psnr_db_float`` is the network's unrounded output, for diagnosis."""
        target = signal.targets.detach().double()
        as_written = torch.from_numpy(to_uint8(pred)).double() / 255.0
        mse = float(((as_written - target) ** 2).mean())
        mse_float = float(((pred.detach().double() - target) ** 2).mean())
        return {"psnr_db": psnr_db(mse), "mse": mse, "psnr_db_float": psnr_db(mse_float)}

    # -- optional capabilities (error-bounded encoding, climatology skill) --------------
    def value_scale(self, meta: dict) -> float:
        """8-bit levels per unit of the [0, 1] targets: ``--max-abs-error 2`` means 2 levels."""
        return 255.0

    def output_ulp(self, meta: dict) -> float:
        """PNG stores whole 8-bit levels: rounding adds up to half a level."""
        return 1.0

    def reference_group(self, item: ImageItem) -> tuple[int, int]:
        """Images of one size share pixel positions: their per-pixel mean is a reference."""
        return item.shape

    # -- artifacts --------------------------------------------------------------------
    def check_meta(self, meta: dict, options: ImageOptions | None = None) -> int:
        """A stream item's size claims, checked before the core decodes anything (a forged
        stream could ask for a 10⁹-pixel image): the values ``reconstruct`` will make."""
        tmpl = meta.get("template")
        if not isinstance(tmpl, dict):
            raise ValueError("item metadata has no image template")
        h = check_count(tmpl.get("height"), "template height", 1, 1 << 16)
        w = check_count(tmpl.get("width"), "template width", 1, 1 << 16)
        h, w = output_size(h, w, (options or ImageOptions()).size)
        return h * w * 3

    def reconstruct(self, meta: dict, predict: PredictFn, options: ImageOptions | None = None,
                    template: ImageItem | None = None) -> np.ndarray:
        """A ``(H, W, 3)`` uint8 array; ``options.size`` renders the long side at that size."""
        if template is not None:
            h, w = template.shape
        else:
            self.check_meta(meta, options)
            h, w = int(meta["template"]["height"]), int(meta["template"]["width"])
        h, w = output_size(h, w, (options or ImageOptions()).size)
        pred = predict(torch.from_numpy(pixel_grid(h, w)))
        return to_uint8(pred).reshape(h, w, 3)

    def save(self, artifacts: list[np.ndarray] | np.ndarray, path: str | os.PathLike,
             overwrite: bool = False, provenance: dict | None = None) -> Path | list[Path]:
        """PNG, written atomically; provenance becomes ``mscn_*`` PNG text chunks.

        One image: ``path`` itself. Several (a stream of many items): ``STEM_000.png``,
        ``STEM_001.png``… beside ``path``, every name checked before anything is written.
        """
        images = artifacts if isinstance(artifacts, list) else [artifacts]
        path = Path(path)
        if path.suffix.lower() != ".png":
            raise ValueError(f"image outputs are PNG files; name the output *.png, not {path}")
        if not images:
            raise ValueError("no images to save")
        targets = [path] if len(images) == 1 else [
            path.with_name(f"{path.stem}_{i:03d}.png") for i in range(len(images))]
        if not overwrite:
            for t in targets:
                if t.exists():
                    raise FileExistsError(f"refusing to overwrite existing file: {t} "
                                          "(pass --overwrite / overwrite=True)")
        text = PngImagePlugin.PngInfo()
        for k, v in (provenance or {}).items():
            text.add_text(PROVENANCE_PREFIX + k, str(v))
        for img, t in zip(images, targets, strict=True):
            arr = np.asarray(img)
            if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
                raise ValueError(f"expected an (H, W, 3) uint8 image, got {arr.dtype} "
                                 f"{arr.shape}")
            pil = Image.fromarray(arr, "RGB")
            write_atomic(t, lambda tmp, p=pil: p.save(tmp, format="PNG", pnginfo=text),
                         overwrite)
        return targets[0] if len(targets) == 1 else targets

    def view(self, truth: ImageItem, recon: ImageItem, path: str | os.PathLike,
             options: ImageOptions | None = None, overwrite: bool = False) -> Path:
        """Truth | reconstruction | error heat map in one PNG, PSNR (and bpp) in the caption.

        A reconstruction of another size is shown at its own size, and resampled (Lanczos)
        to the truth's size for the error and the PSNR; the caption says so.
        """
        from matplotlib.figure import Figure  # no pyplot: no global backend state

        t = truth.pixels
        r = recon.pixels
        note = ""
        if r.shape != t.shape:
            note = f" (recon {r.shape[1]}×{r.shape[0]} resampled to {t.shape[1]}×{t.shape[0]})"
            r = np.asarray(Image.fromarray(r).resize((t.shape[1], t.shape[0]),
                                                     Image.Resampling.LANCZOS))
        diff = t.astype(np.float64) - r.astype(np.float64)
        mse = float(np.mean((diff / 255.0) ** 2))
        err = np.sqrt(np.mean(diff**2, axis=-1))  # per-pixel RMS over channels, 0..255
        caption = f"PSNR {psnr_db(mse):.2f} dB, MSE {mse:.3g}"
        bpv = recon.info.get(PROVENANCE_PREFIX + "bits_per_value")
        if bpv is not None:
            caption += f", {float(bpv):.3f} bpp (whole .mscn stream)"
        fig = Figure(figsize=(10.5, 3.9), dpi=100, layout="constrained")
        axes = fig.subplots(1, 3)
        axes[0].imshow(t, interpolation="nearest")
        axes[0].set_title(f"truth: {truth.name}")
        axes[1].imshow(recon.pixels, interpolation="nearest")
        axes[1].set_title(f"reconstruction: {recon.name}"
                          + (f" ({recon.shape[1]}×{recon.shape[0]})" if note else ""))
        heat = axes[2].imshow(err, cmap="inferno", vmin=0, vmax=max(float(err.max()), 1.0),
                              interpolation="nearest")
        axes[2].set_title("error (RMS over R, G, B)")
        fig.colorbar(heat, ax=axes[2], shrink=0.85, label="0–255")
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(caption + note)
        return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"), overwrite)
