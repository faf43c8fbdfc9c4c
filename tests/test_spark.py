"""The SparK model: masking, densify, decoder and loss behave as the paper describes."""

import pytest
import timm
import torch
from omegaconf import OmegaConf

from spark_sparse import create_encoder
from spark_sparse.encoders.layouts import check_scales
from spark_sparse.model.decoder import LightDecoder
from spark_sparse.model.densify import Densify
from spark_sparse.model.loss import masked_patch_loss, normalise_patches, patchify, reconstruct, unpatchify
from spark_sparse.pretrain.optim import build_optimizer, build_scheduler, weight_decay_at
from spark_sparse.model.spark import SparK
from .conftest import ENGINE_NAMES, needs_minkowski, randomise_norms


def small(engine="sparse", **kw):
    torch.manual_seed(0)
    return SparK.build("resnet18", engine=engine, decoder_width=64, **kw)


def test_patchify_round_trip_and_per_patch_normalisation():
    x = torch.randn(2, 3, 64, 96)
    p = patchify(x, 32)
    assert p.shape == (2, 6, 32 * 32 * 3)
    assert torch.equal(unpatchify(p, 32, (2, 3)), x)
    assert torch.equal(p[0, 4], x[0, :, 32:64, 32:64].permute(1, 2, 0).reshape(-1))
    normed, _, _ = normalise_patches(p)
    torch.testing.assert_close(normed.mean(-1), torch.zeros(2, 6), atol=1e-5, rtol=0)
    torch.testing.assert_close(normed.std(-1), torch.ones(2, 6), atol=1e-3, rtol=0)


def test_loss_counts_hidden_patches_only():
    images = torch.randn(2, 3, 64, 64)
    active = torch.tensor([[True, False], [False, True]]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    pred = torch.randn(2, 3, 64, 64)
    base = masked_patch_loss(pred, images, active, 32)
    changed = pred.clone()
    changed[:, :, :32, :32] += 100.0  # a visible patch
    assert masked_patch_loss(changed, images, active, 32) == base
    changed[:, :, :32, 32:] += 100.0  # a hidden patch
    assert masked_patch_loss(changed, images, active, 32) > base
    # predicting the normalised target exactly gives zero loss
    target = unpatchify(normalise_patches(patchify(images, 32))[0], 32, (2, 2))
    assert masked_patch_loss(target, images, active, 32) < 1e-10
    # and reconstruct() maps that prediction back to the image itself
    torch.testing.assert_close(reconstruct(target, images, active, 32), images, atol=1e-4, rtol=1e-4)


def test_densify_fills_hidden_sites_with_the_mask_token():
    d = Densify(8, 8, norm="none", kernel_size=1)
    assert isinstance(d.proj, torch.nn.Identity)
    x = torch.randn(1, 8, 2, 2)
    visible = torch.tensor([[True, False], [False, True]]).view(1, 1, 2, 2)
    out = d(x * visible, visible)
    assert torch.equal(out[0, :, 0, 0], x[0, :, 0, 0])
    assert torch.equal(out[0, :, 0, 1], d.mask_token.view(-1))
    with pytest.raises(ValueError, match="densify norm must be one of"):
        Densify(8, 8, norm="group")


@pytest.mark.parametrize("precision", [torch.float64, torch.bfloat16], ids=["float64", "bf16 autocast"])
def test_decoder_checkpointing_changes_nothing_but_memory(precision):
    """Made again in backward, the decoder's activations give the plain step's loss, gradients and
    norm statistics, bit for bit: its batch norms count the batch once (under autocast too)."""
    images, active = torch.randn(2, 3, 64, 96, dtype=torch.float64), torch.rand(2, 1, 2, 3) < 0.5
    results = []
    for checkpointed in (False, True):
        model = small("dense_masked", decoder_checkpoint=checkpointed).double().train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == torch.bfloat16):
            loss = model(images, active)["loss"]
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results.append((loss, grads, dict(model.decoder.named_buffers())))
    (loss, grads, buffers), (loss_c, grads_c, buffers_c) = results
    assert torch.equal(loss, loss_c)
    assert grads.keys() == grads_c.keys() and all(torch.equal(grads[k], grads_c[k]) for k in grads)
    assert buffers.keys() == buffers_c.keys() and all(torch.equal(buffers[k], buffers_c[k]) for k in buffers)
    assert all(int(n) == 1 for k, n in buffers_c.items() if k.endswith("num_batches_tracked"))


