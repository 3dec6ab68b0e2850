"""Step caching row by row (fluxray.step_cache) on the tiny model: at batch 1 it is diffusers' first-block
cache; it skips steps and changes the image (not vacuous); a cached image is the same alone or batched with
other requests; an uncached request is unchanged by cached neighbours; true CFG's branches keep their own
state; a task paused between steps (the scheduler's preemption) resumes its cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from image_checks import diffusers_image, max_pixel_diff

from fluxray.params import CacheRequest, GenerationParams
from fluxray.pipeline import Pipeline
from fluxray.sampling import denoise, denoise_step, denoise_task, image_ids, text_ids

PROMPT = "a red circle on the left, blue background"
KW = dict(width=128, height=128, num_inference_steps=16)
THRESHOLD = 0.3  # the tiny model's first block changes more per step than FLUX.1-dev's


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline.load("tiny", device="cpu")


def params(seed: int, cache: float | None = THRESHOLD, **kw) -> GenerationParams:
    extra = {"cache": CacheRequest(threshold=cache)} if cache is not None else {}
    return GenerationParams(prompt=kw.pop("prompt", PROMPT), seed=seed, **{**KW, **kw}, **extra)


def tasks_of(pipeline: Pipeline, requests: list[GenerationParams]):
    spec = pipeline.source.spec
    out = []
    for request in requests:
        resolved = request.resolve(spec)
        embeds = pipeline.text_encoder.encode([resolved.prompt])
        negative = pipeline.text_encoder.encode([resolved.negative_prompt]) if resolved.do_true_cfg else None
        out.append(denoise_task(resolved, embeds, negative, spec, torch.device("cpu"), torch.float32))
    return out


def pixels(pipeline: Pipeline, task, request: GenerationParams) -> np.ndarray:
    return pipeline.decoder.decode(task.latents, request.height, request.width).numpy()


def run(pipeline: Pipeline, requests: list[GenerationParams]):
    """The requests' tasks denoised together (one transformer call a step), and their images."""
    tasks = tasks_of(pipeline, requests)
    denoise(pipeline.transformer, tasks, KW["height"], KW["width"])
    return tasks, [pixels(pipeline, t, r) for t, r in zip(tasks, requests)]


def test_at_batch_one_it_is_diffusers_first_block_cache_and_it_skips_steps(pipeline):
    from diffusers import FirstBlockCacheConfig, FluxPipeline

    from fluxray.models.sources import TINY_MODEL_DIR

    pipe = FluxPipeline.from_pretrained(TINY_MODEL_DIR, local_files_only=True)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=THRESHOLD))
    theirs = diffusers_image(pipe, PROMPT, 7, width=128, height=128, num_inference_steps=16)
    pipe.transformer.disable_cache()
    uncached_theirs = diffusers_image(pipe, PROMPT, 7, width=128, height=128, num_inference_steps=16)

    (task,), (ours,) = run(pipeline, [params(7)])
    state = task.cache_states[(0, 0)]
    assert state.computed + state.skipped == 16 and state.skipped >= 4, (state.computed, state.skipped)
    assert max_pixel_diff(ours[0], theirs) <= 2
    # Not vacuous: caching changed the image (diffusers' cached and uncached images differ as much).
    (_,), (uncached,) = run(pipeline, [params(7, cache=None)])
    assert max_pixel_diff(uncached[0], uncached_theirs) <= 2
    assert max_pixel_diff(ours[0], uncached[0]) > 2 and max_pixel_diff(theirs, uncached_theirs) > 2


def test_a_cached_image_is_the_same_alone_or_batched_and_uncached_neighbours_are_unchanged(pipeline):
    cached = [params(1), params(2, prompt="a blue square at the top, yellow background", cache=0.15)]
    plain = [params(3, cache=None), params(4, cache=None, n=2)]
    alone = [run(pipeline, [request])[1][0] for request in cached + plain]
    tasks, together = run(pipeline, [plain[0], cached[0], plain[1], cached[1]])
    order = [1, 3, 0, 2]  # where each of cached + plain sits in the batch
    for image, k in zip(alone, order):
        assert max_pixel_diff(image, together[k]) <= 1
    # Each cached request decided for itself: different thresholds, different numbers of full steps.
    skipped = [tasks[k].cache_states[(0, 0)].skipped for k in (1, 3)]
    assert skipped[0] > skipped[1] >= 0, skipped
    assert not tasks[0].cache_states and not tasks[2].cache_states


def test_true_cfg_branches_keep_their_own_state_and_a_paused_task_resumes_its_cache(pipeline):
    cfg = params(5, negative_prompt="green", true_cfg_scale=3.0)
    (task,), (alone,) = run(pipeline, [cfg])
    assert set(task.cache_states) == {(0, 0), (1, 0)}
    assert all(s.computed + s.skipped == 16 for s in task.cache_states.values())
    # Stepped with a neighbour that joins and leaves half way (the scheduler interleaving other work),
    # the task's own decisions and image stay as they were alone.
    (mine, other) = tasks_of(pipeline, [cfg, params(6, cache=None, num_inference_steps=4)])
    img = image_ids(KW["height"], KW["width"])
    txt = text_ids(mine.embeds.sequence.shape[1])
    for step in range(16):
        denoise_step(pipeline.transformer, [mine, other] if 6 <= step < 10 else [mine], img, txt)
    assert {k: s.skipped for k, s in mine.cache_states.items()} == {k: s.skipped for k, s in task.cache_states.items()}
    assert max_pixel_diff(pixels(pipeline, mine, cfg)[0], alone[0]) <= 1


def test_the_cache_request_is_validated():
    with pytest.raises(ValueError, match="threshold"):
        CacheRequest(threshold=0)
    with pytest.raises(ValueError, match="method"):
        CacheRequest(method="teacache")
    assert GenerationParams(prompt="x").cache is None


def test_rows_with_loras_keep_their_adapters_in_the_sub_batch(tiny_loras):
    """The rows that compute run the remaining blocks as a sub-batch: the LoRA bank is told which rows it
    holds, so each keeps its own adapter (a batch where one cached row skips and the others compute)."""
    from fluxray.lora import attach_loras, read_lora

    pipeline = Pipeline.load("tiny", device="cpu")
    bank = attach_loras(pipeline.transformer, max_per_row=2, max_rank=8)
    for name in ("style", "subject"):
        bank.add(read_lora(tiny_loras / f"{name}.safetensors", pipeline.transformer))
    requests = [
        params(1, loras=[{"name": "style", "scale": 1.0}]),
        params(2, cache=None, loras=[{"name": "subject", "scale": 0.8}]),
        params(3, cache=0.15),
    ]
    alone = [run(pipeline, [request])[1][0] for request in requests]
    tasks, together = run(pipeline, requests)
    assert tasks[0].cache_states[(0, 0)].skipped > tasks[2].cache_states[(0, 0)].skipped
    for a, b in zip(alone, together):
        assert max_pixel_diff(a, b) <= 1
    plain = run(pipeline, [params(1)])[1][0]
    assert max_pixel_diff(plain, alone[0]) > 2  # the adapter is applied under the cache
