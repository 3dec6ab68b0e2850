"""The synthetic world the embedded tiny model was trained on: one coloured shape on a plain background.

A scene is a shape (circle, square, triangle) of a named colour at a named place (left, right, top,
bottom, center) on a background of another named colour, and its prompt says exactly that:
"a red circle on the left, blue background". `render` draws a scene deterministically with PIL,
`sample_scene` draws one at random from a seed (size and place jittered a little), and `HELD_OUT` is a
fixed set of combinations that training never shows, which the quality score uses.

`read_scene` is the analytic detector for this world: it finds the background from the border and the
shape's colour from the pixels that differ from it, cuts the shape out half way between the two colours
(the edge a blur or a VAE leaves in place), and fits each shape class to it: a circle, a square and a
triangle of the shape's area, drawn as `render` draws them and placed on its centre of mass. The class
whose outline covers the shape best (intersection over union) is the shape class, and that outline's
centre gives the place; colour is the nearest named colour.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Where a shape's box is centred, as fractions of the canvas (x, y), and how the prompt says it.
PLACES: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
PLACE_WORDS = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Half the side of a shape's box, as a fraction of the canvas's shorter side, and the jitter of place.
# A shape is 40-42% of the canvas across: the tiny transformer sees 256x256 as 16x16 tokens, and at a
# third of the canvas (five tokens) its corners were too fine for it (README, "The tiny model and its world").
HALF_SIZE = (0.20, 0.21)
PLACE_JITTER = 0.01
# First cut: a pixel stands out when it is further from the background (RGB distance) than this
# fraction of the way to the named colour nearest the background; its median is the shape's colour.
_FOREGROUND_FRACTION = 0.5


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    place: str
    background: str

    @property
    def prompt(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape} {PLACE_WORDS[self.place]}, {self.background} background"


def all_scenes() -> list[Scene]:
    """Every combination of the grammar, shape colour and background always different."""
    return [Scene(c, s, p, b) for c, s, p, b in itertools.product(COLOURS, SHAPES, PLACES, COLOURS) if c != b]


def _held_out() -> tuple[Scene, ...]:
    # Fixed: a seeded draw of 40 of the 840 combinations. Each colour, shape, place and background
    # still appears in training, only these combinations of them never do.
    return tuple(random.Random(2026).sample(all_scenes(), 40))


HELD_OUT: tuple[Scene, ...] = _held_out()
_HELD_OUT_SET = frozenset(HELD_OUT)
TRAINING_SCENES: tuple[Scene, ...] = tuple(s for s in all_scenes() if s not in _HELD_OUT_SET)


def parse_prompt(prompt: str) -> Scene | None:
    """The scene a prompt of this world describes, or None for a prompt outside the grammar."""
    words = re.findall(r"[a-z]+", prompt.lower())
    colours = [w for w in words if w in COLOURS]
    shapes = [w for w in words if w in SHAPES]
    places = [w for w in words if w in PLACES or w == "centre"]
    if len(colours) != 2 or len(shapes) != 1 or len(places) != 1 or "background" not in words:
        return None
    place = "center" if places[0] == "centre" else places[0]
    return Scene(colours[0], shapes[0], place, colours[1])


def sample_scene(rng: random.Random, scenes: tuple[Scene, ...] = TRAINING_SCENES) -> tuple[Scene, dict]:
    """A scene drawn from `scenes` with its jitter (size and offset), ready for `render`."""
    scene = rng.choice(scenes)
    jitter = {
        "half": rng.uniform(*HALF_SIZE),
        "dx": rng.uniform(-PLACE_JITTER, PLACE_JITTER),
        "dy": rng.uniform(-PLACE_JITTER, PLACE_JITTER),
    }
    return scene, jitter


def render(scene: Scene, width: int = 256, height: int = 256, half: float = 0.205, dx: float = 0.0, dy: float = 0.0):
    """The scene as an RGB PIL image, drawn at twice the size and reduced so edges are smooth."""
    scale = 2
    w, h = width * scale, height * scale
    image = Image.new("RGB", (w, h), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    fx, fy = PLACES[scene.place]
    cx, cy = (fx + dx) * w, (fy + dy) * h
    r = half * min(w, h)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return image.resize((width, height), Image.Resampling.BOX)


_COLOUR_NAMES = tuple(COLOURS)
_COLOUR_TABLE = np.array([COLOURS[n] for n in _COLOUR_NAMES], dtype=np.float32)


def _nearest_colour(rgb: np.ndarray) -> str:
    return _COLOUR_NAMES[int(np.argmin(((_COLOUR_TABLE - rgb) ** 2).sum(axis=1)))]


def _outline(shape: str, area: float, mx: float, my: float, xs: np.ndarray, ys: np.ndarray):
    """The pixels inside `shape` as `render` draws it, sized to `area` pixels with its centre of mass
    at (mx, my), and the centre of its box (what `render` places)."""
    if shape == "circle":
        r = np.sqrt(area / np.pi)
        return (xs - mx) ** 2 + (ys - my) ** 2 <= r * r, (mx, my)
    if shape == "square":
        r = np.sqrt(area) / 2
        return (np.abs(xs - mx) <= r) & (np.abs(ys - my) <= r), (mx, my)
    # Apex up, base 2r wide and 2r high: area 2r^2, centre of mass r/3 below the box's centre.
    r = np.sqrt(area / 2)
    cy = my - r / 3
    return (ys >= cy - r) & (ys <= cy + r) & (np.abs(xs - mx) <= (ys - (cy - r)) / 2), (mx, cy)


def read_scene(image: Image.Image) -> Scene | None:
    """What the detector sees in an image of this world; None when no shape stands out."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w, _ = pixels.shape
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3)])
    border = np.concatenate([border, pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background_rgb = np.median(border, axis=0)
    background = _nearest_colour(background_rgb)
    others = np.array([rgb for name, rgb in COLOURS.items() if name != background], dtype=np.float32)
    threshold = _FOREGROUND_FRACTION * np.sqrt(((others - background_rgb) ** 2).sum(axis=1)).min()
    standing_out = np.sqrt(((pixels - background_rgb) ** 2).sum(axis=2)) > threshold
    if standing_out.sum() < 0.005 * h * w:
        return None
    shape_rgb = np.median(pixels[standing_out], axis=0)
    # The shape: pixels more than half way from the background's colour to the shape's; its colour is
    # read from its core (past 90%), where soft edges do not blend in the background's.
    towards = shape_rgb - background_rgb
    way = ((pixels - background_rgb) @ towards) / float(towards @ towards)
    mask = way > 0.5
    core = way > 0.9
    colour = _nearest_colour(np.median(pixels[core if core.sum() >= 16 else mask], axis=0))
    area = float(mask.sum())
    if area < 0.005 * h * w:
        return None
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    mx, my = float(xs[mask].mean()), float(ys[mask].mean())
    best, best_iou, centre = "circle", -1.0, (mx, my)
    for candidate in SHAPES:
        inside, box_centre = _outline(candidate, area, mx, my, xs, ys)
        iou = (inside & mask).sum() / (inside | mask).sum()
        if iou > best_iou:
            best, best_iou, centre = candidate, iou, box_centre
    at = np.array([centre[0] / w, centre[1] / h])
    place = min(PLACES, key=lambda p: float(((np.array(PLACES[p]) - at) ** 2).sum()))
    return Scene(colour, best, place, background)


def adherence(asked: Scene, seen: Scene | None) -> dict[str, bool]:
    """Which attributes of the asked scene the detector found in the image."""
    if seen is None:
        return {"colour": False, "shape": False, "place": False, "background": False}
    return {
        "colour": seen.colour == asked.colour,
        "shape": seen.shape == asked.shape,
        "place": seen.place == asked.place,
        "background": seen.background == asked.background,
    }


ATTRIBUTES = ("colour", "shape", "place", "background")


def adherence_rates(asked: list[Scene], images: list[Image.Image]) -> dict[str, float]:
    """Over images of the asked scenes: the fraction whose colour / shape / place / background the
    detector reads as asked, and the fraction right on all four."""
    return rates_of_reads(asked, [read_scene(image) for image in images])


def rates_of_reads(asked: list[Scene], seen: list[Scene | None]) -> dict[str, float]:
    """adherence_rates over what the detector already read (`read_scene` of each image)."""
    marks = [adherence(scene, read) for scene, read in zip(asked, seen, strict=True)]
    rates = {a: float(np.mean([m[a] for m in marks])) for a in ATTRIBUTES}
    rates["all"] = float(np.mean([all(m.values()) for m in marks]))
    return rates
