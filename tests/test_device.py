"""The sparse engine on a GPU without a CUDA build of MinkowskiEngine (issue 19).

Features live on the images' device; the mask, MinkowskiEngine's coordinate manager (its CPU
build) and the building of the index tables stay on the CPU, and the tables are copied to the
features' device once per batch. What these tests establish:

* every operation of a forward and backward pass runs on the features' device alone, none mixes
  in a CPU tensor, none makes the CPU read a device tensor (which on a GPU waits for every queued
  kernel), and backward copies nothing. On a machine without a GPU the features live on
  PyTorch's ``meta`` device, which tracks devices as CUDA does but holds no numbers: this
  proves the placement of every tensor and that no step reads device data back; that the
  numbers come out right on a GPU is what ``pytest --device cuda`` checks (below and in
  test_encoder_equivalence.py and test_sparse_properties.py), which needs one.
* MinkowskiEngine hashes no coordinates for our operators: a map is inserted only when its
  coordinates are read, and then holds exactly the sites the tables describe.
* the three models of the issue's table (ResNet-50, ConvNeXt-T, EfficientNet-B0) compute on
  ``--device cuda`` exactly what the dense-masked engine computes there (float64: features 1e-9,
  gradients 1e-6, as in test_encoder_equivalence.py, which covers their block types on the CPU).
"""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from .conftest import HAS_MINKOWSKI, WITHOUT_MINKOWSKI, make_batch

if not HAS_MINKOWSKI:  # this module's subject is the sparse engine
    pytest.skip(WITHOUT_MINKOWSKI, allow_module_level=True)

from spark_sparse import SparseEncoder, random_active
from spark_sparse.encoders.masked_engine import convert_leaf
from spark_sparse.encoders.masked_tensor import MaskedTensor
from spark_sparse.model.graphed import GraphedStep
from spark_sparse.model.spark import SparK
from spark_sparse.sparse import ME
from spark_sparse.sparse.depthwise import DepthwiseConvolution
from spark_sparse.sparse.patch_conv import PatchConvolution
from spark_sparse.sparse.patch_sites import BatchCoordinates, PatchSites
from spark_sparse.sparse.sparsify import sparsify

from .device_audit import DeviceAudit
from .test_encoder_equivalence import VARIANT_SIZE, assert_train_steps_equal, encoders, rel_err

