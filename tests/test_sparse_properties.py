"""What "genuinely sparse" means, as properties of every family's sparse encoder.

* Canvas invariance: an image embedded (on the 32-pixel grid) in a larger canvas whose extra
  patches are all hidden gives the same features at its sites. A dense global statistic over
  masked zeros (a squeeze-excitation mean over the whole map), or any leak of the hidden area,
  would break it.
* Batch independence (eval mode): an image's features do not depend on the other images.
  ConvNeXt-V2's own sparse GRN, with statistics over the whole batch, would break it. Nets
  without batch norm (GroupNorm: BiT) are batch-independent in train mode too.

``pytest --device cuda`` checks both on the GPU.
"""

import pytest

from .conftest import HAS_MINKOWSKI, WITHOUT_MINKOWSKI

if not HAS_MINKOWSKI:  # this module's subject is the sparse engine
    pytest.skip(WITHOUT_MINKOWSKI, allow_module_level=True)

import copy

import torch

from spark_sparse import MaskedDenseEncoder, SparseEncoder, random_active

MODELS = {name: (name, {}) for name in ["resnet18", "seresnet18", "ecaresnet26t", "seresnext26d_32x4d",
                                        "convnext_atto", "convnextv2_atto", "regnety_002", "efficientnet_b0",
                                        "mobilenetv3_small_100", "mobilenetv2_050", "mobilenetv4_conv_small"]}
MODELS["resnet26 with SiLU"] = ("resnet26", {"act_layer": "silu"})  # max pooling after a negative-valued act
MODELS["anti-aliased resnetaa50d"] = ("resnetaa50d", {"layers": (1, 1, 1, 1)})  # 2x2 average pooling
MODELS["resnet50_gn"] = ("resnet50_gn", {"layers": (1, 1, 1, 1)})  # GroupNorm in place of batch norm
# TensorFlow 'same' padding: the off-centre window at a block's edge reads what the dense padded
# convolution of the masked map reads (the next block, or zeros where it is hidden)
MODELS.update({name: (name, {}) for name in ["tf_efficientnet_b0", "tf_efficientnetv2_b0", "tf_mobilenetv3_small_100"]})
# pre-activation ResNets; BiT's GroupNorm per image and its stem pooling where hidden sites read zero
MODELS.update({name: (name, {}) for name in ["resnetv2_18d", "resnetv2_50x1_bit"]})

