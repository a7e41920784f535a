"""The model surface, for every registered variant and depth."""

import dataclasses
from pathlib import Path

import pytest
import torch

from srvit.evaluate import count_parameters, gflops, router_usage
from srvit.model import SRViT, SRViTConfig
from srvit.registry import create_model, list_models, model_config

TINY = SRViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, num_blocks=2, num_heads=2,
                   mlp_ratio=2.0, max_depth=4, router_hidden=8)  # fmt: skip


@pytest.fixture(scope="module")
def tiny() -> SRViT:
    torch.manual_seed(0)
    return SRViT(TINY).eval()


def images(cfg: SRViTConfig, n: int = 2) -> torch.Tensor:
    return torch.randn(n, cfg.in_chans, cfg.img_size, cfg.img_size)


@pytest.mark.parametrize("name", list_models())
def test_every_variant_every_depth_gives_finite_logits(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = images(model.cfg, 1)
    with torch.no_grad():
        outs = [model(x, d) for d in range(1, model.cfg.max_depth + 1)]
    for out in outs:
        assert out.shape == (1, model.cfg.num_classes)
        assert torch.isfinite(out).all()
    assert not torch.allclose(outs[0], outs[-1]), "depth must change the output"


def test_default_depth_is_max_depth(tiny):
    x = images(TINY)
    assert torch.equal(tiny(x), tiny(x, TINY.max_depth))


@pytest.mark.parametrize("depth", [0, 5, -1])
def test_out_of_range_depth_is_refused(tiny, depth):
    with pytest.raises(ValueError, match="depth must be in 1..4"):
        tiny(images(TINY), depth)


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_router_weights_are_a_distribution_over_the_steps_used(tiny, depth):
    weights = tiny.router_weights(images(TINY), depth)
    assert len(weights) == TINY.num_blocks
    for w in weights:
        assert w.shape == (2, TINY.num_tokens, depth)
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))


def test_at_depth_1_the_block_output_is_its_single_step(tiny):
    x = tiny.embed(images(TINY))
    for blk in tiny.blocks:
        step = blk.steps(x, 1)[0]
        assert torch.equal(blk(x, 1), step)
        mixed, w = blk.mix([step])  # the general path agrees: a weight of exactly 1
        assert torch.equal(w, torch.ones_like(w))
        torch.testing.assert_close(mixed, step)
        x = step


def test_every_parameter_receives_a_gradient():
    torch.manual_seed(0)
    model = SRViT(TINY).train()
    model(images(TINY, 4)).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


def test_eval_mode_is_deterministic(tiny):
    x = images(TINY, 3)
    with torch.no_grad():
        assert torch.equal(tiny(x, 3), tiny(x, 3))


def test_forward_features_and_head_compose(tiny):
    x = images(TINY)
    feats = tiny.forward_features(x, 2)
    assert feats.shape == (2, TINY.num_tokens, TINY.embed_dim)
    assert tiny.forward_head(feats, pre_logits=True).shape == (2, TINY.embed_dim)
    assert torch.equal(tiny.forward_head(feats), tiny(x, 2))


def test_small_matches_the_papers_parameter_budget():
    model = create_model("srvit_small_patch16_224")
    routing = sum(p.numel() for n, p in model.named_parameters() if ".router." in n or n.endswith("step_embed"))
    assert count_parameters(model) - routing == 22_050_664  # DeiT-S exactly
    assert 23.4e6 <= count_parameters(model) <= 24.0e6  # paper: about +1.7M at depth 4


def test_gflops_count_attention_and_grow_with_depth():
    model = create_model("srvit_small_patch16_224").eval()
    # DeiT-S is 4.6 GMACs at 224 px; at depth 1 the router is skipped, so SR-ViT-S costs the same.
    assert gflops(model, 1) == pytest.approx(2 * 4.6, rel=0.02)
    assert gflops(model, 4) > 4 * gflops(model, 1)  # four block passes plus the router


def test_unknown_variant_and_bad_config_say_what_is_wrong():
    with pytest.raises(KeyError, match="srvit_fashion"):
        model_config("srvit_huge")
    with pytest.raises(ValueError, match="not a multiple"):
        SRViTConfig(img_size=30, patch_size=4)


