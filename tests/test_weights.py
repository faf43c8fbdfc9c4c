"""Weights move both ways between an ordinary timm model and the encoders, losslessly; encoders
copy and pickle; what cannot be converted is refused by name and path."""

import copy
import pickle

import pytest
import timm
import torch
from timm.layers import BlurPool2d, SpaceToDepth

from spark_sparse import create_encoder, engine_class, random_active
from spark_sparse.encoders.refusals import ConversionError

from .conftest import ENGINE_NAMES, needs_minkowski

# one member of each family for each block type, stem and head it converts (the keys of a deeper or
# wider member are the same modules repeated); ResNet-101/152/200 and ConvNeXt-S/B/L differ from
# ResNet-50 and ConvNeXt-T only in blocks per stage (beyond ten: two-digit block indices),
# EfficientNet-B1..B7 from B0 in width and depth multipliers: they are here by their layouts
FOUR_BLOCKS = {"layers": (1, 1, 1, 1)}
ALL_DEPTHS = {name: (name, {}) for name in [
    "resnet18", "resnet26", "resnet26d", "seresnet18", "ecaresnet26t", "seresnext26d_32x4d",
    "convnext_atto", "convnext_atto_ols", "convnextv2_atto", "regnetx_002", "regnety_002",
    "efficientnet_b0", "efficientnet_es", "mobilenetv3_large_100", "mobilenetv3_small_100",
    "mobilenetv4_conv_small", "mobilenetv4_conv_aa_medium"]}
ALL_DEPTHS["anti-aliased ResNet (2x2 average pooling)"] = ("resnetaa50d", FOUR_BLOCKS)
ALL_DEPTHS["ResNet with GroupNorm"] = ("resnet50_gn", FOUR_BLOCKS)
ALL_DEPTHS["MambaOut (a block a stage)"] = ("mambaout_femto", {"depths": (1, 1, 1, 1)})
ALL_DEPTHS["MambaOut _rw: norm-first downsampling, layer scale, MLP head"] = ("test_mambaout", {})
ALL_DEPTHS["DenseNet (two layers a block)"] = ("densenet121", {"block_config": (2, 2, 2, 2)})
ALL_DEPTHS["DenseNet, deep stem"] = ("densenet264d", {"block_config": (1, 1, 1, 1)})
ALL_DEPTHS.update({name: (name, {}) for name in ["rexnet_100", "rexnetr_100", "ghostnet_050"]})
ALL_DEPTHS.update({name: (name, {}) for name in ["ghostnetv2_100", "ghostnetv3_050"]})  # DFC gates, V3's branches
ALL_DEPTHS.update({f"{name} (a small head MLP)": (name, {"mlp_ratio": 1 / 64}) for name in ["vgg11", "vgg11_bn"]})
ALL_DEPTHS.update({name: (name, {}) for name in ["hgnetv2_b0", "hgnet_tiny"]})  # a head 1x1 kept
ALL_DEPTHS.update({name: (name, {}) for name in ["starnet_s050", "fasternet_t0"]})
ALL_DEPTHS["ConvFormer (StarReLU's scalars, residual scales, a kept head norm)"] = ("convformer_s18", {})
ALL_DEPTHS.update({name: (name, {}) for name in ["poolformer_s12", "poolformerv2_s12"]})  # one-group norms
ALL_DEPTHS["caformer_s18"] = ("caformer_s18", {})  # self-attention's qkv and proj, linear MLPs
ALL_DEPTHS.update({name: (name, {}) for name in ["fastvit_sa12", "fastvit_mci0"]})  # positional encodings, attention
ALL_DEPTHS["mobilenetv4_hybrid_medium"] = ("mobilenetv4_hybrid_medium", {})  # multi-query attention's projections
ALL_DEPTHS["FocalNet (split 1x1 outputs, a final norm ending the last stage)"] = ("focalnet_tiny_srf", {})
ALL_DEPTHS["FocalNet-H's layout (post norms, a norm in the modulation, layer scale, overlapping convolutions)"] = (
    "focalnet_tiny_srf", {"use_post_norm": True, "use_post_norm_in_modulation": True, "use_overlap_down": True,
                          "layerscale_value": 1e-4})