# timm's byobnet and cspnet modules: re-parameterisable branches, ECA, a stride-1 stem and split stages
MODELS.update({name: (name, {}) for name in ["repvgg_a0", "mobileone_s0", "eca_resnext26ts", "cspdarknet53"]})
# timm's nfnet module: no norm at all (batch-independent in train mode too)
MODELS["test_nfnet"] = ("test_nfnet", {})
MODELS["test_mambaout"] = ("test_mambaout", {})  # layer norms; gated blocks
MODELS["densenet121"] = ("densenet121", {"block_config": (2, 2, 2, 2), "growth_rate": 8})  # concatenations
MODELS["rexnet_100"] = ("rexnet_100", {})  # partial residuals, SE with a batch norm
MODELS["ghostnet_050"] = ("ghostnet_050", {})  # ghost modules
MODELS["vgg11_bn"] = ("vgg11_bn", {"mlp_ratio": 1 / 64})  # stride-1 convolutions, 2x2 max poolings
# 2x2 convolutions and pooling padded below and right, scalar affines that move zero; ESE attention
MODELS.update({name: (name, {}) for name in ["hgnetv2_b0", "hgnet_tiny"]})
MODELS["starnet_s050"] = ("starnet_s050", {})  # the star: a product of two branches' rows
MODELS["convformer_s18"] = ("convformer_s18", {})  # StarReLU's bias at hidden sites, bias-free layer norms
MODELS["poolformer_s12"] = ("poolformer_s12", {})  # the mean of each window's visible sites, one-group norms
# focal modulation: the context's mean over each image's visible sites (timm's over the map) is its global level
MODELS["focalnet_tiny_lrf"] = ("focalnet_tiny_lrf", {"drop_path_rate": 0.0})
MODELS["lcnetv2_small"] = ("lcnetv2_small", {})  # depthwise 5x5, 3x3 and 1x1 conv-norms summed, SE
MODELS["efficientvit_b0"] = ("efficientvit_b0", {})  # linear attention: sums over each image's visible tokens
MODELS["swiftformer_xs"] = ("swiftformer_xs", {})  # additive attention: a query pooled over each image's visible tokens
MODELS["caformer_s18"] = ("caformer_s18", {})  # self-attention: an image's visible tokens attend to each other only
MODELS["fastvit_sa12"] = ("fastvit_sa12", {})  # conditional positional encodings, self-attention after batch norms
MODELS["mobilenetv4_hybrid_medium"] = ("mobilenetv4_hybrid_medium", {})  # multi-query attention, keys a stride coarser
MODELS["pvt_v2_b0"] = ("pvt_v2_b0", {})  # queries at every stride attend to keys made one per visible patch
MODELS["fasternet_t0"] = ("fasternet_t0", {})  # partial convolutions: split, 3x3 on a quarter, concatenation
MODELS["repvit_m0_9"] = ("repvit_m0_9", {})  # depthwise kxk + depthwise 1x1 + identity, then a norm
# 3x3 average poolings counting hidden zeros, split attention over each image's visible sites
MODELS["res2net50_26w_4s"] = ("res2net50_26w_4s", {"layers": (1, 1, 1, 1)})
MODELS["resnest14d"] = ("resnest14d", {})
MODELS["rdnet_tiny"] = ("rdnet_tiny", {})  # dense stages of layer-norm blocks, effective SE
MODELS["inception_next_atto"] = ("inception_next_atto", {})  # 1 x 11 and 11 x 1 depthwise bands
MODELS["dpn48b"] = ("dpn48b", {})  # dual paths: a residual and a dense path in one tensor
# one-shot aggregation, effective SE, unpadded ceil-mode max poolings reaching into the next patch
MODELS["ese_vovnet19b_slim"] = ("ese_vovnet19b_slim", {"block_per_stage": (1, 2, 1, 1)})
MODELS["cspnext_tiny"] = ("cspnext_tiny", {})  # 5x5, 9x9 and 13x13 stride-1 max poolings at stride 32
MODELS["legacy_seresnet18"] = ("legacy_seresnet18", {"layers": (1, 1, 1, 1)})  # SE, the ceil-mode stem pooling
MODELS["dla46_c"] = ("dla46_c", {"shortcut_root": True})  # aggregation trees, convolutions on the pixels
MODELS["repghostnet_050"] = ("repghostnet_050", {})  # a depthwise 3x3 and a norm of its input, summed
MODELS["skresnet18"] = ("skresnet18", {"layers": (1, 1, 1, 2)})  # dilated 3x3s (two patches away at stride 32)
MODELS["tf_mixnet_s"] = ("tf_mixnet_s", {})  # mixed kernels: 'same'-padded 7x7, 9x9 at stride 2 on the canvas
MODELS["gc_efficientnetv2_rw_t"] = ("gc_efficientnetv2_rw_t", {})  # a softmax over each image's visible sites
# EvoNorm's group deviations, FRN's channel RMS: per image, over its visible sites, batch statistics none
MODELS.update({name: (name, {"layers": (1, 1, 1, 1)}) for name in ["resnetv2_50d_evos", "resnetv2_50d_frn"]})
MODELS["efficientnet_cc_b0_4e"] = ("efficientnet_cc_b0_4e", {})  # CondConv: routed by each image's visible mean
MODELS["xception41p"] = ("xception41p", {})  # pre-activation separable convolutions, strided 1x1 shortcuts
MODELS["hrnet_w18_small"] = ("hrnet_w18_small", {})  # branches fused across strides: nearest upsampling in each patch
MODELS["fastvit_t8"] = ("fastvit_t8", {})  # RepMixer; a grouped 7x7 at stride 2 on the canvas at stride 16
MODELS["regnetv_040"] = ("regnetv_040", {})  # pre-activation: a norm of the plain stem convolution first
MODELS["test_efficientnet_ln"] = ("test_efficientnet_ln", {})  # layer norms with their activations
MODELS["resnetblur18"] = ("resnetblur18", {"layers": (1, 1, 1, 1)})  # blur pools padded by reflection
MODELS["mobilenetv4_conv_blur_medium"] = ("mobilenetv4_conv_blur_medium", {})  # zero-padded blur pools
# a reflection padding reads an image's own second row and column at its top and left border, where
# a larger canvas would put hidden sites: there the image keeps the canvas's top-left corner
MODELS["tresnet_m"] = ("tresnet_m", {"layers": (1, 1, 1, 1)})  # space to depth, reflected blur pools
# Twins-SVT's, TinyViT's, EfficientFormer's and Swin's groups of sites start at the map's top-left corner: there the
# image keeps it too
MODELS["twins_svt_small"] = ("twins_svt_small", {})  # attention within groups of sites, PVT's between them
MODELS["twins_pcpvt_small"] = ("twins_pcpvt_small", {})  # PVT's attention, position encoding generators
MODELS["tiny_vit_5m_224"] = ("tiny_vit_5m_224", {})  # attention within groups of sites, relative-offset biases
MODELS["efficientformer_l1"] = ("efficientformer_l1", {})  # attention with offset biases on the 7x7 grid
# attention within shifted and unshifted groups of sites with relative-offset biases, patch merging
MODELS["swin_tiny_patch4_window7_224"] = ("swin_tiny_patch4_window7_224", {"depths": (2, 2, 2, 2), "drop_path_rate": 0.0})
# and with cosine attention, a bias MLP, post-norms
MODELS["swinv2_tiny_window8_256"] = ("swinv2_tiny_window8_256", {"depths": (2, 2, 2, 2), "drop_path_rate": 0.0})
MODELS["selecsls42b"] = ("selecsls42b", {})  # concatenated 3x3 chains, the stage's first output beside each block
# attention between channels over each image's visible tokens; EdgeNeXt's Fourier position encoding is
# absolute over the whole map (an image in a larger canvas is another input, in timm too): off here, on below
MODELS["edgenext_xx_small"] = ("edgenext_xx_small", {"use_pos_emb": (False,) * 4})
# and Swin V2-CR's: a bias MLP per pair of sites, norms ending each stage (its _ns models)
MODELS["swinv2_cr_tiny_ns_224"] = ("swinv2_cr_tiny_ns_224", {"depths": (2, 2, 2, 2)})
# DaViT's attention within groups of 7x7 sites and between channels; Florence-2's groups of 12x12, its channel
# attention scaled by each image's visible tokens (timm's by the map's)
MODELS["davit_tiny"] = ("davit_tiny", {"depths": (1, 1, 1, 1)})
MODELS["davit_base_fl"] = ("davit_base_fl", {"depths": (1, 1, 1, 1)})
AT_THE_CORNER = {"resnetblur18", "tresnet_m", "twins_svt_small", "tiny_vit_5m_224", "efficientformer_l1",
                 "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "swinv2_cr_tiny_ns_224", "davit_tiny",
                 "davit_base_fl", "test_coatnet"}