# every operator of the engine: max pooling and tiles/offset GEMMs (resnet26d, with avg-down and
# a deep stem), grouped convolutions and SE (seresnext26d), patchify, depthwise on tiles and on
# the canvas, layer norm, GRN (convnextv2), strided depthwise and SiLU (efficientnet); drop path;
# TensorFlow's shifted windows (tf_efficientnet), group norm, weight standardisation and the
# zero-padded stem pooling (a GroupNorm ResNetV2), grouped and fused 1x1 + norm branches (repvgg),
# channel split and concatenation (cs3darknet), universal inverted residuals (MobileNetV4),
# 2x2 average-pool anti-aliasing (resnetaa50d), a gated product of rows and layer scale (MambaOut),
# dense blocks' running concatenation (densenet121), partial residuals and SE with a norm (rexnet),
# stride-1 convolutions and 2x2 max pooling (vgg), 2x2 stride-1 convolutions and pooling padded
# below and right, scalar affines and many-way concatenations (hgnetv2), the star product (starnet),
# partial convolutions (fasternet), depthwise re-parameterisable branches summed (repvit), 3x3
# average poolings and split attention (res2net, resnest), layer-norm dense stages (rdnet), band
# depthwise convolutions (inception_next), dual paths (dpn), unpadded ceil-mode max poolings (vovnet),
# stride-1 max poolings on the canvas (cspnext), legacy SE blocks (senet),
# aggregation trees (dla), re-parameterisable ghost modules (repghost),
# dilated convolutions on tiles, offset or window GEMMs and the canvas (sknet), mixed convolutions (mixnet),
# global context attention (gcresnet), EvoNorm and filter response norms (resnetv2 _evos, _frn),
# CondConv experts (efficientnet_cc), separable convolutions after ReLUs or norm-ReLUs (xception_aligned),
# parallel branches fused through strided convolutions and nearest upsampling (hrnet), RepMixer and
# grouped 7x7 patch embeddings on the canvas (fastvit), StarReLU and residual scales after a 7x7
# stride-4 stem padded 2 (metaformer's ConvFormer), the mean of each window's visible sites (PoolFormer),
# gated depthwise levels and a global level per image (focalnet), depthwise conv-norm branches (lcnetv2),
# linear attention over each image's tokens on the canvas (efficientvit_mit), additive attention's sums
# over each image's rows (swiftformer), self-attention among each image's visible rows (CAFormer), queries
# attending to keys one per visible patch (pvt_v2), attention within groups of sites on the canvas (twins), with
# biases per relative offset (tiny_vit, efficientformer), in shifted groups (swin_transformer), cosine attention
# (swin_transformer_v2), attention between channels and a Fourier position encoding made on the device (edgenext),
# blocks passing [x, skip] lists, a head at stride 64 kept (selecsls), a bias MLP per pair with its dropout
# (swin_transformer_v2_cr), attention between channels with a per-image scale (davit), attention within groups of
# sites two apart (mobilevit), RMS norms (mobilenetv5), a sigmoid-gated single-head attention (iformer), grids of
# sites spread over the map and bias tables run on the device (maxxvit), relative-offset logits (byoanet),
# DFC attention gates with masked statistics over pooled cells (ghostnet v2, v3 with summed branches)
AUDITED = {name: {"drop_path_rate": 0.1} for name in [
    "resnet26d", "seresnext26d_32x4d", "convnextv2_atto", "efficientnet_b0", "tf_efficientnet_b0",
    "resnetv2_50d_gn", "repvgg_a0", "cs3darknet_s", "mobilenetv4_conv_small", "resnetaa50d", "test_mambaout",
    "rexnet_100", "hgnetv2_b0", "starnet_s050", "fasternet_t0", "resnest14d",
    "rdnet_tiny", "inception_next_atto"]}
