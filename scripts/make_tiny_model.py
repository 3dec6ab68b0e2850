"""The embedded tiny FLUX model before training (diffusers layout): where scripts/train_tiny_model.py starts;
and its editing variants, made from the shipped (trained) model.

    python scripts/make_tiny_model.py --out DIR
    python scripts/make_tiny_model.py --edit-variants     # writes fluxray/tiny/fill and fluxray/tiny/kontext

Real FLUX.1 architecture classes at tiny widths (fluxray.models.specs.SPECS["tiny"]), fixed-seed random
weights, and small tokenizers trained here on a fixed corpus (which includes the words of the
synthetic world, fluxray.tiny.scenes) so that they load offline. The output is deterministic: running this
twice gives the same tensors. The text encoders and tokenizers stay frozen in training, so those
files equal the shipped ones byte for byte; the shipped VAE and transformer are the trained ones.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import shutil
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fluxray.models.sources import EMBEDDED_MODELS, TINY_MODEL_DIR  # noqa: E402
from fluxray.models.specs import SPECS  # noqa: E402

CORPUS = """
a photo of a cat sitting on a red chair in the morning light
a painting of a mountain lake at sunset with pine trees and snow
an astronaut riding a horse on the moon, digital art, highly detailed
a bowl of fruit on a wooden table, still life, oil on canvas
portrait of an old man with a beard, black and white photograph
a futuristic city at night with neon lights and flying cars
a small house in a green forest, watercolor, soft colors
a dog running on the beach with waves and blue sky
a cup of coffee next to a book and glasses, cozy, warm light
a sign that says hello world, typography, bold letters
close up of a flower with water drops, macro photography
an owl in the rain, cinematic lighting, 35mm film
the quick brown fox jumps over the lazy dog
two people walking in a park in autumn, leaves on the ground
a robot playing chess with a child, illustration
blurry, low quality, distorted, ugly, bad anatomy, watermark, text
a red circle on the left, blue background
an orange square on the right, green background
a yellow triangle at the top, purple background
a white circle at the bottom, black background
a purple square in the center, white background
"""

CLIP_MERGES = 300
T5_PIECES = 700


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def corpus_words() -> list[str]:
    return [w.strip(",.") for w in CORPUS.lower().split() if w.strip(",.")]


def build_clip_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE in CLIP's format: bytes, bytes+</w>, learned merges, then the two specials."""
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    words = collections.Counter(corpus_words())
    splits = {w: [*(bytes_to_unicode()[b] for b in w.encode())] for w in words}
    for w in splits:
        splits[w][-1] += "</w>"
    merges: list[tuple[str, str]] = []
    while len(merges) < CLIP_MERGES:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for w, parts in splits.items():
            for a, b in zip(parts, parts[1:]):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        # Most frequent pair; ties broken by the pair itself so the result never varies.
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append((a, b))
        vocab.append(a + b)
        for w, parts in splits.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[w] = out
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)
    tok.model_max_length = 77
    return tok


def build_t5_tokenizer() -> T5Tokenizer:
    """A Unigram vocabulary in T5's layout: <pad>, </s>, <unk>, then pieces scored by frequency."""
    counts: collections.Counter[str] = collections.Counter()
    for w in CORPUS.split():
        counts["▁" + w] += 4
        for i in range(1, len(w)):
            counts[w[i:]] += 1
            counts["▁" + w[:i]] += 1
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()[]/&%$#@*+=_<>"
    chars = sorted(set(alphabet))
    pieces = ["▁"] + chars + ["▁" + c for c in chars]
    for p, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(pieces) >= T5_PIECES:
            break
        if p not in pieces:
            pieces.append(p)
    total = sum(counts.values()) + len(pieces)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, math.log((counts.get(p, 0) + 1) / total)) for p in pieces]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    tok.model_max_length = 512
    return tok