# MobileViT's attention groups the sites by their offset in 2x2 blocks, at stride 32 too (v1: softmax, v2:
# separable attention): its maps need whole blocks, and its image keeps the canvas's grid of 64-pixel blocks
MODELS.update({name: (name, {}) for name in ["mobilevit_xxs", "mobilevitv2_050"]})
# GhostNetV2's and V3's DFC gate pools 2x2 cells of sites (of patches at stride 32) and upsamples them back:
# its image keeps the canvas's grid of 64-pixel blocks too, at a size whose maps are even (timm's pooling
# leaves out an odd map's last row and column)
MODELS.update({name: (name, {}) for name in ["ghostnetv2_100", "ghostnetv3_050"]})
MODELS["mobilenetv5_base"] = ("mobilenetv5_base", {"channel_multiplier": 0.25})  # RMS norms, multi-query attention
MODELS["iformer_t"] = ("iformer_t", {})  # single-head attention over visible tokens, gated by a sigmoid
# CoAtNet's attention over the whole map of the size timm builds the model for (64 px: the image's), a bias per pair
# of sites; here within groups of that size from the canvas's corner, where the image keeps it. MaxViT's grid
# attention spreads each group over the whole map it is given (in timm too): an image's groups change with the
# canvas around it, so MaxViT keeps batch independence alone (its groups of sites are CoAtNet's and Swin's kind)
MODELS.update({name: (name, {"img_size": 64}) for name in ["test_coatnet", "test_maxvit"]})
CANVAS_DEPENDENT = {"test_maxvit"}
# BotNet's attention over each image's visible sites with logits from relative offsets, built for the canvas's size
# (its tables reach that map; timm runs no other)
MODELS["botnet26t_256"] = ("botnet26t_256", {"img_size": (160, 192)})
# lambda layers: each image's content lambda over its visible sites; position lambdas of a 9x9 convolution (hidden
# sites reading zero, as the padding does) or of embeddings of offsets (built for the canvas's size, as BotNet's)
MODELS["lambda_resnet26t"] = ("lambda_resnet26t", {})
MODELS["lambda_resnet26rpt_256"] = ("lambda_resnet26rpt_256", {"img_size": (160, 192)})
# Hiera's position embedding is absolute over the map of the model's own size (timm's too): batch independence
# alone, at its size
MODELS["hiera_tiny_224"] = ("hiera_tiny_224", {"img_size": (64, 96)})
CANVAS_DEPENDENT.add("hiera_tiny_224")
# CPUBone's attention: one token per 32-pixel patch at stride 16 (repeated over its sites), one per site at 32;
# 2x2 kernels reading the sites above and left (hidden ones and the canvas read zero, as timm's padding does)
MODELS["cpubone_t0"] = ("cpubone_t0", {"proj_drop_rate": 0.0})
# LowFormer's transposed convolutions reach into the neighbouring patches (hidden ones and the canvas give nothing)
MODELS["lowformer_b0"] = ("lowformer_b0", {})
# GCViT's groups and global tokens are fractions of the input size it is made for (timm's too): batch independence
# alone, at its size
MODELS["gcvit_xxtiny"] = ("gcvit_xxtiny", {"img_size": 96})
CANVAS_DEPENDENT.add("gcvit_xxtiny")
# MViTv2's relative position tables are indexed from the far corner of the map of its own size (timm's too): batch
# independence alone, at its size
MODELS["mvitv2_tiny"] = ("mvitv2_tiny", {"img_size": 64})
MODELS["mvitv2_small_cls"] = ("mvitv2_small_cls", {"img_size": 64, "drop_path_rate": 0.1})  # its class token
CANVAS_DEPENDENT.update({"mvitv2_tiny", "mvitv2_small_cls"})
# EfficientFormerV2's attention biases are made for the map of its own size, and its bilinear upsampling clamps at
# the canvas's border (timm's too): batch independence alone, at its size
MODELS["efficientformerv2_s0"] = ("efficientformerv2_s0", {"img_size": 96})
CANVAS_DEPENDENT.add("efficientformerv2_s0")
# halo attention's blocks are the canvas's, and so is the zero padding whose keys count beyond its border (timm's
# too): batch independence alone, at its size (blocks of 4x4 sites for small images)
MODELS["halonet26t"] = ("halonet26t", {"self_attn_kwargs": {"block_size": 4, "halo_size": 2}})
CANVAS_DEPENDENT.add("halonet26t")
# SAM 2's Hiera resizes its position embedding to the canvas's map (timm's too): batch independence alone
MODELS["sam2_hiera_tiny"] = ("sam2_hiera_tiny", {"window_spec": (8, 4, 4, 2)})
CANVAS_DEPENDENT.add("sam2_hiera_tiny")
# CoaT-Lite's class tokens meet each image's visible tokens alone; its patch embeddings are made for its own size, but
# the encoders' run at any (timm's asserts): canvas invariance too
MODELS["coat_lite_tiny"] = ("coat_lite_tiny", {"img_size": 64, "drop_path_rate": 0.1})
# Visformer's position embeddings are absolute over the maps of the model's own size (timm's too): batch independence
# alone, at its size, for its three scales (strides 8, 16, 32)
MODELS["visformer_tiny"] = ("visformer_tiny", {"img_size": (64, 96)})
CANVAS_DEPENDENT.add("visformer_tiny")
# NesT's too (and its blocks are the canvas's), at 16-pixel patches: batch independence alone, at its size
MODELS["nest_tiny"] = ("nest_tiny", {"img_size": 64})
CANVAS_DEPENDENT.add("nest_tiny")
ENGINES = {"sparse": SparseEncoder, "dense_masked": MaskedDenseEncoder}
# the image's size, the canvas's and where the image lies in it (pixels)
PLACEMENT = ((64, 96), (160, 192), (64, 32))
PLACEMENTS = {name: ((64, 128), (192, 256), (64, 64))
              for name in ["mobilevit_xxs", "mobilevitv2_050", "ghostnetv2_100", "ghostnetv3_050"]}
