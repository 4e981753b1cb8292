"""CropFormer end to end on tiny configs: shapes, shared batch queries, switches, overfitting."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import REPO, tiny_model
from entityseg.models.association import AssociationModule
from entityseg.models.heads import MaskLogits


@pytest.mark.parametrize("views", [2, 5, 9])
def test_output_shapes(views):
    model = tiny_model().eval()
    images = torch.randn(2, views, 3, 64, 96)
    with torch.no_grad():
        out = model(images)
    for level in (out.image, out.batch):
        assert level.logits.shape == (2, views, 8, 2)
        assert level.masks.shape == (2, views, 8, 16, 24)
        assert len(level.aux) == 3  # the learnable queries + layers 1..2
        # eval mode: intermediate predictions keep their scores, no stride-4 masks are made
        assert all(a.masks is None and a.aux == [] for a in level.aux)
        assert all(a.logits.shape == (2, views, 8, 2) for a in level.aux)
    # one batch query = one entity score shared by every view
    logits = out.batch.logits
    assert torch.equal(logits, logits[:, :1].expand_as(logits))


def test_training_mode_keeps_every_intermediate_mask():
    out = tiny_model().train()(torch.randn(1, 2, 3, 64, 96))
    for level in (out.image, out.batch):
        assert [a.masks.shape for a in level.aux] == [(1, 2, 8, 16, 24)] * 3


def test_attention_masks_from_resized_features_equal_resized_masks(monkeypatch):
    """interpolate(e . F) == e . interpolate(F): the saving changes nothing but rounding."""
    model = tiny_model().eval()
    images = torch.randn(1, 3, 3, 64, 96)
    with torch.no_grad():
        fast = model(images)

        def resized_masks(self, embedding, level):  # the unoptimised way
            full = self.full(embedding)
            size = self.resized[level].shape[-2:]
            flat = full.reshape(-1, 1, *full.shape[-2:])
            small = torch.nn.functional.interpolate(
                flat, size=size, mode="bilinear", align_corners=False
            )
            return small.reshape(*full.shape[:-2], *size)

        monkeypatch.setattr(MaskLogits, "at_level", resized_masks)
        slow = model(images)
    for ours, unoptimised in zip(fast.to_tuple(), slow.to_tuple(), strict=True):
        torch.testing.assert_close(ours, unoptimised, rtol=1e-4, atol=1e-4)


def test_views_are_decoded_independently_by_the_image_decoder():
    model = tiny_model().eval()
    images = torch.randn(1, 3, 3, 64, 64)
    with torch.no_grad():
        together = model(images).image.masks
        alone = model(images[:, 1:2]).image.masks
    torch.testing.assert_close(together[:, 1:2], alone, rtol=1e-4, atol=1e-4)


def test_mask2former_baseline_has_no_batch_path():
    baseline = tiny_model(enabled=False)
    cropformer = tiny_model()
    assert baseline.association is None
    out = baseline(torch.randn(1, 1, 3, 64, 64))
    assert out.batch is None and out.image.masks.shape[:3] == (1, 1, 8)
    count = sum(p.numel() for p in cropformer.parameters())
    assert count > sum(p.numel() for p in baseline.parameters())
    assert cropformer(torch.randn(1, 2, 3, 64, 64), batch_level=False).batch is None


def test_separate_batch_decoder_weights():
    shared, separate = tiny_model(), tiny_model(share_decoder=False)
    assert separate.batch_decoder is not None and shared.batch_decoder is None
    extra = sum(p.numel() for p in separate.batch_decoder.parameters())
    total = sum(p.numel() for p in separate.parameters())
    assert total == sum(p.numel() for p in shared.parameters()) + extra
    assert separate(torch.randn(1, 2, 3, 64, 64)).batch.masks.shape == (1, 2, 8, 16, 16)


def test_association_switches():
    queries = torch.randn(2, 3, 5, 16)
    embed = torch.randn(5, 16)
    off = AssociationModule(16, 2, 32, xatt=False, satt=False, ffn=False)
    assert torch.equal(off(queries, embed), queries[:, 0])  # Q_b = E_{I^O}
    counts = {}
    for xatt, satt, ffn in [
        (True, False, False),
        (True, False, True),
        (True, True, False),
        (True, True, True),
    ]:
        module = AssociationModule(16, 2, 32, xatt=xatt, satt=satt, ffn=ffn)
        counts[(xatt, satt, ffn)] = sum(p.numel() for p in module.parameters())
        assert module(queries, embed).shape == (2, 5, 16)
    assert len(set(counts.values())) == 4
    # the cross-attention reads the crops: changing a crop's queries changes Q_b
    module = AssociationModule(16, 2, 32).eval()
    changed = queries.clone()
    changed[:, 2] += 1
    assert not torch.allclose(module(queries, embed), module(changed, embed))


def test_association_is_ffn_satt_xatt_of_fq_fk_fv():
    """Q_b = FFN(SAtt(XAtt(f_q(E_{I^O}), f_k(E_i), f_v(E_i)))): f_q, f_k, f_v are the
    cross-attention's in-projections, with the query embedding as position of query and keys."""
    torch.manual_seed(0)
    module = AssociationModule(16, 2, 32).eval()
    n, v, q, c = 2, 3, 5, 16
    view_queries, embed = torch.randn(n, v, q, c), torch.randn(q, c)
    full_image, tokens = view_queries[:, 0], view_queries.reshape(n, v * q, c)
    query_pos, key_pos = embed[None], embed.repeat(v, 1)[None]
    attn = module.cross_attention[0].attn
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)

    def heads(x):  # [N, L, C] -> [N, heads, L, C/heads]
        return x.unflatten(-1, (2, c // 2)).transpose(1, 2)

    f_q = module.f_q(full_image, query_pos)
    f_k = module.f_k(tokens, key_pos)
    f_v = module.f_v(tokens)
    torch.testing.assert_close(f_q, heads((full_image + embed) @ w_q.T + b_q))
    torch.testing.assert_close(f_k, heads((tokens + key_pos) @ w_k.T + b_k))
    torch.testing.assert_close(f_v, heads(tokens @ w_v.T + b_v))
    # XAtt as nn.MultiheadAttention computes it (the release's module), post-norm
    attended = attn(full_image + embed, tokens + key_pos, tokens, need_weights=False)[0]
    xatt = module.xatt(full_image, tokens, query_pos, key_pos)
    expected = module.cross_attention[0].norm(full_image + attended)
    torch.testing.assert_close(xatt, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(module(view_queries, embed), module.ffn[0](module.self_attention[0](xatt)))
    # the parameters keep the names the release's weights are converted to (interop.release)
    attention = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight"]
    attention += ["attn.out_proj.bias", "norm.weight", "norm.bias"]
    ffn = ["linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"]
    ffn += ["norm.weight", "norm.bias"]
    assert set(module.state_dict()) == {
        *(f"cross_attention.0.{k}" for k in attention),
        *(f"self_attention.0.{k}" for k in attention),
        *(f"ffn.0.{k}" for k in ffn),
    }
    with pytest.raises(ValueError, match="XAtt is switched off"):
        AssociationModule(16, 2, 32, xatt=False).f_q(full_image, query_pos)


BACKBONES = sorted(p.stem for p in (REPO / "conf/model/backbone").glob("*.yaml"))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_release_sized_model_from_config(backbone):
    """The real configs (100 queries, 9 layers, 6 encoder layers) build and give the shapes."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model/backbone={backbone}"])
    model = instantiate(cfg.model.net).eval()
    for views in (2, 5):
        with torch.no_grad():
            out = model(torch.zeros(1, views, 3, 64, 96))
        for level in (out.image, out.batch):
            assert level.logits.shape == (1, views, 100, 2)
            assert level.masks.shape == (1, views, 100, 16, 24)
            assert len(level.aux) == 9


def test_view_chunks_give_the_same_outputs():
    """``view_chunk``: backbone + pixel decoder a few views at a time, same predictions."""
    torch.manual_seed(0)
    model = tiny_model().eval()
    images = torch.randn(2, 3, 3, 64, 96)
    with torch.no_grad():
        whole = model(images)
        chunked = model(images, view_chunk=2)
    for ours, all_at_once in zip(chunked.to_tuple(), whole.to_tuple(), strict=True):
        torch.testing.assert_close(ours, all_at_once, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="view_chunk=0"):
        model(images, view_chunk=0)
