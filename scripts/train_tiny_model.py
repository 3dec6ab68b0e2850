"""Train the embedded tiny FLUX model (fluxray/tiny/model/) on the synthetic scenes of fluxray.tiny.scenes.

    python scripts/train_tiny_model.py [--out DIR] [--scale 1.0]

Starts from scripts/make_tiny_model.py's fixed-seed model (same tokenizers, same frozen text encoders)
and trains, on the CPU with fixed seeds:

1. the VAE, for reconstruction (MSE + L1 + a small KL term) on crops of rendered scenes; then its
   `shift_factor`/`scaling_factor` are set from the latents' mean and spread, as FLUX's were;
2. the transformer by rectified flow matching (x_t = (1 - s) x0 + s e, target e - x0; s drawn
   logit-normal and shifted as the sampler shifts at 256x256 for a third of each batch, uniform in
   [0.7, 1] and in [0.998, 1] for the others: why at NOISE_SHARES) on the frozen text encoders' embeddings,
   the prompt replaced by the empty prompt 10% of the time so the unconditional velocity is learned,
   with the guidance embedding held at 1 and an EMA of the weights;
3. guidance distillation, as FLUX.1-dev's guidance embedding was made: the student sees a guidance
   g drawn from [1, 6] and learns the teacher's classifier-free-guided velocity
   v(empty) + g (v(prompt) - v(empty)). `guidance_scale` then works as on FLUX.1-dev (one pass per
   step), and true CFG with a negative prompt still works on top, since both branches are plain
   conditional velocities.

`--scale` multiplies every step count (0.1 for a quick look). Writes the model and a JSON log of the
losses next to it in benchmarks/results/train-tiny-model.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from make_tiny_model import SHARPEN, attention_norms, build_pipeline, save  # noqa: E402

from fluxray.models.sources import TINY_MODEL_DIR  # noqa: E402
from fluxray.models.specs import SPECS  # noqa: E402
from fluxray.tiny.scenes import TRAINING_SCENES, render, sample_scene  # noqa: E402

SIZE = 256  # the tiny model's default side; every training image is this size
VAE_STEPS, VAE_BATCH, VAE_CROP, VAE_POOL = 1200, 16, 128, 1024
LATENT_IMAGES = 4000
FLOW_STEPS, FLOW_BATCH, FLOW_LR = 8000, 16, 3e-3
DISTILL_STEPS, DISTILL_BATCH = 600, 16
PROMPT_DROPOUT = 0.1
# Noise levels, in thirds of every batch: logit-normal, shifted as FLUX.1-dev's sampler shifts at
# 256x256 (most of it at mid and low noise); uniform in [0.7, 1]; and in [0.998, 1], pure noise.
# These flat-colour scenes stay readable through noise almost up to sigma = 1 (16384 latent values
# average the noise away), so denoising from sigma <= 0.7 is easy (measured: from a training image
# noised to 0.7 the sampler's images are read right 100% of the time), while from pure noise the
# model must draw what the prompt says. Each third is there because leaving it out was measured to
# fail: without [0.7, 1] the logit-normal's thin tail left the flow loss at sigma 0.9-0.95 (0.09-0.10)
# above that at sigma 1, and 1000 steps with it took held-out colour from 46% to 86% and place from
# 57% to 96% (guidance 1); without [0.998, 1] the model learned to read the image wherever it shows
# and ignored the prompt where it does not (loss 0.74 at sigma 1, against 0.08 at 0.95), and its
# first sampling step drew nothing asked.
NOISE_SHARES = (1 / 3, 1 / 3, 1 / 3)  # logit-normal, [HIGH_NOISE_FROM, 1], [NOISE_ONLY_FROM, 1]
HIGH_NOISE_FROM, NOISE_ONLY_FROM = 0.7, 0.998
GUIDANCE_RANGE = (1.0, 6.0)
EMA_DECAY = 0.999


def to_tensor(images) -> torch.Tensor:
    """PIL images -> float tensor in [-1, 1], (N, 3, H, W)."""
    array = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def render_set(seed: int, count: int):
    rng = random.Random(seed)
    scenes, images = [], []
    for _ in range(count):
        scene, jitter = sample_scene(rng, TRAINING_SCENES)
        scenes.append(scene)
        images.append(render(scene, SIZE, SIZE, **jitter))
    return scenes, images


def lr_at(step: int, steps: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def optimise(name: str, model, steps: int, peak_lr: float, loss_at, log: dict, warmup: int = 200, ema=None):
    """AdamW on `model` for `steps` steps of `loss_at(step)` (warmup, then cosine to a tenth), gradients
    clipped at 1, the mean loss printed and logged every 100 steps. With `ema=(decay, from_step)`,
    returns an exponential moving average of the weights (a copy of them until from_step), else
    the model."""
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.0)
    average = copy.deepcopy(model).requires_grad_(False) if ema else None
    model.train()
    losses, start = [], time.time()
    for step in range(steps):
        set_lr(opt, lr_at(step, steps, peak_lr, warmup))
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if average is not None:
            decay, from_step = ema
            ema_update(average, model, decay if step > from_step else 0.0)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"{name} {step}/{steps} loss {np.mean(losses[-100:]):.5f} ({time.time() - start:.0f} s)", flush=True)
    log[name] = {"steps": steps, "loss_curve": [float(np.mean(losses[i : i + 100])) for i in range(0, steps, 100)]}
    return average if average is not None else model


def ema_update(ema, model, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def train_vae(vae, steps: int, log: dict) -> None:
    _, images = render_set(seed=1, count=VAE_POOL)
    pool = to_tensor(images)
    gen = torch.Generator().manual_seed(1)

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(len(pool), (VAE_BATCH,), generator=gen)
        ox, oy = (torch.randint(0, (SIZE - VAE_CROP) // 8 + 1, (2,), generator=gen) * 8).tolist()
        x = pool[idx, :, oy : oy + VAE_CROP, ox : ox + VAE_CROP]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = posterior.kl().mean() / z[0].numel()
        return F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x) + 1e-4 * kl

    optimise("vae", vae, steps, 2e-3, loss_at, log)
    vae.eval()


@torch.no_grad()
def encode_images(vae, images, batch: int = 32) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        out.append(vae.encode(to_tensor(images[i : i + batch])).latent_dist.mean)
    return torch.cat(out)


@torch.no_grad()
def vae_psnr(vae, seed: int = 99, count: int = 64) -> float:
    _, images = render_set(seed, count)
    x = to_tensor(images)
    rec = torch.cat([vae.decode(z[None]).sample for z in encode_images(vae, images)]).clamp(-1, 1)
    mse = F.mse_loss((rec + 1) / 2, (x + 1) / 2).item()
    return 10 * math.log10(1 / mse)


@torch.no_grad()
def embed_prompts(pipe: FluxPipeline, prompts: list[str], max_len: int):
    embeds, pooled = [], []
    for i in range(0, len(prompts), 64):
        chunk = prompts[i : i + 64]
        e, p, _ = pipe.encode_prompt(prompt=chunk, prompt_2=chunk, max_sequence_length=max_len)
        embeds.append(e)
        pooled.append(p)
    return torch.cat(embeds), torch.cat(pooled)


def normalise_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Set the VAE's shift_factor/scaling_factor from the latents' mean and spread, as FLUX's were
    set, and return the latents normalised by them (what the transformer sees)."""
    mean, std = latents.mean().item(), latents.std().item()
    vae.register_to_config(shift_factor=round(mean, 4), scaling_factor=round(1.0 / std, 4))
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