PLACEMENTS.update({
              "test_coatnet": ((64, 64), (128, 192), (0, 0)),
              "test_maxvit": ((64, 128), (128, 256), (0, 0)),
              "gcvit_xxtiny": ((96, 96), (192, 192), (0, 0)),  # (no canvas test: the batch test's size)
              "mvitv2_tiny": ((64, 64), (128, 128), (0, 0)),
              "mvitv2_small_cls": ((64, 64), (128, 128), (0, 0)),
              "efficientformerv2_s0": ((96, 96), (192, 192), (0, 0)),
              "halonet26t": ((128, 128), (256, 256), (0, 0)),
              "sam2_hiera_tiny": ((64, 128), (128, 256), (0, 0)),
              "coat_lite_tiny": ((64, 64), (128, 192), (32, 64)),
              "nest_tiny": ((64, 64), (128, 128), (0, 0))})
# the properties are the sparse engine's, checked for every net; the dense-masked engine equals it
# wherever both run (test_encoder_equivalence.py), and keeps them on its own for a net of each norm
# kind (batch norm, ConvNeXt-V2's layer norm and GRN, GroupNorm)
DENSE_MASKED_TOO = {"resnet18", "convnextv2_atto", "resnetv2_50x1_bit"}
NETS_AND_ENGINES = [pytest.param(name, engine, id=f"{name}-{key}") for name in MODELS
                    for key, engine in ENGINES.items() if key == "sparse" or name in DENSE_MASKED_TOO]


