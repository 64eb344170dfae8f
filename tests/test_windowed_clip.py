"""The windowed module against a hand-built computation with open_clip's own pieces."""
import pytest
import torch
import torch.nn.functional as F

from winclip_edge.export.models import load_model
from winclip_edge.export.windowed_clip import UnsupportedModelError, WindowedVisual
from winclip_edge.windows import window_token_index


def _model(config_dir, name):
    return load_model(str(config_dir / f"{name}.json"), "none", seed=1)


def _module(loaded, **kw):
    return WindowedVisual(loaded.model.visual, loaded.mean, loaded.std, **kw).eval()


def _normalised(images: torch.Tensor, loaded) -> torch.Tensor:
    x = images.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def _window_by_hand(visual, x_norm: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """The CLS embedding of the model run on [CLS + pos_0] + the window's patch tokens alone (open_clip pieces)."""
    patches = visual.conv1(x_norm).flatten(2).transpose(1, 2)  # [1, h*w, C]
    pos = visual.positional_embedding
    seq = [visual.class_embedding + pos[0]] + [patches[0, t] + pos[1 + t] for t in tokens]
    x = visual.ln_pre(torch.stack(seq)[None])
    x = visual.transformer(x)  # batch-first in open_clip >= 2.26
    return F.normalize(visual.ln_post(x[:, 0]) @ visual.proj, dim=-1)[0]


@pytest.mark.parametrize("config,scales", [("tiny240", (2, 3)), ("tiny224p32", (2, 3, 4)), ("tinyrect", (2, 3))])
def test_window_embedding_equals_model_on_window_alone(config_dir, config, scales):
    loaded = _model(config_dir, config)
    module = _module(loaded, scales=scales)
    images = torch.randint(0, 256, (2, *module.image_size, 3), dtype=torch.uint8)
    with torch.no_grad():
        out = module(images)
    x_norm = _normalised(images, loaded)
    h, w = module.grid
    for k in scales:
        index = window_token_index((h, w), k, 1)
        emb = out[f"window_embeddings_k{k}"]
        assert emb.shape == (2, index.shape[0], module.spec.embed_dim)
        for n in (0, 1):
            for win in (0, index.shape[0] // 2 + 1, index.shape[0] - 1):
                expected = _window_by_hand(loaded.model.visual, x_norm[n:n + 1], index[win].tolist())
                torch.testing.assert_close(emb[n, win], expected, atol=2e-5, rtol=0)


def test_image_embedding_equals_open_clip_encode_image(config_dir):
    loaded = _model(config_dir, "tiny240")
    module = _module(loaded)
    images = torch.randint(0, 256, (3, 240, 240, 3), dtype=torch.uint8)
    with torch.no_grad():
        ours = module(images)["image_embedding"]
        ref = F.normalize(loaded.model.encode_image(_normalised(images, loaded)), dim=-1)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)


def test_patch_layers(config_dir):
    loaded = _model(config_dir, "tiny240")
    visual = loaded.model.visual
    images = torch.randint(0, 256, (2, 240, 240, 3), dtype=torch.uint8)
    x = _normalised(images, loaded)
    with torch.no_grad():
        tokens = visual.ln_pre(torch.cat([visual.class_embedding.expand(2, 1, -1), visual.conv1(x).flatten(2).transpose(1, 2)], 1)
                               + visual.positional_embedding)
        blocks = visual.transformer.resblocks
        for blk in blocks[:-1]:
            tokens = blk(tokens)
        penultimate = F.normalize(tokens[:, 1:], dim=-1)
        last = F.normalize(visual.ln_post(blocks[-1](tokens)[:, 1:]), dim=-1)
        torch.testing.assert_close(_module(loaded)(images)["patch_tokens"], penultimate, atol=2e-5, rtol=0)
        torch.testing.assert_close(_module(loaded, patch_layer="last")(images)["patch_tokens"], last, atol=2e-5, rtol=0)


def test_windows_differ_across_windows(config_dir):
    """The anomalib 2.7 flat-map bug (windows attending to each other -> identical embeddings) cannot happen."""
    loaded = _model(config_dir, "tiny240")
    with torch.no_grad():
        out = _module(loaded)(torch.randint(0, 256, (1, 240, 240, 3), dtype=torch.uint8))
    for k in (2, 3):
        emb = out[f"window_embeddings_k{k}"][0]
        assert emb.std(0).mean() > 1e-3
        sims = emb @ emb.T
        assert (sims - torch.eye(len(emb))).max() < 1 - 1e-4  # no two windows identical


def test_batch_invariance(config_dir):
    loaded = _model(config_dir, "tiny240")
    module = _module(loaded)
    images = torch.randint(0, 256, (3, 240, 240, 3), dtype=torch.uint8)
    with torch.no_grad():
        batch = module(images)
        alone = module(images[1:2])
    for name in batch:
        torch.testing.assert_close(batch[name][1:2], alone[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("saving", ["cls_only_last_block", "shared_first_projections"])
def test_exact_savings_are_exact(config_dir, saving):
    loaded = _model(config_dir, "tiny224p32")
    fast, plain = _module(loaded), _module(loaded, **{saving: False})
    images = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    with torch.no_grad():
        a, b = fast(images), plain(images)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0)


@torch.no_grad()
def test_blocks_equal_open_clip_blocks(config_dir):
    """export/blocks.py on [sequences * length, width] rows == open_clip's block on [sequences, length, width]."""
    from winclip_edge.export.blocks import Block, ClsBlock

    loaded = _model(config_dir, "tiny240")
    for blk in loaded.model.visual.transformer.resblocks:
        x = torch.randn(5, 7, 64)
        expected = blk(x)
        torch.testing.assert_close(Block(blk)(x.reshape(-1, 64), 7).reshape(5, 7, 64), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(ClsBlock(blk)(x.reshape(-1, 64), 7), expected[:, 0], atol=1e-5, rtol=0)
        qkv = Block(blk).qkv(x.reshape(-1, 64), 7)
        torch.testing.assert_close(Block(blk)(x.reshape(-1, 64), 7, qkv).reshape(5, 7, 64), expected, atol=1e-5, rtol=0)


def test_custom_blocks_are_refused(config_dir):
    loaded = _model(config_dir, "tiny240")
    blocks = loaded.model.visual.transformer.resblocks
    blocks[1].attn = torch.nn.Identity()
    with pytest.raises(UnsupportedModelError, match="MultiheadAttention"):
        _module(loaded)


def test_grid_and_dims_come_from_the_model(config_dir):
    for name, grid, d, c in [("tiny240", (15, 15), 32, 64), ("tiny224p32", (7, 7), 24, 48), ("tinyrect", (6, 8), 16, 32)]:
        spec = _module(_model(config_dir, name), scales=(2, 3)).spec
        assert (spec.grid, spec.embed_dim, spec.width) == (grid, d, c)