class FlowData:
    """Normalised latents of rendered training scenes and the embeddings of their prompts (index 0:
    the empty prompt), and noisy batches of them."""

    def __init__(self, pipe: FluxPipeline, scenes, x0: torch.Tensor, max_len: int):
        self.x0 = x0
        prompts = [""] + sorted({s.prompt for s in scenes})
        index = {p: i for i, p in enumerate(prompts)}
        self.prompt_of = torch.tensor([index[s.prompt] for s in scenes])
        self.embeds, self.pooled = embed_prompts(pipe, prompts, max_len)
        _, c, h, w = self.x0.shape
        self.shape = (c, h, w)
        self.img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
        self.txt_ids = torch.zeros(max_len, 3)
        # Noise levels are drawn around FLUX.1-dev's shift, with which the tiny model also samples.
        cfg = SPECS["flux-dev"].scheduler
        self.mu = calculate_shift(
            h * w // 4, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"]
        )

    def batch(self, size: int, gen: torch.Generator):
        idx = torch.randint(len(self.x0), (size,), generator=gen)
        x0 = self.x0[idx]
        noise = torch.randn(x0.shape, generator=gen)
        u = torch.sigmoid(torch.randn(size, generator=gen))
        sigma = math.exp(self.mu) / (math.exp(self.mu) + (1 / u - 1))
        which = torch.multinomial(torch.tensor(NOISE_SHARES), size, replacement=True, generator=gen)
        high = torch.empty(size).uniform_(HIGH_NOISE_FROM, 1.0, generator=gen)
        only_noise = torch.empty(size).uniform_(NOISE_ONLY_FROM, 1.0, generator=gen)
        sigma = torch.where(which == 1, high, torch.where(which == 2, only_noise, sigma))
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        prompt = self.prompt_of[idx].clone()
        prompt[torch.rand(size, generator=gen) < PROMPT_DROPOUT] = 0
        return xt, sigma, prompt, noise - x0

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = self.shape
        return FluxPipeline._pack_latents(x, x.shape[0], c, h, w)

    def velocity(self, model, xt, sigma, prompt, guidance):
        return model(
            hidden_states=self.pack(xt),
            timestep=sigma,
            guidance=guidance,
            pooled_projections=self.pooled[prompt],
            encoder_hidden_states=self.embeds[prompt],
            txt_ids=self.txt_ids,
            img_ids=self.img_ids,
            return_dict=False,
        )[0]


