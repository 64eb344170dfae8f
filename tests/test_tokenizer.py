"""The runtime tokenizer (bundle tokenizer.json + HuggingFace tokenizers + ftfy) equals open_clip's SimpleTokenizer."""
import random

import numpy as np
import pytest

from winclip_edge.prompts import PROMPT_STYLES, PromptSpec, build_prompts, object_name_for
from winclip_edge.tokenizer import ClipTokenizer, TokenizerError

# MVTec AD and VisA object names, the textile demo and a few line products
PRODUCTS = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
    "toothbrush", "transistor", "wood", "zipper", "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1",
    "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum", "textile", "widget", "O-ring (12 mm)", "Café crème",
)

POOLS = [
    "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿßœÀÉÎÕÜŒ", "ſİıΣσςΑβγ",  # long s, Turkish i, Greek (final sigma)
    "日本語の検査部品傷汚れ中文测试한국어", "🙂👍🏽🔩⚙️🧵❤️‍🔥🇩🇪", "“”‘’«»–—…№™©®°±×÷",  # CJK, emoji (ZWJ, flags), typography
    "ﬁﬂﬀ", "ＡＢＣａｂｃ１２３，。！", "\u0301\u0308\u200b\u200d\u00ad",  # ligatures, full width, combining / zero width
    " \t\n\r\u00a0\u2003\u3000\x0b\x1c",  # whitespace of every kind
]
WORDS = ["&amp;", "&lt;b&gt;", "&amp;amp;", "it's", "we'LL", "don't", "'s", "3.14", "1,000", "<b>bold</b>", "Ã©",
         "â€™", "it'ſ", "naïve", "scratch", "dent", "O'Neil's", "e-mail", "x86_64"]


def generated_texts(n: int = 1000, seed: int = 0) -> list[str]:
    """Random strings from all pools; every 50th is very long (beyond the 77-token context)."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.3:
                parts.append(rng.choice(WORDS))
            else:
                pool = rng.choice(POOLS)
                parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 8))))
        text = rng.choice(["", " ", "  "]).join(parts)
        if i % 50 == 0:
            text = (text + " ") * rng.randint(20, 60)
        texts.append(text)
    return texts


@pytest.fixture(scope="module")
def tokenizers_pair(tmp_path_factory):
    from open_clip.tokenizer import SimpleTokenizer

    from winclip_edge.export.text_encoder import tokenizer_json

    reference = SimpleTokenizer()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(tokenizer_json(reference), encoding="utf-8")
    return ClipTokenizer(path, reference.context_length), reference


def _assert_same(ours, reference, texts):
    got, expected = ours(texts), reference(texts).numpy()
    assert got.dtype == np.int64 and got.shape == expected.shape == (len(texts), 77)
    bad = [t for t, a, b in zip(texts, got, expected) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} texts differ, e.g. {bad[:3]!r}"


def test_every_product_prompt_matches_open_clip(tokenizers_pair):
    ours, reference = tokenizers_pair
    texts = []
    for product in PRODUCTS:
        for style in PROMPT_STYLES:
            normal, anomalous = build_prompts(PromptSpec(object_name=object_name_for(product), style=style))
            texts += normal + anomalous
    assert len(texts) > 4000
    _assert_same(ours, reference, texts)


def test_generated_strings_match_open_clip(tokenizers_pair):
    ours, reference = tokenizers_pair
    texts = generated_texts()
    assert sum(len(reference.encode(t)) > 75 for t in texts) >= 20  # truncation is exercised
    assert any(ord(c) > 0x3000 for t in texts for c in t) and any("&amp;" in t for t in texts)
    _assert_same(ours, reference, texts)


@pytest.mark.parametrize("text", ["", "   ", "a", "A PHOTO OF A CABLE.", "x" * 5000, "word " * 200, "¡" * 100])
def test_edge_cases_match_open_clip(tokenizers_pair, text):
    ours, reference = tokenizers_pair
    _assert_same(ours, reference, [text])


def test_truncation_keeps_the_end_token(tokenizers_pair):
    ours, _ = tokenizers_pair
    ids = ours(["defect " * 100])[0]
    assert ids[0] == 49406 and ids[-1] == 49407 and (ids != 0).all()


def test_reserved_tokens_are_refused(tokenizers_pair):
    ours, _ = tokenizers_pair
    with pytest.raises(TokenizerError, match="reserved token"):
        ours(["a photo of a <END_of_text> nut"])


def test_a_file_that_is_not_a_tokenizer_is_refused(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(TokenizerError, match="not a usable tokenizer"):
        ClipTokenizer(bad, 77)