AUDITED["res2net50_26w_4s"] = {"layers": (1, 1, 1, 1), "drop_path_rate": 0.1}
AUDITED["densenet121"] = {"block_config": (2, 2, 2, 2)}  # DenseNet, VGG and RepViT have no drop path
AUDITED["vgg11_bn"] = {"mlp_ratio": 1 / 64}
AUDITED["repvit_m0_9"] = {}
AUDITED["dpn48b"] = {}
AUDITED["ese_vovnet19b_slim"] = {"block_per_stage": (1, 2, 1, 1), "drop_path_rate": 0.1}
AUDITED["cspnext_tiny"] = {"drop_path_rate": 0.1}
AUDITED["legacy_seresnext26_32x4d"] = {"layers": (1, 1, 1, 1)}
AUDITED["dla60_res2net"] = {"levels": (1, 1, 1, 1, 1, 1)}
AUDITED["repghostnet_050"] = {}
AUDITED.update({name: {} for name in ["ghostnetv2_100", "ghostnetv3_050"]})  # GhostNets have no drop path
AUDITED["skresnext50_32x4d"] = {"layers": (1, 1, 1, 2), "drop_path_rate": 0.1}
AUDITED["tf_mixnet_m"] = {"drop_path_rate": 0.1}
AUDITED["gcresnet33ts"] = {"drop_path_rate": 0.1}
AUDITED.update({name: {"layers": (1, 1, 1, 1)} for name in ["resnetv2_50d_evos", "resnetv2_50d_frn"]})
AUDITED["tf_efficientnet_cc_b0_4e"] = {"drop_path_rate": 0.1}
AUDITED.update({name: {"drop_path_rate": 0.1} for name in ["xception41", "xception41p"]})
AUDITED["hrnet_w18_small"] = {}  # no stochastic depth
AUDITED["fastvit_t8"] = {"drop_path_rate": 0.1}
AUDITED["regnetv_040"] = {"drop_path_rate": 0.1}
AUDITED["test_efficientnet_ln"] = {"drop_path_rate": 0.1}
AUDITED["resnetblur18"] = {"layers": (1, 1, 1, 1), "drop_path_rate": 0.1}
AUDITED["tresnet_m"] = {"layers": (1, 1, 1, 1), "drop_path_rate": 0.1}
AUDITED["efficientnet_x_b3"] = {"drop_path_rate": 0.1}
AUDITED["convformer_s18"] = {"drop_path_rate": 0.1}
AUDITED["poolformer_s12"] = {"drop_path_rate": 0.1}
AUDITED["focalnet_tiny_srf"] = {"drop_path_rate": 0.1}
AUDITED["lcnetv2_small"] = {}  # no stochastic depth
AUDITED["efficientvit_b0"] = {}
AUDITED["swiftformer_xs"] = {"drop_path_rate": 0.1}
AUDITED["caformer_s18"] = {"drop_path_rate": 0.1}
AUDITED["fastvit_sa12"] = {"drop_path_rate": 0.1}
AUDITED["mobilenetv4_hybrid_medium"] = {"drop_path_rate": 0.1}
AUDITED["pvt_v2_b0"] = {"drop_path_rate": 0.1}
AUDITED["twins_svt_small"] = {"drop_path_rate": 0.1}
AUDITED["tiny_vit_5m_224"] = {"drop_path_rate": 0.1}
AUDITED["efficientformer_l1"] = {"drop_path_rate": 0.1}
AUDITED["swin_tiny_patch4_window7_224"] = {"depths": (2, 2, 2, 2), "drop_path_rate": 0.1}
AUDITED["swinv2_tiny_window8_256"] = {"depths": (2, 2, 2, 2), "drop_path_rate": 0.1}
AUDITED["edgenext_xx_small"] = {"drop_path_rate": 0.1}
AUDITED["selecsls42b"] = {}  # no stochastic depth
AUDITED["swinv2_cr_tiny_ns_224"] = {"depths": (2, 2, 2, 2), "drop_path_rate": 0.1}
AUDITED["davit_base_fl"] = {"depths": (1, 1, 1, 1), "drop_path_rate": 0.1}
AUDITED.update({name: {"drop_path_rate": 0.1} for name in ["mobilevit_xxs", "mobilevitv2_050"]})
AUDITED["mobilenetv5_base"] = {"channel_multiplier": 0.25, "drop_path_rate": 0.1}
AUDITED["iformer_t"] = {"drop_path_rate": 0.1}
AUDITED.update({name: {"img_size": 64, "drop_path_rate": 0.1} for name in ["test_maxvit", "test_coatnet"]})
AUDITED["botnet26t_256"] = {"img_size": (128, 160), "drop_path_rate": 0.1}
AUDITED["lambda_resnet26t"] = {"drop_path_rate": 0.1}
AUDITED["hiera_tiny_224"] = {"img_size": (128, 160), "drop_path_rate": 0.1}
AUDITED["cpubone_t0"] = {"drop_path_rate": 0.1}  # and its MLPs' dropout (0.1)
AUDITED["lowformer_b0"] = {"drop_path_rate": 0.1, "proj_drop_rate": 0.1}
AUDITED["gcvit_xxtiny"] = {"img_size": 96, "drop_path_rate": 0.1}
AUDITED["mvitv2_tiny"] = {"img_size": 64, "drop_path_rate": 0.1}
AUDITED["mvitv2_small_cls"] = {"img_size": 64, "drop_path_rate": 0.1}
AUDITED["halonet26t"] = {"self_attn_kwargs": {"block_size": 4, "halo_size": 2}, "drop_path_rate": 0.1}
AUDITED["sam2_hiera_tiny"] = {"window_spec": (8, 4, 4, 2), "drop_path_rate": 0.1}
AUDITED["efficientformerv2_s0"] = {"img_size": 96, "drop_path_rate": 0.1}
AUDITED["coat_lite_tiny"] = {"img_size": 64, "drop_path_rate": 0.1}
AUDITED["visformer_tiny"] = {"img_size": (128, 160), "drop_path_rate": 0.1}
AUDITED["nest_tiny"] = {"img_size": 64, "drop_path_rate": 0.1}
AUDITED["pvt_v2_b2_li"] = {"depths": (1, 1, 1, 1), "embed_dims": (16, 32, 48, 64), "num_heads": (1, 2, 3, 4),
                           "drop_path_rate": 0.1}