ALL_DEPTHS["FasterNet with layer scale"] = ("fasternet_t0", {"layer_scale_init_value": 0.1})
ALL_DEPTHS.update({"repvit_m0_9": ("repvit_m0_9", {}), "RepViT, legacy branches": ("repvit_m1", {"legacy": True})})
ALL_DEPTHS.update({name: (name, FOUR_BLOCKS) for name in ["res2net50_26w_4s", "res2next50", "resnest50d_1s4x24d"]})
ALL_DEPTHS["resnest14d"] = ("resnest14d", {})
ALL_DEPTHS["rdnet_tiny"] = ("rdnet_tiny", {})  # the head's norm kept
ALL_DEPTHS["RDNet with its head norm first"] = ("rdnet_tiny", {"head_norm_first": True})
ALL_DEPTHS["inception_next_atto"] = ("inception_next_atto", {})  # the head's fc1 and norm kept
ALL_DEPTHS.update({name: (name, {}) for name in ["dpn48b", "dpn68"]})
ALL_DEPTHS.update({name: (name, {}) for name in ["ese_vovnet19b_slim", "ese_vovnet19b_slim_dw", "vovnet39a"]})
ALL_DEPTHS.update({name: (name, {}) for name in ["cspnext_tiny", "cspnext_s"]})
ALL_DEPTHS.update({name: (name, {}) for name in ["legacy_seresnet18", "legacy_seresnet50", "legacy_seresnext26_32x4d"]})
ALL_DEPTHS["legacy_senet154"] = ("legacy_senet154", FOUR_BLOCKS)
ALL_DEPTHS.update({name: (name, {}) for name in ["dla34", "dla46_c", "dla46x_c", "dla60_res2net", "dla102"]})
ALL_DEPTHS.update({name: (name, {}) for name in ["repghostnet_050", "repghostnet_130"]})  # the head 1x1 kept
ALL_DEPTHS["lcnetv2_small"] = ("lcnetv2_small", {})  # depthwise conv-norm branches, the head 1x1 kept
# the head's 1x1 in the last stage, its MLP classifier kept
ALL_DEPTHS.update({name: (name, {}) for name in ["efficientvit_b0", "efficientvit_l1"]})
# the final norm in the last stage, the head and distillation head kept
ALL_DEPTHS.update({name: (name, {}) for name in ["swiftformer_xs", "swiftformer_l1"]})
ALL_DEPTHS["pvt_v2_b0"] = ("pvt_v2_b0", {})  # attention's q, kv, reduction and its norm; the stages' norms
ALL_DEPTHS.update({name: (name, {}) for name in ["twins_pcpvt_small", "twins_svt_small"]})  # four lists of modules
ALL_DEPTHS["tiny_vit_5m_224"] = ("tiny_vit_5m_224", {})  # attention biases per offset, the head's norm kept
ALL_DEPTHS["efficientformer_l1"] = ("efficientformer_l1", {})  # attention biases and their (saved) index
ALL_DEPTHS["swin_tiny_patch4_window7_224"] = ("swin_tiny_patch4_window7_224", {})  # bias tables, patch merging, norm
ALL_DEPTHS["swinv2_tiny_window8_256"] = ("swinv2_tiny_window8_256", {})  # bias MLPs, q and v biases, logit scales
# temperatures, two layer scales a block, position projections; small_rw: strided blocks, no biases
ALL_DEPTHS.update({name: (name, {}) for name in ["edgenext_xx_small", "edgenext_small_rw"]})
# the head's stride-64 conv-norm-ReLUs kept, frozen
ALL_DEPTHS.update({name: (name, {}) for name in ["selecsls42b", "selecsls60", "selecsls84"]})
ALL_DEPTHS["swinv2_cr_tiny_ns_224"] = ("swinv2_cr_tiny_ns_224", {})  # bias MLPs per pair, logit scales, stage norms
ALL_DEPTHS.update({name: (name, {}) for name in ["davit_tiny", "davit_base_fl"]})  # position encodings, named blocks
ALL_DEPTHS.update({name: (name, {}) for name in ["mobilevit_xxs", "mobilevitv2_050"]})  # ViT blocks in a ByobNet
# RMS norms, multi-query attention; the fusion adapter kept; the encoder-only class too
ALL_DEPTHS.update({name: (name, {"channel_multiplier": 0.25}) for name in ["mobilenetv5_base", "mobilenetv5_300m_enc"]})
# conv-norms in Residuals (a timm child named "module"), single-head attention; the RepViT head kept
ALL_DEPTHS.update({name: (name, {}) for name in ["iformer_t", "iformer_m_distilled"]})
# MBConvs, group and grid attention with bias tables (TensorFlow's row and column ones, MLPs of offsets: timm's
# modules under timm's names), ConvNeXt blocks, CoAtNet's transformer blocks; the head's norm and MLP kept
# BotNets: relative position tables (pos_embed.height_rel, .width_rel) in ByobNet bottlenecks
ALL_DEPTHS.update({name: (name, {}) for name in ["botnet26t_256", "botnet50ts_256", "eca_botnext26ts_256",
                                                 "sebotnet33ts_256"]})
# lambda layers: the 9x9 position convolution (conv_lambda, a 3-D one in timm) or the offset embeddings (pos_emb)
ALL_DEPTHS.update({name: (name, {}) for name in ["lambda_resnet26t", "lambda_resnet50ts", "lambda_resnet26rpt_256"]})
# halo attention: its relative position tables (pos_embed.height_rel, .width_rel), its q and kv projections; with
# BotNet's attention and lambda layers in the last two
ALL_DEPTHS.update({name: (name, {}) for name in ["halonet26t", "halonet50ts", "halonet_h1", "sehalonet33ts",
                                                 "eca_halonext26ts", "haloregnetz_b", "halo2botnet50ts_256",
                                                 "lamhalobotnet50ts_256"]})
# Hiera: the position embeddings (pos_embed; abswin: pos_embed_win too) on the body under timm's names
ALL_DEPTHS.update({name: (name, {}) for name in ["hiera_tiny_224", "hiera_small_abswin_256"]})
# SAM 2's Hiera: its two position tables (pos_embed, pos_embed_window) on the body; hieradet_small with layer scale
ALL_DEPTHS.update({name: (name, {}) for name in ["sam2_hiera_tiny", "hieradet_small"]})
# CPUBone: 2x2 kernels after timm's zero pad (conv.1), packed-head attention, its unfused form's output projection
ALL_DEPTHS.update({name: (name, {}) for name in ["cpubone_t0", "cpubone_b3"]})
ALL_DEPTHS["CPUBone unfused"] = ("cpubone_nano", {"fused_conv": False, "fused_downsample": False})
ALL_DEPTHS["CPUBone with ungrouped expansions (plain 2x2s)"] = ("cpubone_nano", {"expand_groups": 1})
ALL_DEPTHS["CPUBone upsampling by transposed convolutions"] = ("cpubone_nano", {"attn_upsample": "transpose"})
# LowFormer: transposed convolutions (upsampling.weight: C_in first), with the projection folded in or beside it
ALL_DEPTHS.update({name: (name, {}) for name in ["lowformer_b0", "lowformer_b3", "lowformer_e1"]})
ALL_DEPTHS["LowFormer unfused"] = ("lowformer_b0", {"fused_conv": False})
# GCViT: relative position tables under timm's rel_pos, layer scales (gcvit_base), global blocks' kv projections
ALL_DEPTHS.update({name: (name, {}) for name in ["gcvit_xxtiny", "gcvit_base"]})
ALL_DEPTHS["pvt_v2_b2_li"] = ("pvt_v2_b2_li", {})  # its keys' 1x1 (sr) after the pooling
# MViTv2: pooling kernels shared by the heads (pool_q.weight: one head's), per-head norms, relative position tables
ALL_DEPTHS["mvitv2_tiny"] = ("mvitv2_tiny", {})
ALL_DEPTHS["mvitv2_small_cls"] = ("mvitv2_small_cls", {})  # and its class token
# CoaT-Lite: class tokens, position encodings shared by a stage's blocks (timm's state dict names them at both places)
ALL_DEPTHS["coat_lite_tiny"] = ("coat_lite_tiny", {})
# Visformer: its three stages' position embeddings (pos_embed1..3) on the body under timm's names, attention's qkv
ALL_DEPTHS.update({name: (name, {}) for name in ["visformer_tiny", "visformer_small"]})
# NesT: position embeddings per block of sites (levels.i.pos_embed) in the levels' mirrors, block aggregations
ALL_DEPTHS.update({name: (name, {}) for name in ["nest_tiny", "nest_small_jx"]})
# EfficientFormerV2: attention bias tables and talking heads under timm's names, the attention downsampling's query
ALL_DEPTHS.update({name: (name, {}) for name in ["efficientformerv2_s0", "efficientformerv2_l"]})
ALL_DEPTHS.update({name: (name, {}) for name in ["maxvit_nano_rw_256", "maxvit_tiny_tf_224", "maxxvit_rmlp_nano_rw_256",
                                                 "maxvit_tiny_pm_256", "coatnet_nano_rw_224", "coatnext_nano_rw_224"]})