def plain_init(transformer) -> None:
    """Undo make_tiny_model's sharpening of the random model (q/k norms and the output projection
    x3, so that random weights visibly follow the prompt): with attention logits x9 the softmax is
    saturated and learns slowly (measured: flow loss 0.37 after 800 steps against 0.44 sharpened)."""
    with torch.no_grad():
        for param in attention_norms(transformer):
            param.fill_(1.0)
        transformer.proj_out.weight.div_(SHARPEN)
        transformer.proj_out.bias.div_(SHARPEN)


def train_flow(transformer, data: FlowData, steps: int, log: dict):
    gen = torch.Generator().manual_seed(3)
    plain_init(transformer)

    def loss_at(step: int) -> torch.Tensor:
        xt, sigma, prompt, target = data.batch(FLOW_BATCH, gen)
        v = data.velocity(transformer, xt, sigma, prompt, torch.ones(FLOW_BATCH))
        return F.mse_loss(v, data.pack(target))

    return optimise("flow", transformer, steps, FLOW_LR, loss_at, log, ema=(EMA_DECAY, 500))


@torch.no_grad()
def loss_by_sigma(model, data: FlowData, sigmas=(1.0, 0.95, 0.9, 0.7, 0.3, 0.1), count: int = 64) -> dict:
    """The flow loss of `model` at fixed noise levels, on the same latents and noise for each."""
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(len(data.x0), (count,), generator=gen)
    x0, noise = data.x0[idx], torch.randn(data.x0[idx].shape, generator=gen)
    out = {}
    for sigma in sigmas:
        xt = (1 - sigma) * x0 + sigma * noise
        v = data.velocity(model, xt, torch.full((count,), sigma), data.prompt_of[idx], torch.ones(count))
        out[str(sigma)] = round(F.mse_loss(v, data.pack(noise - x0)).item(), 4)
    return out


def distill_guidance(teacher, data: FlowData, steps: int, log: dict):
    gen = torch.Generator().manual_seed(4)
    teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    ones = torch.ones(DISTILL_BATCH)

    def loss_at(step: int) -> torch.Tensor:
        xt, sigma, prompt, _ = data.batch(DISTILL_BATCH, gen)
        g = torch.empty(DISTILL_BATCH).uniform_(*GUIDANCE_RANGE, generator=gen)
        with torch.no_grad():
            v_c = data.velocity(teacher, xt, sigma, prompt, ones)
            v_u = data.velocity(teacher, xt, sigma, torch.zeros_like(prompt), ones)
            target = v_u + g.view(-1, 1, 1) * (v_c - v_u)
        return F.mse_loss(data.velocity(student, xt, sigma, prompt, g), target)

    return optimise("distill", student, steps, 3e-4, loss_at, log, warmup=100, ema=(0.995, 100))