AUDIT_SIZES = {"mobilevit_xxs": (128, 192), "mobilevitv2_050": (128, 192)}  # whole 2x2 blocks of sites at stride 32
AUDIT_SIZES["pvt_v2_b2_li"] = (224, 224)  # its keys' 7x7 cells, one per patch
AUDIT_SIZES["gcvit_xxtiny"] = (96, 96)  # groups of 3x3 sites across the patches, one global token per patch
AUDIT_SIZES["halonet26t"] = (128, 128)  # whole blocks of 4x4 sites at stride 32
AUDIT_SIZES["sam2_hiera_tiny"] = (64, 128)  # whole windows of 2x2 sites at stride 32
AUDIT_SIZES["mvitv2_tiny"] = (64, 64)  # relative position tables of its own map
AUDIT_SIZES["mvitv2_small_cls"] = (64, 64)
AUDIT_SIZES["efficientformerv2_s0"] = (96, 96)  # attention biases of its own maps
AUDIT_SIZES["coat_lite_tiny"] = (64, 64)  # patch embeddings of its own size
AUDIT_SIZES["nest_tiny"] = (64, 64)  # position embeddings of its own size (16-pixel patches: a 4x4 grid)
AUDIT_SIZES["test_maxvit"] = (128, 192)  # its groups and grids (of 2x2 sites: built for 64 px) whole at every stride


def audit_device(device: torch.device) -> torch.device:
    """The device the audit runs on: the GPU under ``--device cuda``, else ``meta``."""
    return device if device.type == "cuda" else torch.device("meta")


@pytest.mark.parametrize("name", AUDITED)
def test_every_operation_runs_on_the_features_device_and_none_waits_for_it(timm_models, name, device):
    where = audit_device(device)
    model = copy.deepcopy(timm_models(name, **AUDITED[name]))
    encoder = SparseEncoder.from_timm(model).train().to(where)
    images, active = make_batch(AUDIT_SIZES.get(name, (128, 160)), "ratio0.6", batch=4,  # 4x5: every tile shape
                                patch=encoder.stride)
    images = images.to(where)
    forward, backward = DeviceAudit(), DeviceAudit()
    with forward:
        feats = encoder.dense_features(images, active)
        loss = sum(f.sum() for f in feats)
    with backward:
        loss.backward()
    assert all(f.device.type == where.type for f in feats)
    for audit in (forward, backward):
        assert not audit.mixed, f"operations mixing devices: {dict(audit.mixed)}"
        assert not audit.host_reads, f"operations reading {where.type} tensors on the host: {dict(audit.host_reads)}"
    assert forward.copies, "the tables never reached the features' device"
    assert not backward.copies, f"backward copied: {dict(backward.copies)} (tables are copied once, in forward)"


