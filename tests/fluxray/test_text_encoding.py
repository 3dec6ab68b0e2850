"""Which encoders cut a prompt short, counted with the real tokenizers as encode() tokenizes."""

from __future__ import annotations

from fluxray.models.sources import resolve_model
from fluxray.text_encoding import PromptLength


def words(n: int) -> str:
    # One T5 token and three CLIP tokens each in the tiny vocabularies.
    return " ".join(["triangle"] * n)


def test_truncation_is_reported_per_encoder(tiny_pipeline):
    length = PromptLength.load(resolve_model("tiny"))
    assert length.clip_tokenizer.model_max_length == 77 and length.max_sequence_length == 64

    def tokens(text: str) -> tuple[int, int]:
        return len(length.clip_tokenizer(text).input_ids), len(length.t5_tokenizer(text).input_ids)

    short, clip_only, both = words(10), words(30), words(200)
    assert tokens(short)[0] <= 77 < tokens(clip_only)[0] and tokens(clip_only)[1] <= 64 < tokens(both)[1]
    assert length.truncated(short) == []
    assert length.truncated(clip_only) == ["clip"]
    assert length.truncated(both) == ["clip", "t5"]
    assert length.truncated(short, prompt_2=both) == ["t5"]  # T5 reads prompt_2 when given
    assert tiny_pipeline.text_encoder.length.truncated(clip_only) == ["clip"]