ALL_DEPTHS.update({name: (name, FOUR_BLOCKS) for name in ["skresnet18", "skresnet50d", "skresnext50_32x4d"]})
ALL_DEPTHS.update({name: (name, {}) for name in ["mixnet_s", "mixnet_xl", "tf_mixnet_m"]})  # mixed convolutions
ALL_DEPTHS.update({name: (name, {}) for name in ["gcresnet33ts", "gcresnext50ts", "gc_efficientnetv2_rw_t"]})  # GCNet
ALL_DEPTHS.update({name: (name, {}) for name in [  # EvoNorm-S0/S0a, FRN with its threshold
    "resnetv2_50d_evos", "resnetv2_50d_frn", "regnetz_b16_evos", "ese_vovnet39b_evos", "test_efficientnet_evos"]})
ALL_DEPTHS["test_efficientnet_ln"] = ("test_efficientnet_ln", {})  # LayerNormAct2d
ALL_DEPTHS.update({name: (name, {}) for name in ["efficientnet_cc_b0_4e", "tf_efficientnet_cc_b1_8e"]})  # CondConv
# aligned Xception: two stride-4 and stride-8 blocks (71), pre-activation (41p), a final ReLU and no-skip block
ALL_DEPTHS.update({name: (name, {}) for name in ["xception41", "xception71", "xception41p"]})
ALL_DEPTHS.update({name: (name, {}) for name in ["hrnet_w18_small", "hrnet_w18_small_v2", "hrnet_w18"]})  # HRNet
ALL_DEPTHS.update({name: (name, {}) for name in ["fastvit_t8", "fastvit_t12", "fastvit_s12"]})  # FastViT
ALL_DEPTHS.update({name: (name, {}) for name in ["regnetv_040", "regnetv_064"]})  # pre-activation RegNets
ALL_DEPTHS["FastViT re-parameterised"] = ("fastvit_s12", {"inference_mode": True})
ALL_DEPTHS.update({name: (name, {}) for name in [  # blur pools (their fixed filters are not in a state dict)
    "resnetblur18", "densenetblur121d", "efficientnet_blur_b0", "mobilenetv4_conv_blur_medium"]})
ALL_DEPTHS.update({name: (name, {}) for name in ["tresnet_m", "tresnet_v2_l"]})  # TResNet: basic blocks, bottlenecks
# a space-to-depth 2x2 convolution, then a depthwise 2x2 'same' (EfficientNet-X and -H)
ALL_DEPTHS.update({name: (name, {}) for name in ["efficientnet_x_b3", "efficientnet_x_b5", "efficientnet_h_b5"]})
ALL_DEPTHS.update({name: (name, {}) for name in ["cs3darknet_focus_s", "cs3darknet_focus_m"]})  # the 6x6 focus stem
ALL_DEPTHS.update({name: (name, FOUR_BLOCKS) for name in ["tresnet_l", "tresnet_xl"]})
ALL_DEPTHS["ConvNeXt with head norm first"] = ("convnext_atto", {"head_norm_first": True})
ALL_DEPTHS["Bottleneck ResNet with 11 blocks in a stage (ResNet-101/152/200)"] = ("resnet50", {"layers": (1, 11, 1, 1)})
ALL_DEPTHS["ConvNeXt, linear MLP, 11 blocks in a stage (ConvNeXt-S/B/L)"] = (
    "convnext_atto", {"conv_mlp": False, "depths": (1, 1, 11, 1)})
ALL_DEPTHS["EfficientNet with width and depth multipliers (B2)"] = ("efficientnet_b2", {})
# TensorFlow ports ('same' padding)
ALL_DEPTHS.update({name: (name, {}) for name in ["tf_efficientnet_b0", "tf_efficientnetv2_b0", "tf_mobilenetv3_small_100"]})
# timm's resnetv2 module: batch norm with the plain, deep and tiered stems, BiT (GroupNorm, weight
# standardisation), GroupNorm, and without pre-activation
ALL_DEPTHS.update({name: (name, {}) for name in ["resnetv2_18", "resnetv2_50x1_bit"]})
ALL_DEPTHS.update({f"{name} (a block a stage)": (name, FOUR_BLOCKS)
                   for name in ["resnetv2_50", "resnetv2_50d", "resnetv2_50t", "resnetv2_50d_gn"]})
ALL_DEPTHS["ResNetV2 without pre-activation (Bottleneck)"] = ("resnetv2_50", {"preact": False, **FOUR_BLOCKS})