@pytest.mark.parametrize("densify_norm", ["bn", "ln"])
def test_a_whole_spark_step_runs_on_the_features_device_and_none_waits_for_it(timm_models, densify_norm, device):
    """Encoder, densify (each scale's visible sites made from the CPU mask and copied), decoder and
    loss: what a pretraining step queues on the GPU before the run layer reads its loss."""
    where = audit_device(device)
    encoder = SparseEncoder.from_timm(copy.deepcopy(timm_models("resnet18")))
    model = SparK(encoder, decoder_width=64, densify_norm=densify_norm).train().to(where)
    images, active = make_batch((128, 160), "ratio0.6", batch=4)
    forward, backward = DeviceAudit(), DeviceAudit()
    with forward:
        out = model(images.to(where), active)
    with backward:
        out["loss"].backward()
    assert out["loss"].device.type == where.type and out["active"].device.type == where.type
    for audit in (forward, backward):
        assert not audit.mixed, f"operations mixing devices: {dict(audit.mixed)}"
        assert not audit.host_reads, f"operations reading {where.type} tensors on the host: {dict(audit.host_reads)}"


def test_a_step_whose_mask_was_planned_ahead_only_queues_the_devices_work(timm_models, device):
    """Pretraining plans each step's mask while the GPU runs the step before (``SparK.plan`` with
    the previous plan): the step itself then builds no table and copies nothing to the device,
    in forward or backward; the CPU only queues kernels."""
    where = audit_device(device)
    encoder = SparseEncoder.from_timm(copy.deepcopy(timm_models("resnet18")))
    model = SparK(encoder, decoder_width=64).train().to(where)
    images, active = make_batch((128, 160), "ratio0.6", batch=4)
    images = images.to(where)
    before = model.plan(random_active(4, (4, 5), 0.6, torch.Generator().manual_seed(1)), where)
    model(images, before)["loss"].backward()
    plan = model.plan(active, where, like=before)
    built = plan.encoder.sites.tables()
    forward, backward = DeviceAudit(), DeviceAudit()
    with forward:
        loss = model(images, plan)["loss"]
    with backward:
        loss.backward()
    for audit in (forward, backward):
        assert not audit.copies, f"copied to the device in the step: {dict(audit.copies)}"
        assert not audit.mixed and not audit.host_reads
    assert plan.encoder.sites.tables() == built, "a table was built in the step"


@pytest.mark.parametrize("stride", [1, 2])
def test_off_the_cpu_a_convolution_over_small_blocks_queues_a_few_operations_whatever_its_kernel(stride, device):
    """Off the CPU, k x k convolutions over blocks smaller than a tile run as window GEMMs: their
    forward and backward queue the same few operations for a 3x3 kernel as for a 7x7 one,
    where offset GEMMs (the CPU's path) queue a few per kernel offset. On a GPU every operation
    is a launch the CPU pays for, about what a small kernel costs the GPU to run."""
    where = audit_device(device)
    images, active = make_batch((64, 96), "ratio0.6", batch=3)
    x = sparsify(images.to(where), active)  # blocks of 32x32 sites
    queued = {}
    for k in (3, 7):
        for path in ("windows", "offsets"):
            conv = PatchConvolution(3, 8, kernel_size=k, stride=stride, dimension=2).to(where)
            conv.tile_min_sites = 10**6  # 32 sites a side: a small block for this test
            conv.small_block_path = None if path == "windows" else path
            feats = x.F.detach().requires_grad_()
            audit = DeviceAudit()
            with audit:
                out = conv(ME.SparseTensor(feats, coordinate_map_key=x.coordinate_map_key,
                                           coordinate_manager=x.coordinate_manager))
                out.F.sum().backward()
            queued[k, path] = sum(audit.queued.values())
    # (with the loss's sum and its backward: 15 kernels when written)
    assert queued[3, "windows"] == queued[7, "windows"] <= 20, queued
    assert queued[3, "offsets"] >= 3 * 9 and queued[7, "offsets"] >= 3 * 49, queued