def test_a_checkpointed_decoder_keeps_each_blocks_input_alone():
    """What a training pass keeps for backward: a tenth of the plain decoder's (each block's input
    and the head's), and the plain decoder's all in eval mode or without gradients."""
    features = [torch.randn(2, 64 // 2 ** i, 2 * 2 ** i, 3 * 2 ** i, requires_grad=True) for i in range(4)]

    def kept(decoder) -> int:
        count = [0]

        def keep(t: torch.Tensor) -> torch.Tensor:
            count[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            decoder(features)
        return count[0]

    torch.manual_seed(0)
    plain, checkpointed = LightDecoder(64), LightDecoder(64, checkpoint=True)
    assert kept(checkpointed) < 0.1 * kept(plain)
    assert kept(checkpointed.eval()) == kept(plain.eval())


@needs_minkowski
@pytest.mark.parametrize("hierarchy", [1, 4])
def test_model_shapes_and_hierarchy(hierarchy):
    model = small(hierarchy=hierarchy)
    assert len(model.densify) == hierarchy
    out = model(torch.randn(2, 3, 64, 96))
    assert out["pred"].shape == (2, 3, 64, 96)
    assert out["active"].shape == (2, 1, 2, 3)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])


def test_a_familys_scales_halve_without_a_gap_down_from_the_masks_patch():
    for strides in [(4, 8, 16, 32), (8, 16, 32), (2, 4, 8, 16, 32), (32,), (4, 8, 16)]:
        check_scales(strides)
    # each scale feeds a decoder block from the patch down; the patch is 32 or 16 (NesT's)
    for strides in [(8, 32), (4, 8, 16, 32, 64), (2, 4, 8), ()]:
        with pytest.raises(ValueError, match=r"must double from the finest to the mask's patch, 16 or 32$"):
            check_scales(strides)


@needs_minkowski
def test_an_encoder_whose_coarsest_stride_is_16_masks_16_pixel_patches():
    """NesT's levels sit at strides 4, 8 and 16: the mask's patch, the loss's patches and the
    decoder's upsampling (four blocks) follow its coarsest stride."""
    timm_model = timm.create_model("nest_tiny", pretrained=False, num_classes=0, img_size=64)
    model = SparK(create_encoder(timm_model, "sparse"), decoder_width=32)
    assert model.encoder.strides == (4, 8, 16) and model.stride == 16 and len(model.decoder.blocks) == 4
    images = torch.randn(2, 3, 64, 64)
    active = model.random_mask(images)
    assert active.shape == (2, 1, 4, 4) and int(active.sum()) == 2 * round(16 * 0.4)
    out = model(images, active)
    assert out["pred"].shape == (2, 3, 64, 64)
    assert out["loss"] == masked_patch_loss(out["pred"], images, active, 16)


@needs_minkowski
def test_an_encoder_of_three_scales_feeds_the_decoder_three():
    """Visformer's stages sit at strides 8, 16 and 32: by default all three feed the decoder, the
    coarsest first (its blocks from stride 32 down; the two finest take none), and four are refused."""
    timm_model = randomise_norms(timm.create_model("visformer_tiny", pretrained=False, num_classes=0, img_size=64))
    model = SparK(create_encoder(timm_model, "sparse"), decoder_width=32)
    assert model.encoder.strides == (8, 16, 32) and model.hierarchy == 3
    assert [d.mask_token.shape[1] for d in model.densify] == [384, 192, 96]  # the encoder's channels, coarsest first
    out = model(torch.randn(2, 3, 64, 64))
    assert out["pred"].shape == (2, 3, 64, 64) and torch.isfinite(out["loss"])
    assert SparK(create_encoder(timm_model, "sparse"), decoder_width=32, hierarchy=1).hierarchy == 1
    with pytest.raises(ValueError, match=r"^hierarchy must be in 1\.\.3, got 4$"):
        SparK(create_encoder(timm_model, "sparse"), decoder_width=32, hierarchy=4)


@needs_minkowski
@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "regnetx_002", "efficientnet_b0",
                                  "mobilenetv3_small_100",
                                  "resnetv2_50x1_bit", "tf_mobilenetv3_small_100",
                                  "repvgg_a0", "mobileone_s0", "cspdarknet53", "test_nfnet",
                                  "mobilenetv4_conv_small", "resnet50_gn", "test_mambaout", "densenet121", "rexnet_100",
                                  "ghostnet_050", "hgnetv2_b0", "hgnet_tiny", "starnet_s050", "fasternet_t0",
                                  "repvit_m0_9", "res2net50_26w_4s", "resnest14d", "rdnet_tiny",
                                  "inception_next_atto", "dpn48b", "ese_vovnet19b_slim_dw", "cspnext_tiny",
                                  "legacy_seresnet18", "dla46_c", "repghostnet_050",
                                  "skresnet18", "mixnet_s", "gcresnet33ts",
                                  "regnetz_b16_evos", "resnetv2_50d_frn", "efficientnet_cc_b0_4e",
                                  "xception41", "hrnet_w18_small", "fastvit_t8", "regnetv_040",
                                  "resnetblur18", "tresnet_m", "convformer_s18", "poolformerv2_s12",
                                  "focalnet_tiny_srf", "lcnetv2_small", "efficientvit_b0",
                                  "swiftformer_xs", "caformer_s18", "pvt_v2_b0", "twins_svt_small",
                                  "tiny_vit_5m_224", "efficientformer_l1", "swin_tiny_patch4_window7_224",
                                  "swinv2_tiny_window8_256", "edgenext_xx_small",
                                  "selecsls42b", "swinv2_cr_tiny_224", "davit_tiny", "mobilevit_xxs",
                                  "mobilevitv2_050", "mobilenetv5_base", "iformer_t", "test_maxvit", "test_coatnet",
                                  "botnet26t_256", "lambda_resnet26t", "hiera_tiny_224", "cpubone_t0",
                                  "lowformer_b0", "gcvit_xxtiny", "mvitv2_tiny", "efficientformerv2_s0",
                                  "halonet26t", "sam2_hiera_tiny", "coat_lite_tiny", "visformer_tiny",
                                  "nest_tiny"])