# timm's byobnet and cspnet modules: CLIP's attention-pool head and resnet50_mlp's MLP head are kept
ALL_DEPTHS.update({name: (name, {}) for name in [
    "repvgg_a0", "mobileone_s0", "mobileone_s4", "gernet_s", "eca_resnext26ts", "regnetz_b16", "resnet50_clip",
    "resnet50_mlp", "cspresnet50", "cspdarknet53", "darknet17", "darknetaa53", "cs3darknet_s", "cs3sedarknet_xdw"]})
# timm's nfnet module: convolution gains, GammaAct
ALL_DEPTHS.update({name: (name, {}) for name in ["nf_resnet26", "nf_regnet_b0", "test_nfnet"]})
ALL_DEPTHS["NFNet with GammaAct, a second 3x3"] = ("test_nfnet", {"gamma_in_act": True, "extra_conv": True})
ALL_DEPTHS["DeepMind's NFNet port (skip-init gain, 'same' padding)"] = ("dm_nfnet_f0", {})


@pytest.mark.parametrize("model", ALL_DEPTHS)
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_timm_state_dict_round_trip_is_exact(timm_models, model, engine):
    name, kwargs = ALL_DEPTHS[model]
    timm_model = timm_models(name, **kwargs)  # randomised norms; shared, so only copied here
    want = timm_model.state_dict()
    encoder = engine_class(engine).from_timm(copy.deepcopy(timm_model))
    got = encoder.timm_state_dict()
    assert got.keys() == want.keys()  # the same keys and tensors: loads strictly into the timm model
    for key in want:
        assert torch.equal(got[key], want[key]), key
    # and back: timm weights loaded into the encoder replace every tensor it had
    with torch.no_grad():
        for value in encoder.state_dict().values():
            value.fill_(float("nan") if value.is_floating_point() else -1)
    encoder.load_timm_state_dict(want)
    for key, value in encoder.timm_state_dict().items():
        assert torch.equal(value, want[key]), key


@needs_minkowski
def test_me_kernel_layout_is_volume_by_in_by_out():
    from spark_sparse.encoders.sparse_engine import dense_to_me_kernel, me_to_dense_kernel

    weight = torch.randn(8, 5, 3, 3)
    kernel = dense_to_me_kernel(weight)
    assert kernel.shape == (9, 5, 8)
    assert torch.equal(me_to_dense_kernel(kernel, (3, 3)), weight)
    assert dense_to_me_kernel(torch.randn(8, 5, 1, 1)).shape == (1, 5, 8)


@needs_minkowski
def test_encoder_reports_stage_channels():
    assert create_encoder("resnet18").channels == [64, 128, 256, 512]
    assert create_encoder("resnet50", "dense_masked").channels == [256, 512, 1024, 2048]


@needs_minkowski
def test_unconvertible_module_is_named_with_its_path():
    SparseEncoder = engine_class("sparse")
    model = timm.create_model("resnet18", pretrained=False, num_classes=0, drop_block_rate=0.1)
    with pytest.raises(ConversionError, match=r"cannot convert DropBlock2d at 'layer3\.0\.drop_block': DropBlock drops"):
        SparseEncoder.from_timm(model)
    model = timm.create_model("resnext50_32x4d", pretrained=False, num_classes=0)
    with pytest.raises(ConversionError, match=r"'layer1\.0\.conv2': grouped convolution \(32 groups\) with conv='minkowski'"):
        SparseEncoder.from_timm(model, conv="minkowski")
    with pytest.raises(ConversionError, match="expected a timm model of a supported family"):
        SparseEncoder.from_timm(torch.nn.Conv2d(3, 3, 3))
    with pytest.raises(ValueError, match="unknown timm model 'resnet_nope'"):
        create_encoder("resnet_nope")
    with pytest.raises(ValueError, match="unknown engine"):
        create_encoder("resnet18", "quantum")


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_efficientnet_mobilenet_and_fastvit_models_without_an_exact_twin_are_refused_by_path(engine):
    engine = engine_class(engine)
    # MobileNetV4's hybrid attention with query strides: its output's bilinear upsampling crosses patches
    model = timm.create_model("mobilenetv4_hybrid_medium", pretrained=False, num_classes=0)
    attention = model.blocks[2][4].attn
    attention.query_strides, attention.has_query_strides = (2, 2), True
    with pytest.raises(ConversionError, match=r"cannot convert MultiQueryAttention2d at 'blocks\.2\.4\.attn': query "
                                              r"strides \(2, 2\)"):
        engine.from_timm(model)
    # MobileCLIP's larger image towers run a fifth stage, to stride 64
    with pytest.raises(ConversionError, match=r"FastVit: stage strides \[4, 8, 16, 32, 64\] are not 4, 8, 16, 32"):
        engine.from_timm(timm.create_model("fastvit_mci3", pretrained=False, num_classes=0))


@pytest.mark.parametrize("kwargs,message", [
    ({"patch_drop_rate": 0.1}, r"Hiera's patch dropout \(patch_drop_rate\) drops mask units at random"),
    ({"mask_unit_size": (16, 16)}, r"Hiera with mask units \(16, 16\), .*: only timm's .* make the mask unit the "
                                   r"mask's 32-pixel patch"),
])
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_hiera_whose_mask_unit_is_not_the_masks_patch_or_that_drops_patches_is_refused(engine, kwargs, message):
    with pytest.raises(ConversionError, match=message):
        engine_class(engine).from_timm(timm.create_model("hiera_tiny_224", pretrained=False, num_classes=0, **kwargs))


