"""One denoising step over independent requests: each keeps its own seed, schedule, step and guidance."""

from __future__ import annotations

from image_checks import max_pixel_diff

from fluxray.params import GenerationParams
from fluxray.sampling import DenoiseTask, denoise_step, denoise_task, image_ids, text_ids

W, H = 96, 64


def make_task(pipeline, params: GenerationParams) -> DenoiseTask:
    p = params.resolve(pipeline.source.spec)
    embeds = pipeline.text_encoder.encode([p.prompt])
    negative = pipeline.text_encoder.encode([p.negative_prompt]) if p.do_true_cfg else None
    return denoise_task(p, embeds, negative, pipeline.source.spec, pipeline.device, pipeline.dtype)


def decode(pipeline, task: DenoiseTask):
    return pipeline.decoder.decode(task.latents, H, W).numpy()


def test_requests_joining_at_different_times_match_running_alone(tiny_pipeline):
    requests = [
        GenerationParams(prompt="a red fox", width=W, height=H, num_inference_steps=6, guidance_scale=3.5, seed=1),
        GenerationParams(
            prompt="a blue car", width=W, height=H, num_inference_steps=4, guidance_scale=7.0, seed=2, n=2
        ),
        GenerationParams(
            prompt="a green tree",
            negative_prompt="blurry",
            true_cfg_scale=3.0,
            width=W,
            height=H,
            num_inference_steps=5,
            guidance_scale=2.0,
            guidance_scale_end=5.0,
            seed=3,
        ),
    ]
    img, txt = image_ids(H, W), text_ids(tiny_pipeline.source.spec.max_sequence_length)

    alone = []
    for r in requests:
        task = make_task(tiny_pipeline, r)
        while not task.done:
            denoise_step(tiny_pipeline.transformer, [task], img, txt)
        alone.append(decode(tiny_pipeline, task))

    # Request 0 starts alone, 1 joins after two steps, 2 after three: one batch of mixed step indices.
    tasks = [make_task(tiny_pipeline, r) for r in requests]
    running = [tasks[0]]
    for step in range(20):
        if step == 2:
            running.append(tasks[1])
        if step == 3:
            running.append(tasks[2])
        if all(t.done for t in running) and len(running) == 3:
            break
        denoise_step(tiny_pipeline.transformer, running, img, txt)
    assert [t.step for t in tasks] == [6, 4, 5]

    for task, reference in zip(tasks, alone):
        batched = decode(tiny_pipeline, task)
        assert max_pixel_diff(batched, reference) <= 1
    # The requests really are different images (the comparison is not vacuous).
    assert max_pixel_diff(alone[0], alone[2]) > 10


def test_generate_batches_mixed_sizes_and_keeps_order(tiny_pipeline):
    a = GenerationParams(prompt="a red fox", width=64, height=64, num_inference_steps=3, seed=10)
    b = GenerationParams(prompt="a blue car", width=96, height=64, num_inference_steps=3, seed=11, n=2)
    c = GenerationParams(prompt="a tree", width=64, height=64, num_inference_steps=5, seed=12)
    together = tiny_pipeline.generate([a, b, c])
    seeds_and_shapes = [(im.params.prompt, im.seed, im.pixels.shape) for im in together]
    assert seeds_and_shapes == [
        ("a red fox", 10, (64, 64, 3)),
        ("a blue car", 11, (64, 96, 3)),
        ("a blue car", 12, (64, 96, 3)),
        ("a tree", 12, (64, 64, 3)),
    ]
    for params, image in zip([a, b, b, c], together):
        single = tiny_pipeline.generate(params.model_copy(update={"n": 1, "seed": image.seed}))[0]
        assert max_pixel_diff(single.pixels, image.pixels) <= 1