def test_every_family_pretrains_end_to_end(name):
    # the decoder adapts to each family's channels (EfficientNet's head conv: 1280 at stride 32);
    # norms randomised: timm zero-initialises each block's last norm, which stops the gradient
    torch.manual_seed(0)
    # MaxViT's groups and grids, CoAtNet's and BotNet's maps, of the size it is built for: 64 px here
    kwargs = {"img_size": 64} if name in ("test_maxvit", "test_coatnet", "botnet26t_256", "hiera_tiny_224",
                                                "gcvit_xxtiny", "mvitv2_tiny", "efficientformerv2_s0",
                                                "coat_lite_tiny", "visformer_tiny", "nest_tiny") else {}
    if name == "nest_tiny":  # timm's default drop path, 0.5, drops deep branches for the whole batch
        kwargs["drop_path_rate"] = 0.0
    if name == "halonet26t":  # halo attention's blocks whole at stride 32: 2x2 sites at 64 px
        kwargs = {"self_attn_kwargs": {"block_size": 2, "halo_size": 1}}
    if name == "sam2_hiera_tiny":  # windows whole at strides 16 and 32 at 64 px
        kwargs = {"window_spec": (8, 4, 2, 2)}
    timm_model = randomise_norms(timm.create_model(name, pretrained=False, num_classes=0, **kwargs))
    model = SparK(create_encoder(timm_model, "sparse"), decoder_width=32, mask_ratio=0.6)
    out = model(torch.randn(2, 3, 64, 64))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    untrained = [n for n, p in model.encoder.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    # but GCNet's logits' bias: the softmax over an image's sites is blind to it (zero gradient, in timm too)
    assert not [n for n in untrained if not n.endswith(".attn.conv_attn.bias")]


def test_masks_come_from_the_models_seeded_generator():
    a, b = small("dense_masked", mask_ratio=0.6), small("dense_masked", mask_ratio=0.6)  # either engine's SparK
    x = torch.zeros(3, 3, 224, 224)
    m1, m2 = a.random_mask(x), b.random_mask(x)
    assert torch.equal(m1, m2) and m1.flatten(1).sum(1).tolist() == [20, 20, 20]
    assert not torch.equal(a.random_mask(x), m1)  # the generator moves on


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_mask_planned_ahead_gives_what_the_mask_itself_gives(engine):
    """``SparK.plan`` makes what a mask alone decides (on a GPU, while the step before runs; with
    ``like``, every table that step's layers read): the loss and every gradient are the mask's."""
    model = small(engine).train()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, 96, 128, generator=g)
    before, active = model.random_mask(x, generator=g), model.random_mask(x, generator=g)

    def loss_and_grads(mask):
        model.zero_grad(set_to_none=True)
        loss = model(x, mask)["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    first = model.plan(before, "cpu")
    model(x, first)
    want = loss_and_grads(active)
    got = loss_and_grads(model.plan(active, "cpu", like=first))
    assert torch.equal(got[0], want[0])
    assert got[1].keys() == want[1].keys() and all(torch.equal(got[1][n], want[1][n]) for n in want[1])


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_plan_refuses_images_it_was_not_made_for(engine):
    model = small(engine)
    plan = model.plan(torch.ones(2, 1, 2, 2, dtype=torch.bool), "cpu")
    with pytest.raises(ValueError, match="planned for 2 images|active must have shape"):
        model(torch.randn(3, 3, 64, 64), plan)


@needs_minkowski
def test_sparse_and_dense_masked_spark_agree():
    sparse, dense = small("sparse").eval(), small("dense_masked").eval()
    dense.load_state_dict({k: v for k, v in dense.state_dict().items()} | {
        k: v for k, v in _as_dense_names(sparse).items()})
    x = torch.randn(2, 3, 64, 64)
    active = torch.tensor([[True, False], [True, True]]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    with torch.no_grad():
        a, b = sparse(x, active), dense(x, active)
    torch.testing.assert_close(a["pred"], b["pred"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)


def _as_dense_names(sparse_model: SparK) -> dict:
    sd = {f"encoder.body.{k}": v for k, v in sparse_model.encoder.timm_state_dict().items()}
    sd |= {k: v for k, v in sparse_model.state_dict().items() if not k.startswith("encoder.")}
    return sd


def optim_config(name="lamb", base_lr=2e-4, timm_no_weight_decay=True):
    return OmegaConf.create({"name": name, "base_lr": base_lr, "betas": [0.9, 0.95], "weight_decay": 0.04,
                             "min_lr": 0.0, "timm_no_weight_decay": timm_no_weight_decay})


def decayed(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}


@pytest.mark.parametrize("engine", ENGINE_NAMES)  # the sparse engine's biases are (1, C) matrices
def test_no_weight_decay_on_biases_norms_and_mask_tokens(engine):
    model = small(engine)
    cfg = optim_config()
    opt = build_optimizer(model, cfg, batch_size=512)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        assert group["lr"] == pytest.approx(4e-4)  # base_lr * 512 / 256
        for p in group["params"]:
            no_decay = p.ndim <= 1 or names[id(p)].endswith(".bias") or "mask_token" in names[id(p)]
            assert (group["weight_decay"] == 0.0) == no_decay, names[id(p)]
    assert type(opt).__name__ == "Lamb"


# one model of each timm module whose no_weight_decay() names parameters that are not 1-D
EXEMPT_BY_NAME = ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "hiera_tiny_224", "tiny_vit_5m_224",
                  "efficientformer_l1", "twins_pcpvt_small", "coatnet_rmlp_nano_rw_224", "maxvit_nano_rw_256",
                  "gcvit_xxtiny", "mvitv2_tiny", "mvitv2_small_cls", "efficientformerv2_s0", "sam2_hiera_tiny",
                  "coat_lite_tiny", "nest_tiny"]


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize("name", EXEMPT_BY_NAME)
def test_pretraining_decays_the_encoder_weights_timms_optimiser_decays(name, engine):
    """As fine-tuning (timm's optimiser on timm's model) and SparK's own ``pos_embed`` rule: position
    tables, attention biases and positional convolutions take no weight decay."""
    timm_model = timm.create_model(name, num_classes=0)
    model = SparK(create_encoder(timm_model, engine), decoder_width=64)
    encoder_weights = set(model.encoder.timm_state_dict())  # not its head's
    timm_decayed = encoder_weights & decayed(timm.optim.create_optimizer_v2(timm_model, "lamb", weight_decay=0.04),
                                             timm_model)
    ours = decayed(build_optimizer(model, optim_config(), batch_size=256), model)
    assert {model.encoder.timm_key(k.removeprefix("encoder.")) for k in ours if k.startswith("encoder.")} \
        == timm_decayed
    exempt_by_name = {n for n, p in timm_model.named_parameters()
                      if n in encoder_weights and p.ndim > 1 and n not in timm_decayed}
    assert exempt_by_name, "the model has no parameter its no_weight_decay() exempts"
    # runs begun before optim.timm_no_weight_decay existed decay those too, resumed as they began
    before = decayed(build_optimizer(model, optim_config(timm_no_weight_decay=False), batch_size=256), model)
    assert {model.encoder.timm_key(k.removeprefix("encoder.")) for k in before - ours} == exempt_by_name


def test_schedules_warm_up_then_decay():
    model = small("dense_masked")  # the engine plays no part
    cfg = optim_config("adamw", base_lr=256.0)
    opt = build_optimizer(model, cfg, batch_size=1)
    sched = build_scheduler(opt, cfg, max_steps=100, warmup_steps=10)
    lrs = []
    for step in range(100):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and max(lrs) == pytest.approx(1.0, rel=1e-2)
    assert lrs[99] < 0.01 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert weight_decay_at(0, 100, 0.04, 0.2) == pytest.approx(0.04)
    assert weight_decay_at(100, 100, 0.04, 0.2) == pytest.approx(0.2)
    assert weight_decay_at(50, 100, 0.04, 0.2) == pytest.approx(0.12)