@pytest.mark.parametrize("kwargs,geometry", [
    ({"output_padding": 1}, r"kernel \(4, 4\), stride \(2, 2\), padding \(1, 1\), output padding \(1, 1\), "
                            r"dilation \(1, 1\), 1 groups"),
    ({"kernel_size": 3}, r"kernel \(3, 3\), stride \(2, 2\), padding \(1, 1\), output padding \(0, 0\), "
                         r"dilation \(1, 1\), 1 groups"),
], ids=["an output padding", "a kernel that does not make stride x stride sites of each"])
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_transposed_convolution_off_the_masks_grid_is_refused(engine, kwargs, geometry):
    """LowFormer's (and CPUBone's, on request) transposed convolutions make each coarse site stride x
    stride fine ones; one that makes more or fewer would move sites off the patches' grid."""
    model = timm.create_model("cpubone_nano", pretrained=False, num_classes=0, attn_upsample="transpose")
    attention = model.stages[2][1].total[0][0].main[1]
    old = attention.upsampling
    attention.upsampling = torch.nn.ConvTranspose2d(old.in_channels, old.out_channels, **{
        "kernel_size": 4, "stride": 2, "padding": 1, **kwargs})
    path = r"stages\.2\.1\.total\.0\.0\.main\.1\.upsampling"
    with pytest.raises(ConversionError, match=rf"^cannot convert ConvTranspose2d at '{path}': {geometry} \(only "
                                              r"square kernels of 2 \* padding \+ stride, one group or depthwise, "
                                              r"keep the mask's grid\)$"):
        engine_class(engine).from_timm(model)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_byobnet_and_cspnet_without_an_exact_twin_are_refused_by_path(engine):
    engine = engine_class(engine)
    refused = {
        ("bat_resnext26ts", ()): r"BatNonLocalAttn at 'stages\.0\.0\.attn'",
        ("resnet33ts", (("drop_block_rate", 0.1),)): r"DropBlock2d at 'stages\.2\.0\.conv2_kxk\.bn\.drop': DropBlock",
    }
    for (name, kwargs), message in refused.items():
        with pytest.raises(ConversionError, match=f"cannot convert {message}"):
            engine.from_timm(timm.create_model(name, pretrained=False, num_classes=0, **dict(kwargs)))
    for name in ("repvgg_a0", "cspdarknet53", "xception41"):  # dilated: not masked on a 32-pixel grid
        with pytest.raises(ConversionError, match=r"stage strides \[4, 8, 16\] are not 4, 8, 16, 32"):
            engine.from_timm(timm.create_model(name, pretrained=False, num_classes=0, output_stride=16))


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_nfnets_without_an_exact_twin_are_refused_by_path(engine):
    engine = engine_class(engine)
    with pytest.raises(ConversionError, match=r"cannot convert GammaAct at 'stem\.act2': activation 'sigmoid' does not keep zero"):
        engine.from_timm(timm.create_model("test_nfnet", pretrained=False, num_classes=0, gamma_in_act=True,
                                           act_layer="sigmoid"))
    with pytest.raises(ConversionError, match=r"NormFreeNet: 4 stages at strides \[4, 8, 16, 16\]"):
        engine.from_timm(timm.create_model("test_nfnet", pretrained=False, num_classes=0, output_stride=16))


@needs_minkowski
def test_a_focus_stem_needs_the_patch_convolutions():
    # a 6x6 stride-2 convolution (padding 2) reads from 2 sites before to 3 after its own: off-centre
    model = timm.create_model("cs3darknet_focus_s", pretrained=False, num_classes=0)
    with pytest.raises(ConversionError, match=r"Conv2d at 'stem\.conv1\.conv': conv='minkowski' centres its kernels; "
                                              r"a window off the centre"):
        engine_class("sparse").from_timm(model, conv="minkowski")


@needs_minkowski
def test_efficientnet_head_conv_ends_the_features_and_mobilenet_keeps_its_head():
    # EfficientNet's 1x1 head convolution runs before pooling: it is pretrained with the stages
    enc = create_encoder("efficientnet_b0", "sparse")
    assert enc.channels == [24, 40, 112, 1280]
    assert any(name.startswith("body.conv_head") for name, _ in enc.named_parameters())
    # MobileNetV3's runs after pooling: kept for strict loading, never trained
    enc = create_encoder("mobilenetv3_large_100", "sparse")
    assert enc.channels == [24, 40, 112, 960]
    assert "conv_head.weight" in enc.timm_state_dict()
    assert not any(name.startswith("body.conv_head") for name, _ in enc.named_parameters())