def encoder(timm_models, engine, model: str, train: bool, device: torch.device):
    name, kwargs = MODELS[model]
    return engine.from_timm(copy.deepcopy(timm_models(name, **kwargs))).double().train(train).to(device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name,engine", [p for p in NETS_AND_ENGINES if p.values[0] not in CANVAS_DEPENDENT])
def test_an_image_in_a_larger_hidden_canvas_keeps_its_features(timm_models, name, engine, train, device):
    g = torch.Generator().manual_seed(0)
    (h, w), (canvas_h, canvas_w), (top, left) = PLACEMENTS.get(name, PLACEMENT)
    images = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    active = random_active(2, (h // 32, w // 32), 0.5, g)
    canvas = torch.randn(2, 3, canvas_h, canvas_w, generator=g, dtype=torch.float64)  # hidden: anything
    if name in AT_THE_CORNER:
        top, left = 0, 0
    canvas[:, :, top:top + h, left:left + w] = images
    canvas_active = torch.zeros(2, 1, canvas_h // 32, canvas_w // 32, dtype=torch.bool)
    canvas_active[:, :, top // 32:(top + h) // 32, left // 32:(left + w) // 32] = active
    enc = encoder(timm_models, engine, name, train, device)
    with torch.no_grad():  # masks on the CPU, as in training; train mode's draws (Swin V2-CR's bias dropout) alike
        torch.manual_seed(0)
        alone = enc.dense_features(images.to(device), active)
        torch.manual_seed(0)
        embedded = enc.dense_features(canvas.to(device), canvas_active)
    for stride, a, e in zip(enc.strides, alone, embedded):
        rows, cols = slice(top // stride, (top + h) // stride), slice(left // stride, (left + w) // stride)
        assert rel_err(e[:, :, rows, cols], a) < 1e-12, f"stride {stride}"
        rest = e.clone()
        rest[:, :, rows, cols] = 0
        assert torch.all(rest == 0)


@pytest.mark.parametrize("name,engine", NETS_AND_ENGINES)
def test_an_images_features_do_not_depend_on_the_rest_of_the_batch(timm_models, name, engine, device):
    g = torch.Generator().manual_seed(1)
    (h, w), _, _ = PLACEMENTS.get(name, PLACEMENT)
    images = torch.randn(3, 3, h, w, generator=g, dtype=torch.float64).to(device)
    enc = encoder(timm_models, engine, name, train=False, device=device)
    active = random_active(3, (h // enc.stride, w // enc.stride), 0.5, g)  # the mask's patch: NesT's 16
    assert_the_first_images_features_are_its_own(enc, images, active)


def assert_the_first_images_features_are_its_own(enc, images, active) -> None:
    """Image 0's features with image 1, with image 2, and alone: the same (float64 rounding)."""
    with torch.no_grad():
        with_one = enc.dense_features(images[[0, 1]], active[[0, 1]])
        with_other = enc.dense_features(images[[0, 2]], active[[0, 2]])
        alone = enc.dense_features(images[:1], active[:1])
    for a, b, c in zip(with_one, with_other, alone):
        assert rel_err(a[0], c[0]) < 1e-12 and rel_err(b[0], c[0]) < 1e-12


# nets with no batch norm: group norms take each image's statistics over its own visible sites;
# NFNets have no norm at all, MambaOut and EdgeNeXt only per-site layer norms
GROUP_NORM_MODELS = {"resnetv2_50x1_bit": ("resnetv2_50x1_bit", {}),
                     "resnetv2_50d_gn": ("resnetv2_50d_gn", {"layers": (1, 1, 1, 1)}),
                     "resnet50_gn": ("resnet50_gn", {"layers": (1, 1, 1, 1)}),
                     "test_nfnet": ("test_nfnet", {}),
                     "test_mambaout": ("test_mambaout", {}),
                     "edgenext_xx_small": ("edgenext_xx_small", {})}  # layer norms, its position encoding


@pytest.mark.parametrize("engine", ENGINES.values(), ids=ENGINES.keys())
@pytest.mark.parametrize("model", GROUP_NORM_MODELS)
def test_a_group_norm_nets_train_mode_features_do_not_depend_on_the_rest_of_the_batch(timm_models, model, engine):
    """Unlike batch norm, a group norm (or no norm, NFNet) has no batch statistics: in train mode
    too an image's features are its own, whichever images share its batch (and however many of
    their patches are visible)."""
    name, kwargs = GROUP_NORM_MODELS[model]
    g = torch.Generator().manual_seed(2)
    images = torch.randn(3, 3, 64, 96, generator=g, dtype=torch.float64)
    active = random_active(3, (2, 3), 0.5, g)
    active[2] = True  # a fully visible neighbour
    enc = engine.from_timm(copy.deepcopy(timm_models(name, **kwargs))).double().train()
    assert_the_first_images_features_are_its_own(enc, images, active)