def main() -> None:
    parser = argparse.ArgumentParser(description="train the embedded tiny FLUX model on synthetic scenes")
    parser.add_argument("--out", type=Path, default=TINY_MODEL_DIR, help=f"default: {TINY_MODEL_DIR}")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count (default 1)")
    parser.add_argument(
        "--vae-from",
        type=Path,
        help="take the trained VAE from a model this script wrote instead of training it again: the same"
        " recipe and seeds give the same bytes (a test checks), so this only saves the VAE stage's minutes",
    )
    parser.add_argument("--log", type=Path, default=ROOT / "benchmarks" / "results" / "train-tiny-model.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    start = time.time()
    pipe = build_pipeline()
    # Frozen and used as at inference: built in train mode, T5 would drop 10% of its activations (dropout
    # 0.1 in its config) in every training embedding, and the transformer would learn from noisier
    # prompts than it is then given (the recipe before this one did).
    pipe.text_encoder.eval()
    pipe.text_encoder_2.eval()
    log: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.vae_from:
        # Its weights into this run's VAE (from_pretrained would carry the folder's path into the saved config).
        pipe.vae.load_state_dict(load_file(args.vae_from / "vae" / "diffusion_pytorch_model.safetensors"))
        pipe.vae.eval()
        # That run's VAE record when its log is beside it, else this VAE's PSNR.
        earlier = args.vae_from / "train-tiny-model.json"
        if earlier.exists():
            log["vae"] = {**json.loads(earlier.read_text())["vae"], "from": "--vae-from"}
        else:
            log["vae"] = {"psnr_db": round(vae_psnr(pipe.vae), 2), "from": "--vae-from"}
    else:
        train_vae(pipe.vae, max(1, int(VAE_STEPS * args.scale)), log)
        log["vae"]["psnr_db"] = round(vae_psnr(pipe.vae), 2)
    print(f"vae psnr {log['vae']['psnr_db']} dB ({time.time() - start:.0f} s)", flush=True)
    max_len = SPECS["tiny"].max_sequence_length
    scenes, images = render_set(seed=2, count=max(64, int(LATENT_IMAGES * args.scale)))
    data = FlowData(pipe, scenes, normalise_latents(pipe.vae, encode_images(pipe.vae, images)), max_len)
    factors = {k: pipe.vae.config[k] for k in ("scaling_factor", "shift_factor")}
    if factors != {k: SPECS["tiny"].vae[k] for k in factors}:
        # A BFL single file carries no config: the spec must hold what the trained VAE's config says.
        print(f"NOTE: set SPECS['tiny'].vae in fluxray/models/specs.py to {factors} for the new weights", flush=True)
    print(f"latents ready ({time.time() - start:.0f} s)", flush=True)
    teacher = train_flow(pipe.transformer, data, max(1, int(FLOW_STEPS * args.scale)), log)
    log["flow"]["loss_by_sigma"] = loss_by_sigma(teacher.eval(), data)
    print(f"flow loss by sigma {log['flow']['loss_by_sigma']}", flush=True)
    pipe.transformer = distill_guidance(teacher, data, max(1, int(DISTILL_STEPS * args.scale)), log)
    pipe.transformer.eval().requires_grad_(False)
    # Encoding prompts left padding/truncation switched on in the fast tokenizers, which
    # save_pretrained would write into tokenizer.json: ship the untouched ones.
    fresh = build_pipeline()
    pipe.tokenizer, pipe.tokenizer_2 = fresh.tokenizer, fresh.tokenizer_2
    log["minutes"] = round((time.time() - start) / 60, 1)
    save(pipe, args.out)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    args.log.write_text(json.dumps(log, indent=1) + "\n")
    print(f"done in {log['minutes']} min", flush=True)


if __name__ == "__main__":
    main()