@needs_minkowski
def test_drop_path_is_mirrored():
    enc = create_encoder("resnet50", "sparse", drop_path_rate=0.1)
    probs = [m.drop_prob for m in enc.modules() if type(m).__name__ == "SparseDropPath"]
    # timm spreads the rate linearly over the 16 blocks; the first gets 0 and no drop-path
    assert len(probs) == 15 and max(probs) == pytest.approx(0.1)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_resnet_without_an_exact_twin_is_refused_by_path_and_reason(engine):
    engine = engine_class(engine)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0, drop_block_rate=0.1)
    with pytest.raises(ConversionError, match=r"DropBlock2d at 'layer3\.0\.drop_block': DropBlock drops square "
                                              r"regions .*; set drop_block_rate to 0$"):
        engine.from_timm(model)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_convnext_without_an_exact_twin_is_refused_by_path(engine):
    engine = engine_class(engine)
    with pytest.raises(ConversionError, match=r"cannot convert SimpleNorm2d at 'stem\.1'"):
        engine.from_timm(timm.create_model("convnext_zepto_rms", pretrained=False, num_classes=0))
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=0)
    model.set_grad_checkpointing(True)
    with pytest.raises(ConversionError, match="gradient checkpointing"):
        engine.from_timm(model)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize("name, where", [("test_mambaout", r"MambaOutStage at 'stages\.0'"),
                                         ("rexnet_100", r"RexNet at 'features'"),
                                         ("ghostnet_050", r"GhostNet at 'blocks'"),
                                         ("hgnetv2_b0", r"HighPerfGpuStage at 'stages\.0'"),
                                         ("starnet_s050", r"StarNet at 'stages'"),
                                         ("fasternet_t0", r"Block at 'stages\.0'"),
                                         ("repvit_m0_9", r"RepVit at 'stages'"),
                                         ("rdnet_tiny", r"RDNet at 'dense_stages'"),
                                         ("inception_next_atto", r"MetaNeXtStage at 'stages\.0'"),
                                         ("ese_vovnet19b_slim", r"OsaStage at 'stages\.0'"),
                                         ("cspnext_tiny", r"CspNext at 'stages'"),
                                         ("repghostnet_050", r"RepGhostNet at 'blocks'"),
                                         ("lcnetv2_small", r"LCNetV2 at 'stages'"),
                                         ("efficientvit_b0", r"EfficientVit at 'stages'"),
                                         ("swiftformer_xs", r"Stage at 'stages\.0'"),
                                         ("pvt_v2_b0", r"PyramidVisionTransformerStage at 'stages\.0'"),
                                         ("tiny_vit_5m_224", r"TinyVit at 'stages'"),
                                         ("efficientformer_l1", r"EfficientFormerStage at 'stages\.0'"),
                                         ("swin_tiny_patch4_window7_224", r"SwinTransformerStage at 'layers\.0'"),
                                         ("swinv2_tiny_window8_256", r"SwinTransformerV2Stage at 'layers\.0'"),
                                         ("edgenext_xx_small", r"EdgeNeXtStage at 'stages\.0'"),
                                         ("swinv2_cr_tiny_224", r"SwinTransformerV2CrStage at 'stages\.0'"),
                                         ("davit_tiny", r"DaVit at 'stages'"),
                                         ("mobilenetv5_base", r"MobileNetV5 at 'blocks'"),
                                         ("iformer_t", r"StageBlock at 'stages\.0'"),
                                         ("maxvit_nano_rw_256", r"MaxxVitStage at 'stages\.0'"),
                                         ("xception41p", r"XceptionAligned at 'blocks'"),
                                         ("fastvit_t8", r"FastVitStage at 'stages\.0'"),
                                         ("tresnet_m", r"TResNet at 'body'")])
def test_gradient_checkpointing_is_refused_by_path(engine, name, where):
    model = timm.create_model(name, pretrained=False, num_classes=0)
    model.set_grad_checkpointing(True)
    with pytest.raises(ConversionError, match=f"{where}: gradient checkpointing"):
        engine_class(engine).from_timm(model)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_reparameterised_ghostnetv3_round_trips_and_trains_every_parameter(engine):
    # timm's re-parameterisation leaves its blocks' parameters detached: the encoder's are trainable
    model = timm.models.reparameterize_model(timm.create_model("ghostnetv3_050", pretrained=False, num_classes=0))
    assert not any(p.requires_grad for p in model.blocks[1].parameters())
    encoder = engine_class(engine).from_timm(copy.deepcopy(model))
    frozen = [name for name, p in encoder.named_parameters() if not p.requires_grad]
    assert frozen == [name for name in frozen if name.startswith("body.conv_head.")]  # kept, never run
    want = model.state_dict()
    got = encoder.timm_state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in want)


@pytest.mark.parametrize("name, channels", [("densenet121", [256, 512, 1024, 1024]),
                                           ("hrnet_w18_small", [128, 256, 512, 2048])])  # HRNet checks its own keys
def test_a_drop_path_rate_for_a_model_without_stochastic_depth_is_refused_in_one_line(name, channels):
    assert create_encoder(name, "dense_masked", drop_path_rate=0.0).channels == channels
    with pytest.raises(ValueError, match=rf"^timm model '{name}' takes no drop_path_rate \(got 0\.1\); "
                                         r"leave it at its default$"):
        create_encoder(name, "dense_masked", drop_path_rate=0.1)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_densenets_without_an_exact_twin_are_refused_by_path(engine):
    engine = engine_class(engine)
    refused = {
        ("densenet121", "memory_efficient", True): r"DenseLayer at 'features\.denseblock1\.denselayer1': memory-efficient",
        ("densenet121", "proj_drop_rate", 0.1): r"DenseLayer at 'features\.denseblock1\.denselayer1': dropout p=0\.1",
    }
    for (name, key, value), message in refused.items():
        model = timm.create_model(name, pretrained=False, num_classes=0, block_config=(1, 1, 1, 1), **{key: value})
        with pytest.raises(ConversionError, match=f"cannot convert {message}"):
            engine.from_timm(model)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize("name, kwargs, where", [
    ("pvt_v2_b0", {"attn_drop_rate": 0.1}, r"stages\.0\.blocks\.0\.attn\.attn_drop"),
    ("twins_pcpvt_small", {"pos_drop_rate": 0.1}, r"pos_drops\.0"),  # after each patch embedding
    ("twins_svt_small", {"attn_drop_rate": 0.1}, r"blocks\.0\.0\.attn\.attn_drop"),  # within groups of sites
    ("tiny_vit_5m_224", {"proj_drop_rate": 0.1}, r"stages\.1\.blocks\.0\.mlp\.drop1"),
    ("efficientformer_l1", {"proj_drop_rate": 0.1}, r"stages\.0\.blocks\.0\.mlp\.drop"),
    ("swin_tiny_patch4_window7_224", {"attn_drop_rate": 0.1}, r"layers\.0\.blocks\.0\.attn\.attn_drop"),
    ("swinv2_tiny_window8_256", {"attn_drop_rate": 0.1}, r"layers\.0\.blocks\.0\.attn\.attn_drop"),
    ("swinv2_cr_tiny_224", {"attn_drop_rate": 0.1}, r"stages\.0\.blocks\.0\.attn\.attn_drop"),
    ("test_maxvit", {"transformer_attn_drop": 0.1}, r"stages\.0\.blocks\.0\.attn_block\.attn\.attn_drop"),
    ("coat_lite_tiny", {"proj_drop_rate": 0.1}, r"serial_blocks1\.0\.factoratt_crpe\.proj_drop"),
    ("visformer_tiny", {"proj_drop_rate": 0.1}, r"stage1\.0\.mlp\.drop1"),
    ("visformer_tiny", {"pos_drop_rate": 0.1}, r"pos_drop"),  # after each position embedding
    ("nest_tiny", {"attn_drop_rate": 0.1}, r"levels\.0\.transformer_encoder\.0\.attn\.attn_drop")])
