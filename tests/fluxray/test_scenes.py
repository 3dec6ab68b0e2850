"""The synthetic world of the tiny model: prompts, renders and the detector that scores adherence."""

from __future__ import annotations

import random

from PIL import Image, ImageFilter

from fluxray.tiny.scenes import (
    HELD_OUT,
    TRAINING_SCENES,
    Scene,
    adherence,
    all_scenes,
    parse_prompt,
    read_scene,
    render,
    sample_scene,
)


def test_grammar_and_held_out_split():
    scenes = all_scenes()
    assert len(scenes) == 8 * 3 * 5 * 7 and len(set(scenes)) == len(scenes)
    assert len(HELD_OUT) == 40 and not set(HELD_OUT) & set(TRAINING_SCENES)
    assert len(HELD_OUT) + len(TRAINING_SCENES) == len(scenes)
    # Every word of a held-out prompt is seen in training, in other combinations.
    for field in ("colour", "shape", "place", "background"):
        assert {getattr(s, field) for s in HELD_OUT} <= {getattr(s, field) for s in TRAINING_SCENES}
    assert Scene("orange", "circle", "left", "blue").prompt == "an orange circle on the left, blue background"
    for scene in scenes:
        assert parse_prompt(scene.prompt) == scene
    assert parse_prompt("a photo of a cat sitting on a red chair") is None
    assert parse_prompt("a red square in the centre, white background") == Scene("red", "square", "center", "white")


def test_detector_reads_every_render_right():
    for scene in all_scenes():
        assert read_scene(render(scene)) == scene, scene
    rng = random.Random(7)
    for _ in range(300):
        scene, jitter = sample_scene(rng, tuple(all_scenes()))
        assert read_scene(render(scene, 256, 256, **jitter)) == scene, (scene, jitter)
    # Other sizes and aspect ratios too (the place is read relative to the canvas).
    assert read_scene(render(Scene("red", "triangle", "left", "white"), 384, 256)) == Scene(
        "red", "triangle", "left", "white"
    )


def test_detector_reads_soft_edges_as_drawn():
    # A generated image has the VAE's soft edges, not PIL's: the detector cuts the shape half way
    # between its colour and the background's, so a blur does not change the class or the place (the
    # previous detector, on the fraction of its box a shape fills, read 29% of blurred triangles as circles).
    rng = random.Random(11)
    for _ in range(120):
        scene, jitter = sample_scene(rng, tuple(all_scenes()))
        for radius in (3, 8):
            blurred = render(scene, 256, 256, **jitter).filter(ImageFilter.GaussianBlur(radius))
            assert read_scene(blurred) == scene, (scene, jitter, radius)


def test_detector_sees_what_is_wrong():
    asked = Scene("red", "circle", "left", "blue")
    assert read_scene(Image.new("RGB", (256, 256), (30, 70, 220))) is None
    assert adherence(asked, None) == {"colour": False, "shape": False, "place": False, "background": False}
    wrong = read_scene(render(Scene("green", "square", "right", "blue")))
    assert adherence(asked, wrong) == {"colour": False, "shape": False, "place": False, "background": True}