def build_pipeline() -> FluxPipeline:
    """The tiny model with its tokenizers and fixed-seed random weights (the start of training)."""
    spec = SPECS["tiny"]
    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer()
    if len(clip_tok) != spec.clip["vocab_size"] or len(t5_tok) != spec.t5["vocab_size"]:
        raise SystemExit(
            f"tokenizer sizes changed (clip {len(clip_tok)}, t5 {len(t5_tok)}): update SPECS['tiny'] vocab sizes"
        )
    torch.manual_seed(0)
    clip_cfg = {**spec.clip, "bos_token_id": len(clip_tok) - 2, "pad_token_id": len(clip_tok) - 1}
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip_cfg))
    text_encoder_2 = T5EncoderModel(T5Config(**spec.t5))
    transformer = FluxTransformer2DModel(**spec.transformer)
    with torch.no_grad():
        # At these widths and default init, attention over 512 mostly-padding T5 tokens is nearly
        # uniform and the velocity small, so the prompt barely shows in the image. Sharper q/k norms
        # and a larger output projection make the text visibly steer the pixels, which the tests need.
        for param in attention_norms(transformer):
            param.mul_(SHARPEN)
        transformer.proj_out.weight.mul_(SHARPEN)
        transformer.proj_out.bias.mul_(SHARPEN)
    vae = AutoencoderKL(**spec.vae)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**spec.scheduler),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


# How much build_pipeline sharpens the random transformer's q/k norms and output projection.
SHARPEN = 3.0


def attention_norms(transformer) -> list:
    """The weights of the transformer's q/k RMSNorms (image and text streams)."""
    return [
        param
        for name, param in transformer.named_parameters()
        if name.rsplit(".", 2)[-2] in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
    ]


def save(pipe: FluxPipeline, out: Path) -> None:
    """Write the pipeline in diffusers' layout (safetensors), replacing whatever `out` held."""
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "fluxray_spec.json").write_text(json.dumps({"spec": "tiny"}) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB)")


# The Fill variant's extra input channels (masked image latents and mask) start from this much noise, so
# the conditioning visibly steers the output (the parity tests need it to) without drowning the
# trained weights that read the latents.
FILL_CONDITION_STD = 0.05
VARIANT_PIPELINES = {"tiny-fill": "FluxFillPipeline", "tiny-kontext": "FluxKontextPipeline"}


def variant_transformer(name: str) -> FluxTransformer2DModel:
    """The variant's transformer from the shipped tiny one: Kontext has the same architecture and starts
    from the same weights (BFL's Kontext is FLUX.1-dev fine-tuned); Fill's input projection grows from
    64 to 384 channels, the new columns fixed-seed random."""
    base = FluxTransformer2DModel.from_pretrained(TINY_MODEL_DIR / "transformer", local_files_only=True)
    variant = FluxTransformer2DModel(**SPECS[name].transformer)  # a fresh config: no path of origin in it
    state = base.state_dict()
    old = state["x_embedder.weight"]
    if variant.config.in_channels > old.shape[1]:
        generator = torch.Generator().manual_seed(0)
        extra = torch.randn(old.shape[0], variant.config.in_channels - old.shape[1], generator=generator)
        state["x_embedder.weight"] = torch.cat([old, extra * FILL_CONDITION_STD], dim=1)
    variant.load_state_dict(state)
    return variant


def save_variant(name: str, out: Path) -> None:
    """A variant in diffusers layout: the tiny model's text encoders, tokenizers, VAE and scheduler
    (copied byte for byte: one app serves all the variants with one TextEncoder and one VAE) and its own
    transformer."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for folder in ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"):
        shutil.copytree(TINY_MODEL_DIR / folder, out / folder)
    variant_transformer(name).save_pretrained(out / "transformer", safe_serialization=True)
    index = json.loads((TINY_MODEL_DIR / "model_index.json").read_text())
    index["_class_name"] = VARIANT_PIPELINES[name]
    if name == "tiny-fill":  # FluxFillPipeline takes no image encoder
        index.pop("image_encoder", None)
        index.pop("feature_extractor", None)
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (out / "fluxray_spec.json").write_text(json.dumps({"spec": name}) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description="write the untrained tiny FLUX model (the start of training)")
    parser.add_argument("--out", type=Path, help="where to write it (not the shipped model)")
    parser.add_argument(
        "--edit-variants", action="store_true", help="write tiny-fill and tiny-kontext from the shipped tiny model"
    )
    args = parser.parse_args()
    if args.edit_variants:
        for name in VARIANT_PIPELINES:
            save_variant(name, EMBEDDED_MODELS[name])
        return
    out = args.out
    if out is None:
        parser.error("--out is required (or --edit-variants)")
    if out.resolve() == TINY_MODEL_DIR.resolve():
        raise SystemExit(f"refusing to overwrite the trained model in {TINY_MODEL_DIR}: make tiny-model retrains it")
    save(build_pipeline(), out)


if __name__ == "__main__":
    main()