def test_a_dropout_is_refused_by_path(engine, name, kwargs, where):
    # no engine mirrors a dropout's random mask
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    with pytest.raises(ConversionError, match=f"^cannot convert Dropout at '{where}': dropout p=0\\.1$"):
        engine_class(engine).from_timm(model)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_coat_with_parallel_blocks_is_refused_in_one_line(engine):
    model = timm.create_model("coat_tiny", pretrained=False, num_classes=0, img_size=64)
    with pytest.raises(ConversionError, match=r"^CoaT with parallel blocks \(coat_tiny, coat_mini, coat_small: the "
                                              r"scales mixed by bilinear resizing\) is not mirrored; CoaT-Lite's "
                                              r"serial blocks are$"):
        engine_class(engine).from_timm(model)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_davits_groups_must_be_square(engine):
    model = timm.create_model("davit_tiny", pretrained=False, num_classes=0, window_size=(7, 8))
    with pytest.raises(ConversionError, match=r"^cannot convert WindowAttention at 'stages\.0\.blocks\.0\.0\.attn': "
                                              r"groups of \(7, 8\) sites \(not square\)$"):
        engine_class(engine).from_timm(model)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_maxvits_groups_must_be_square_and_its_grids_whole(engine):
    """timm sizes MaxViT's groups and grids from the input size it builds for (a 64x128 one: 2x4
    sites), and asserts whole grids at every stride; the engines refuse both in one line."""
    model = timm.create_model("test_maxvit", pretrained=False, num_classes=0, img_size=(64, 128))
    with pytest.raises(ConversionError, match=r"^cannot convert PartitionAttentionCl at 'stages\.0\.blocks\.0\."
                                              r"attn_block': groups of \(2, 4\) sites \(not square\)$"):
        engine_class(engine).from_timm(model)
    encoder = engine_class(engine).from_timm(timm.create_model("test_maxvit", pretrained=False, num_classes=0,
                                                               img_size=64))
    with pytest.raises(ValueError, match=r"^MaxViT's grid attention spreads groups of 2x2 sites over each map, which "
                                         r"needs a multiple of 2 sites a side, got 3x3; use an input size that is a "
                                         r"multiple of 64 \(the model's own\)$"):
        encoder(torch.randn(1, 3, 96, 96), torch.ones(1, 1, 3, 3, dtype=torch.bool))


@needs_minkowski
def test_convnext_drop_path_and_head_norm_are_mirrored():
    enc = create_encoder("convnext_tiny", "sparse", drop_path_rate=0.2)
    probs = [m.drop_prob for m in enc.modules() if type(m).__name__ == "SparseDropPath"]
    assert len(probs) == 17 and max(probs) == pytest.approx(0.2)  # 18 blocks, the first gets 0
    assert enc.channels == [96, 192, 384, 768]
    # the classifier head's norm is kept for strict loading, but is no parameter to train
    assert "head.norm.weight" in enc.timm_state_dict()
    assert not any(name.startswith("body.head") for name, _ in enc.named_parameters())


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "mobilenetv3_small_100",
                                  "repvgg_a0", "cs3darknet_s"])
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_encoders_deep_copy_and_pickle_to_the_same_function(timm_models, name, engine):
    # EMA teachers and whole-module checkpoints copy or pickle the encoder
    encoder = engine_class(engine).from_timm(copy.deepcopy(timm_models(name))).eval()
    images, active = torch.randn(2, 3, 64, 96), random_active(2, (2, 3), 0.5, torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    with torch.no_grad():
        want = encoder.dense_features(images, active)
    for twin in (copy.deepcopy(encoder), pickle.loads(pickle.dumps(encoder))):
        with torch.no_grad():
            for got, w in zip(twin.dense_features(images, active), want):
                assert torch.equal(got, w)
        # a copy also trains, on its own: gradients and running statistics of its own
        twin.train()
        twin.dense_features(images, active)[-1].square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in twin.parameters())
        moved = [k for k, v in twin.state_dict().items() if k.endswith("running_mean") and not torch.equal(v, state[k])]
        assert len(moved) == sum(k.endswith("running_mean") for k in state)  # every batch norm's (none in ConvNeXt)
    assert all(p.grad is None for p in encoder.parameters())
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_resnetv2_without_an_exact_twin_is_refused_by_path(engine):
    engine = engine_class(engine)
    # EvoNorm-B0's batch statistics and running variance, and FRN with its own activation: no twins
    for norm in (timm.layers.EvoNorm2dB0, timm.layers.FilterResponseNormAct2d):
        with pytest.raises(ConversionError, match=f"cannot convert {norm.__name__} at 'stem\\.norm1': EvoNorm-B0 "):
            engine.from_timm(timm.create_model("resnetv2_50d", pretrained=False, num_classes=0, norm_layer=norm))
    with pytest.raises(ConversionError, match=r"stage strides \[4, 8, 16, 16\] are not 4, 8, 16, 32"):
        engine.from_timm(timm.create_model("resnetv2_50", pretrained=False, num_classes=0, output_stride=16))
    model = timm.create_model("resnetv2_18", pretrained=False, num_classes=0)
    model.set_grad_checkpointing(True)
    with pytest.raises(ConversionError, match=r"ResNetStage at 'stages\.0': gradient checkpointing"):
        engine.from_timm(model)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_an_average_pooling_that_does_not_keep_the_mask_grid_is_refused(engine):
    # a 3x3 stride-2 one with ceil_mode keeps an odd map's last window past the edge
    model = timm.create_model("resnest14d", pretrained=False, num_classes=0)
    model.layer2[0].avd_last.ceil_mode = True
    with pytest.raises(ConversionError, match=r"AvgPool2d at 'layer2\.0\.avd_last': kernel 3, stride 2, padding 1"):
        engine_class(engine).from_timm(model)


