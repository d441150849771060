"""Image files as the model's input pixels: one decoder for training and prediction.

`prepare` reads an image folder's files with `load_image`, and `pipeline.predict`
reads the files it classifies with it, so a model sees at prediction the pixels it
was trained on: turned upright by the EXIF orientation, RGB (transparency on white,
16-bit levels scaled, not clipped), centre-cropped to a square and resized.
Its own module so that prepare, which reruns with each edit of it, does not depend on
the prediction command.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_image(path: Path, size: int) -> np.ndarray:
    """(size, size, 3) uint8 RGB from any image file Pillow reads; raises ValueError if it can't."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            image = upright(image)
            if image.mode == "F":  # no range to scale from: 0-1, 0-255 and Kelvin all occur
                raise ValueError(
                    "a 32-bit floating-point image; save it with 8 or 16 bits per channel"
                )
            if image.mode.startswith("I"):
                image = _sixteen_bits_to_eight(image)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                # Transparent areas become white, not the black a plain convert gives.
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, rgba)
            image = ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.LANCZOS)
            return np.asarray(image, dtype=np.uint8)
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except NotADirectoryError:  # a/b.png where a is a file
        raise ValueError("no such file (a folder in its path is a file)") from None
    except IsADirectoryError:  # main expands folders: only one without images gets here
        raise ValueError(
            "a folder with no PNG, JPEG, BMP or GIF files directly in it (name other "
            "formats, such as TIFF or WebP, file by file)"
        ) from None
    except PermissionError:
        raise ValueError("cannot be read (permission denied)") from None
    except UnidentifiedImageError:
        raise ValueError("not an image Pillow can read (PNG, JPEG, ...)") from None
    except Image.DecompressionBombError as error:  # would take gigabytes to decode
        raise ValueError(f"too large to decode safely ({error})") from None
    except (OSError, SyntaxError) as error:
        if isinstance(error, OSError) and error.errno is not None and error.strerror:
            # The file system's (a name too long, a disk error); Pillow's own carry no errno.
            raise ValueError(f"cannot be read ({error.strerror})") from None
        raise ValueError(f"corrupt image ({error})") from None  # truncated or corrupt data
    except ValueError:  # this function's own, worded for the user
        raise
    except Exception as error:  # any other decoder failure is this file's, not the run's
        raise ValueError(f"cannot be decoded ({type(error).__name__}: {error})") from None


# EXIF orientation (2-8) -> the transpose that turns the stored pixels upright, as
# Pillow's ImageOps.exif_transpose maps them.
UPRIGHT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
           6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}  # fmt: skip


def upright(image):
    """The image as a viewer shows it: phone photos are stored sideways with an EXIF
    orientation tag, and a centre crop of the sideways pixels cuts wrong.

    Not ImageOps.exif_transpose: after turning the pixels it rewrites the EXIF, which
    raises on some real photos' odd tags (a struct.error, an AttributeError; Pillow
    issues 6799, 8790), losing a readable image. Only the pixels are wanted here; an
    orientation that cannot be read leaves them as stored.
    """
    from PIL import Image

    try:
        orientation = image.getexif().get(0x0112, 1)  # 0x0112: the Orientation tag
    except Exception:  # unreadable EXIF: no orientation to follow
        return image
    try:  # stored as a float or a fraction by some writers: 6.0 is 6, as Pillow reads it
        method = UPRIGHT.get(orientation)
    except TypeError:  # unhashable: no orientation
        method = None
    return image.transpose(getattr(Image.Transpose, method)) if method else image


def _sixteen_bits_to_eight(image):
    """A 16-bit greyscale image (PNG, TIFF) as 8-bit L, or LA if it has a transparent level.

    convert() would clip at 255 and turn all but the darkest pixels white. Mode I
    (32-bit integers) is taken as 16-bit when it uses more than 8 bits.
    """
    from PIL import Image

    levels = np.asarray(image)
    if image.mode == "I" and levels.max(initial=0) <= 255:  # 8-bit values in a wide mode
        grey = np.clip(levels, 0, 255).astype(np.uint8)
    else:
        grey = np.clip(np.rint(levels / 257.0), 0, 255).astype(np.uint8)  # 0-65535 -> 0-255
    key = image.info.get("transparency")
    if isinstance(key, int):  # the one level PNG marks transparent
        alpha = np.where(levels == key, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey, alpha], axis=-1))  # LA
    return Image.fromarray(grey)  # L