def test_mean_pooling_has_no_class_token_and_reads_every_patch():
    torch.manual_seed(0)
    model = SRViT(dataclasses.replace(TINY, pool="mean")).eval()
    assert model.cls_token is None and model.cfg.num_tokens == TINY.num_patches
    x = images(TINY)
    with torch.no_grad():
        feats = model.forward_features(x, 3)
        assert feats.shape == (2, TINY.num_patches, TINY.embed_dim)
        torch.testing.assert_close(model(x, 3), model.head(feats.mean(dim=1)))
    with pytest.raises(ValueError, match="pool"):
        dataclasses.replace(TINY, pool="max")


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_router_usage_names_the_class_token_only_when_there_is_one(pool):
    torch.manual_seed(0)
    model = SRViT(dataclasses.replace(TINY, pool=pool))
    ds = torch.utils.data.TensorDataset(images(TINY, 4), torch.zeros(4, dtype=torch.long))
    usage = router_usage(model, ds, n=4)
    assert sorted(usage) == (["all_tokens", "class_token"] if pool == "cls" else ["all_tokens"])
    assert sum(usage["all_tokens"]) == pytest.approx(1.0, abs=0.01)


def test_extra_stem_convs_work_at_half_resolution_and_leave_the_tokens_alone():
    base = SRViTConfig(img_size=28, patch_size=4, stem="conv", in_chans=1, num_classes=10, embed_dim=16,
                       num_blocks=1, num_heads=2, mlp_ratio=2.0, max_depth=2, router_hidden=8)  # fmt: skip
    deeper = dataclasses.replace(base, stem_convs=5)
    torch.manual_seed(0)
    small, big = SRViT(base).eval(), SRViT(deeper).eval()
    x = images(base)
    assert small.patch_embed(x).shape == big.patch_embed(x).shape == (2, 49, 16)
    half = base.embed_dim // 2  # two more 3x3 convs of half-width channels, each with a BatchNorm's weight and bias
    assert count_parameters(big) - count_parameters(small) == 2 * (9 * half * half + 2 * half)
    assert torch.isfinite(big(x)).all()
    with pytest.raises(ValueError, match="at least 3 convs"):
        dataclasses.replace(base, stem_convs=2)


def test_a_config_written_before_stem_convs_existed_builds_the_three_conv_stem():
    d = model_config("srvit_fashion").to_dict()
    del d["stem_convs"]
    assert SRViTConfig.from_dict(d).stem_convs == 3


def test_the_router_load_is_that_of_the_forward_that_returns_it(tiny):
    x = images(TINY, 3)
    with torch.no_grad():
        logits, load = tiny.forward_with_router_load(x, 3)
    assert torch.equal(logits, tiny(x, 3)), "the same forward as the model's own"
    expected = torch.stack([w.mean(dim=(0, 1)) for w in tiny.router_weights(x, 3)])  # [blocks, depth]
    torch.testing.assert_close(load, expected)


def test_after_a_depth_1_forward_there_is_nothing_to_balance():
    torch.manual_seed(0)
    model = SRViT(TINY).train()
    x = images(TINY, 4)
    _, deep = model.forward_with_router_load(x, 4)  # an earlier forward that did route
    _, load = model.forward_with_router_load(x, 1)
    assert torch.equal(load, torch.ones(TINY.num_blocks, 1)), "one step takes all the weight"
    assert model.router_balance_loss(load) == 0
    assert model.router_balance_loss(deep) > 0, "the earlier forward's load is its own, not carried over"


def test_the_balance_loss_is_the_kl_to_uniform_and_trains_the_router():
    collapsed_and_uniform = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    torch.testing.assert_close(SRViT.router_balance_loss(collapsed_and_uniform), torch.tensor(4.0).log() / 2)
    torch.manual_seed(0)
    model = SRViT(TINY).train()
    _, load = model.forward_with_router_load(images(TINY, 4), 3)
    model.router_balance_loss(load).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.router_parameters())


def test_the_committed_checkpoint_still_loads_and_trains_with_its_router_load():
    """Checkpoints saved while the router load was module state load key for key (load_checkpoint is strict)."""
    from srvit.checkpoint import load_checkpoint

    committed = Path(__file__).resolve().parents[2] / "srvit" / "checkpoints" / "srvit_fashion.safetensors"
    model, _ = load_checkpoint(committed)
    x = images(model.cfg, 2)
    with torch.no_grad():
        logits, load = model.forward_with_router_load(x)
        assert torch.equal(logits, model(x))
    assert load.shape == (model.cfg.num_blocks, model.cfg.max_depth)