@pytest.mark.parametrize("path", ["tiles", "canvas"])
def test_off_the_cpu_a_depthwise_convolutions_bias_queues_nothing_of_its_own(path, device):
    """ConvNeXt's 7x7 depthwise convolutions add their bias in the convolution itself and its
    backward sums the bias's gradient with the others: with a bias or without, as many operations."""
    where = audit_device(device)
    images, active = make_batch((64, 96), "ratio0.6", batch=3)
    x = sparsify(images.to(where), active)
    queued = {}
    for bias in (True, False):
        conv = DepthwiseConvolution(3, 7, bias=bias).to(where)
        conv.tile_min_sites = 1 if path == "tiles" else 10**6
        audit = DeviceAudit()
        for counted in (False, True):  # the batch's tables made by the first pass
            conv.zero_grad(set_to_none=True)  # (no gradient accumulated in the counted pass)
            feats = x.F.detach().requires_grad_()
            with audit if counted else contextlib.nullcontext():
                out = conv(ME.SparseTensor(feats, coordinate_map_key=x.coordinate_map_key,
                                           coordinate_manager=x.coordinate_manager))
                out.F.sum().backward()
        queued[bias] = sum(audit.queued.values())
    assert queued[True] == queued[False], queued


@pytest.mark.parametrize("grid, batch, ratio", [((7, 7), 6, 0.6), ((2, 3), 3, 0.5), ((4, 5), 2, 0.0)])
def test_a_tile_table_holds_the_row_of_every_site_around_each_patch(grid, batch, ratio, device):
    """At stride s, a patch's tile lists the rows of the ``size`` x ``size`` sites from ``start``
    sites before its corner, N (one past the last row) where a site is hidden or outside the image;
    gathers read ``present_rows`` (a row that exists, everywhere), halos are the positions outside
    the patch. A GPU makes the table from parts copied to it, a CPU from the same parts (meta has
    no numbers: on it, the CPU's)."""
    where = device if device.type == "cuda" else torch.device("cpu")
    active = random_active(batch, grid, ratio, torch.Generator().manual_seed(0))
    visible = active.reshape(-1).nonzero()[:, 0]
    gh, gw = grid
    patches = torch.stack([visible // (gh * gw), visible // gw % gh, visible % gw], 1)
    sites = PatchSites(BatchCoordinates(), patches, 32, grid, batch, where)
    # every tile the engine uses: stems (7x7/2 at stride 1, 3x3/2 pooling), 3x3 and 5x5, strided
    # and not, EfficientNet's 5x5/2, a tile inside the patch (1x1/2) and the widest halo
    for stride, start, size in [(1, -3, 37), (2, -1, 17), (4, -1, 10), (4, 0, 7), (4, -1, 9), (8, -2, 8),
                                (8, -1, 5), (16, 0, 1), (16, -1, 3), (32, -1, 3), (2, -16, 48)]:
        tile = sites.tile(stride, start, size)
        s, n = sites.sites_per_side(stride), sites.num_rows(stride)
        # the expected rows, from the sites' coordinates on a canvas with a border of absent sites
        canvas = torch.full((batch, gh * s + 2 * s, gw * s + 2 * s), n, dtype=torch.int32)
        c = sites.coordinates(stride).long()
        canvas[c[:, 0], c[:, 1] // stride + s, c[:, 2] // stride + s] = torch.arange(n, dtype=torch.int32)
        steps = torch.arange(start, start + size) + s
        b, y, x = patches[:, 0].view(-1, 1, 1), patches[:, 1:2] * s + steps, patches[:, 2:3] * s + steps
        want = canvas[b, y.view(-1, size, 1), x.view(-1, 1, size)].view(-1)
        inside = (steps >= s) & (steps < 2 * s)
        halo = (~(inside.view(-1, 1) & inside)).view(-1).repeat(len(patches)).nonzero()[:, 0]

        rows, present, absent = tile.rows.cpu(), tile.present_rows.cpu(), tile.absent.cpu().view(-1)
        assert (tile.start, tile.size, tile.sites) == (start, size, s)
        assert rows.dtype == torch.int32 and torch.equal(rows, want)
        assert torch.equal(absent, want == n) and torch.equal(present[~absent], want[~absent])
        assert present.min() >= 0 and present.max() < n
        assert torch.equal(tile.halo_positions.cpu().long(), halo)
        assert torch.equal(tile.halo_rows.cpu(), present[halo])
        assert torch.equal(tile.halo_absent.cpu().view(-1), absent[halo])


def test_a_mask_planned_like_the_one_before_reaches_the_device_in_two_copies(timm_models, device):
    """Planned while the GPU runs the step before, a mask's tensors (its decoder scales) go in one
    copy, every table of the encoder's (tiles as their parts) in another: on a GPU each copy is a
    launch the CPU pays for."""
    where = audit_device(device)
    model = SparK(SparseEncoder.from_timm(copy.deepcopy(timm_models("resnet18"))), decoder_width=64).train().to(where)
    images, active = make_batch((128, 160), "ratio0.6", batch=4)
    before = model.plan(random_active(4, (4, 5), 0.6, torch.Generator().manual_seed(1)), where)
    model(images.to(where), before)["loss"].backward()
    audit = DeviceAudit()
    with audit:
        plan = model.plan(active, where, like=before)
    assert sum(audit.copies.values()) == 2, dict(audit.copies)
    assert plan.encoder.sites.tables() == before.encoder.sites.tables()


def test_tensors_packed_into_one_buffer_come_out_as_they_went_in():
    from spark_sparse.transfer import pack, unpack

    tensors = [torch.arange(5, dtype=torch.int32), torch.tensor([True, False, True]), torch.tensor(2.5),
               torch.zeros(0, 3, dtype=torch.int64), torch.arange(12.0).view(3, 4).t(), torch.arange(3).view(3, 1)]
    buffer, layout = pack(tensors)
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1
    for got, want in zip(unpack(buffer, layout), tensors, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want) and got.data_ptr() % 8 == 0


def test_minkowski_hashes_no_coordinates_until_they_are_read(timm_models):
    encoder = SparseEncoder.from_timm(copy.deepcopy(timm_models("resnet18"))).train()
    images, active = make_batch((96, 128), "ratio0.6")
    feats = encoder(images, active)
    sum(f.F.sum() for f in feats).backward()
    sites = PatchSites.of(feats[0])
    managers = [f.coordinate_manager for f in feats] + [sites.manager]
    assert sorted(sites.keys) == [1, 2, 4, 8, 16, 32]
    assert not any(m.has_map(k) for m in managers for k in sites.keys.values()), "a map was hashed unasked"
    for stride, f in zip(encoder.strides, feats):  # read: inserted now, the tables' sites in their order
        assert torch.equal(f.C, sites.coordinates(stride))
        assert f.coordinate_manager.has_map(f.coordinate_map_key)


def test_minkowskis_own_modules_on_cuda_need_its_cuda_build():
    from spark_sparse.encoders.sparse_engine import check_stock_modules

    if ME.is_cuda_available():
        pytest.skip("this MinkowskiEngine is a CUDA build")
    check_stock_modules(torch.device("cpu"))
    with pytest.raises(ValueError, match="conv='minkowski' .* CPU-only build: on CUDA use conv='patch'"):
        check_stock_modules(torch.device("cuda"))


def test_minkowskis_own_modules_get_their_maps_as_they_are_made(timm_models):
    encoder = SparseEncoder.from_timm(copy.deepcopy(timm_models("resnet18")), conv="minkowski").eval()
    images, active = make_batch((96, 128), "ratio0.6")
    with torch.no_grad():
        feats = encoder(images, active)
    assert all(f.coordinate_manager.has_map(f.coordinate_map_key) for f in feats)


@pytest.mark.parametrize("name", ["resnet50", "convnext_tiny", "efficientnet_b0"])
def test_the_issues_models_equal_dense_masked_on_the_device(timm_models, name, device):
    if device.type != "cuda":  # on the CPU, test_encoder_equivalence.py runs every block type of these
        pytest.skip("the GPU check's table (pytest --device cuda)")
    images, active = make_batch(VARIANT_SIZE, "ratio0.6", batch=2)
    images = images.to(device)
    sparse, dense = encoders(timm_models(name), train=True, device=device)
    assert_train_steps_equal(sparse, dense, images, active)
    with torch.no_grad():  # eval mode: the running statistics, the same masked features
        for a, b in zip(sparse.eval().dense_features(images.double(), active),
                        dense.eval().dense_features(images.double(), active)):
            assert rel_err(a, b) < 1e-9


@pytest.mark.parametrize("name", ["resnet50", "convnext_tiny", "efficientnet_b0"])
def test_a_step_replayed_from_a_cuda_graph_is_the_eager_step(timm_models, name, device):
    """``GraphedStep``: captured on one batch, replayed on later ones (their tables copied into
    the captured ones), the loss and every gradient are those of the eager step on each."""
    if device.type != "cuda":  # tests/test_graphed.py covers the copying of plans on the CPU
        pytest.skip("CUDA graphs (pytest --device cuda)")
    torch.manual_seed(0)
    model = SparK(SparseEncoder.from_timm(copy.deepcopy(timm_models(name))), decoder_width=64)
    model = model.double().to(device).train()
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 3, 64, 96, dtype=torch.float64, generator=g).to(device) for _ in range(4)]
    masks = [model.random_mask(images[0], generator=g) for _ in images]

    graphed = GraphedStep(model, lambda x, plan: model(x, plan)["loss"], images[0], model.plan(masks[0], device))
    for x, active in zip(images[1:], masks[1:]):
        loss = graphed(x, model.plan(active, device, like=graphed.plan)).clone()
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        eager = copy.deepcopy(model)
        eager.zero_grad(set_to_none=True)
        want_loss = eager(x, active)["loss"]
        want_loss.backward()
        want = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
        assert rel_err(loss, want_loss.detach()) < 1e-9
        assert got.keys() == want.keys() and all(rel_err(got[n], want[n]) < 1e-6 for n in want)


@pytest.mark.parametrize("stride", [1, 2])
def test_the_dense_masked_padded_average_pooling_has_the_cpus_gradient(stride, device):
    """Res2Net's and ResNeSt's 3x3 pooling (padding 1) reads the channels-last maps the masked
    norms hand on; on CUDA, torch's own backward of that was wrong (pytorch/pytorch#188344)."""
    pool = convert_leaf(torch.nn.AvgPool2d(3, stride, padding=1), "pool")
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    active = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    grad_out = torch.randn(2, 8, 6 // stride, 6 // stride, dtype=torch.float64)

    x_on = x.to(device).contiguous(memory_format=torch.channels_last).requires_grad_()
    (grad,) = torch.autograd.grad(pool(MaskedTensor(x_on, active.to(device))).x, x_on, grad_out.to(device))
    x_cpu = x.clone().requires_grad_()  # contiguous, on the CPU: torch's reference
    (want,) = torch.autograd.grad(F.avg_pool2d(x_cpu, 3, stride, padding=1), x_cpu, grad_out)
    assert torch.allclose(grad.cpu(), want, rtol=0, atol=1e-12)


def test_the_audit_sees_a_cpu_index_and_a_host_read():
    """The audit itself: a CPU index into a device tensor is mixing, ``nonzero`` a host read."""
    x = torch.zeros(4, 2, device="meta")
    audit = DeviceAudit()
    with audit:
        x.index_select(0, torch.tensor([0, 1]))  # meta accepts it, as CUDA accepts some CPU indices
        with pytest.raises(NotImplementedError):  # meta has no data to read
            x.nonzero()
        torch.zeros(2).to("meta")
    assert dict(audit.mixed) == {"index_select ['cpu', 'meta']": 1}
    assert dict(audit.host_reads) == {"nonzero": 1}
    assert sum(audit.copies.values()) == 1