@needs_minkowski
def test_a_3x3_average_pooling_is_refused_with_minkowskis_own_pooling():
    with pytest.raises(ConversionError, match=r"AvgPool2d at 'layer1\.0\.pool': a 3x3 average pooling with "
                                              r"conv='minkowski' \(it divides by the present sites"):
        engine_class("sparse").from_timm("res2net50_26w_4s", conv="minkowski")


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_max_pooling_that_does_not_keep_the_mask_grid_is_refused(engine):
    # VoVNet's unpadded 3x3 stride-2 pooling keeps an even map's last window only with ceil_mode
    model = timm.create_model("ese_vovnet19b_slim_dw", pretrained=False, num_classes=0)
    model.stages[1].pool.ceil_mode = False
    with pytest.raises(ConversionError, match=r"MaxPool2d at 'stages\.1\.pool': kernel 3, stride 2, padding 0, "
                                              r"dilation 1, ceil_mode False"):
        engine_class(engine).from_timm(model)


@needs_minkowski
def test_a_dilated_convolution_is_refused_with_minkowskis_own_convolution():
    with pytest.raises(ConversionError, match=r"Conv2d at 'layer1\.0\.conv1\.paths\.1\.conv': dilated convolution "
                                              r"\(kernel \(3, 3\), stride \(1, 1\), padding \(2, 2\), dilation \(2, 2\)\) "
                                              r"with conv='minkowski'"):
        engine_class("sparse").from_timm("skresnet18", conv="minkowski")


@needs_minkowski
def test_vovnets_unpadded_pooling_is_refused_with_minkowskis_own_pooling():
    with pytest.raises(ConversionError, match=r"MaxPool2d at 'stages\.1\.pool': conv='minkowski' centres its "
                                              r"pooling windows"):
        engine_class("sparse").from_timm("vovnet39a", conv="minkowski")


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_an_hrnet_upsampling_off_the_grid_or_without_the_classification_head_is_refused(engine):
    engine = engine_class(engine)
    model = timm.create_model("hrnet_w18_small", pretrained=False, num_classes=0)
    model.stage2[0].fuse_layers[0][1][2] = torch.nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
    with pytest.raises(ConversionError, match=r"cannot convert Upsample at 'stage2\.0\.fuse_layers\.0\.1\.2': mode "
                                              r"'bilinear', scale factor 2\.0, size None, align_corners True \(only "
                                              r"nearest or bilinear without aligned corners, by a power of two"):
        engine.from_timm(model)
    # timm's 'incre' head has no joins, its '' head no widening: the features are the joined maps
    with pytest.raises(ConversionError, match=r"^HighResolutionNet with head 'incre': the encoder's features are the "
                                              r"classification head's joined maps"):
        engine.from_timm(timm.create_model("hrnet_w18_small", pretrained=False, num_classes=0, head="incre"))


@needs_minkowski
def test_hrnets_upsampling_is_refused_with_minkowskis_own_convolutions():
    with pytest.raises(ConversionError, match=r"Upsample at 'stage2\.0\.fuse_layers\.0\.1\.2': conv='minkowski' has "
                                              r"no upsampling of patch rows"):
        engine_class("sparse").from_timm("hrnet_w18_small", conv="minkowski")


@needs_minkowski
def test_blur_pools_and_space_to_depth_are_refused_with_minkowskis_own_convolutions():
    from spark_sparse.encoders.sparse_engine import convert_leaf
    with pytest.raises(ConversionError, match=r"BlurPool2d at 'layer2\.0\.aa': conv='minkowski' has no blur pooling"):
        convert_leaf(BlurPool2d(8), "layer2.0.aa", conv="minkowski")
    with pytest.raises(ConversionError, match=r"SpaceToDepth at 'body\.s2d': conv='minkowski' has no space to depth"):
        convert_leaf(SpaceToDepth(), "body.s2d", conv="minkowski")


@needs_minkowski
def test_hgnet_keeps_timm_names_and_its_head_convolution():
    # the learned scalar affines keep timm's names; the head's 1x1 after pooling is kept, not trained
    enc = create_encoder("hgnetv2_b0", "sparse")
    assert enc.channels == [64, 256, 512, 1024]
    state = enc.timm_state_dict()
    assert {"stem.stem1.lab.scale", "stem.stem2a.conv.weight", "head.last_conv.0.weight"} <= state.keys()
    assert not any(name.startswith("body.head.") for name, _ in enc.named_parameters())
    # the 2x2 stem convolutions read one site more below and right: ours only
    with pytest.raises(ConversionError,
                       match=r"Conv2dSame at 'stem\.stem2a\.conv': conv='minkowski' centres its kernels"):
        engine_class("sparse").from_timm("hgnetv2_b0", conv="minkowski")


@needs_minkowski
def test_resnetv2_final_norm_ends_the_features_and_bit_keeps_timm_names():
    # forward_features ends with the final norm (and ReLU): it ends the last stage and is trained
    enc = create_encoder("resnetv2_50x1_bit", "sparse")
    assert enc.channels == [256, 512, 1024, 2048]
    names = {name for name, _ in enc.named_parameters()}
    assert {"body.norm.weight", "body.norm.bias"} <= names
    # weight-standardised convolutions keep timm's `weight` (standardised at every forward, never stored so)
    state = enc.timm_state_dict()
    assert "stem.conv.weight" in state and "stages.0.blocks.0.downsample.conv.weight" in state
    with pytest.raises(ConversionError, match=r"StdConv2d at 'stem\.conv': weight-standardised convolution "
                                              r"with conv='minkowski'"):
        engine_class("sparse").from_timm("resnetv2_50x1_bit", conv="minkowski")
