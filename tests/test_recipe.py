"""Each model pretrains with its official SparK recipe unless the command line says otherwise."""

import json
import os

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import spark_sparse.finetune.checks as finetune_checks
import spark_sparse.pretrain.app as pretrain
import spark_sparse.pretrain.checks as pretrain_checks
from spark_sparse.encoders.families import FAMILIES
from spark_sparse.model.spark import SparK
from spark_sparse.run.checks import ConfigError, check_model_and_missing
from spark_sparse.run.recipe import CONF_DIR, cpu_workers, default_recipe, recipe_value, register_resolver
from spark_sparse.timm_models import create_timm_model

from .conftest import needs_minkowski
from .test_finetune import EVERY_FAMILY
from .test_pretrain import config


@pytest.mark.parametrize("model, drop_path, norm, betas", [
    ("resnet18", 0.0, "bn", [0.9, 0.95]),
    ("resnet50", 0.05, "bn", [0.9, 0.95]),
    ("resnext50_32x4d", 0.0, "bn", [0.9, 0.95]),  # the family's entry: timm's resnet module
    ("seresnet50", 0.0, "bn", [0.9, 0.95]),
    ("wide_resnet50_2", 0.0, "bn", [0.9, 0.95]),
    ("convnext_tiny", 0.0, "ln", [0.9, 0.999]),
    ("convnext_small", 0.2, "ln", [0.9, 0.999]),
    ("convnext_base", 0.3, "ln", [0.9, 0.999]),
    ("convnext_large", 0.4, "ln", [0.9, 0.999]),
    ("convnextv2_base", 0.3, "ln", [0.9, 0.999]),
    # timm's resnetv2 module: the ResNet recipe; GroupNorm nets densify with a layer norm
    ("resnetv2_50", 0.0, "bn", [0.9, 0.95]),
    ("resnetv2_50d", 0.0, "bn", [0.9, 0.95]),
    ("resnetv2_50x1_bit", 0.0, "ln", [0.9, 0.95]),
    ("resnetv2_152x4_bit", 0.0, "ln", [0.9, 0.95]),
    ("resnetv2_50d_gn", 0.0, "ln", [0.9, 0.95]),
    ("resnet50_gn", 0.05, "ln", [0.9, 0.95]),  # resnet50's drop path, a GroupNorm net's densify
    ("regnety_040_sgn", 0.0, "ln", [0.9, 0.95]),
    ("resnetv2_50d_evos", 0.0, "ln", [0.9, 0.95]),  # EvoNorm and FRN nets: per-image statistics only
    ("regnetz_d8_evos", 0.0, "ln", [0.9, 0.95]),
    ("test_efficientnet_ln", 0.0, "ln", [0.9, 0.95]),
    ("ese_vovnet39b_evos", 0.0, "ln", [0.9, 0.95]),
    # TensorFlow ports: their modules' batch-norm recipe
    ("tf_efficientnet_b0", 0.0, "bn", [0.9, 0.95]),
    ("tf_mobilenetv3_small_100", 0.0, "bn", [0.9, 0.95]),
    ("mobilenetv4_conv_medium", 0.0, "bn", [0.9, 0.95]),
    ("repvgg_b0", 0.0, "bn", [0.9, 0.95]),  # timm's byobnet and cspnet modules: batch-norm nets
    ("mobileone_s0", 0.0, "bn", [0.9, 0.95]),
    ("cspdarknet53", 0.0, "bn", [0.9, 0.95]),
    ("eca_nfnet_l0", 0.0, "ln", [0.9, 0.95]),  # no norm: batch-independent, as the GroupNorm nets
    ("nf_resnet50", 0.0, "ln", [0.9, 0.95]),
    ("densenet121", 0.0, "bn", [0.9, 0.95]),  # batch-norm nets: the ResNet recipe
    ("rexnet_150", 0.0, "bn", [0.9, 0.95]),
    ("ghostnet_100", 0.0, "bn", [0.9, 0.95]),
    ("vgg16_bn", 0.0, "bn", [0.9, 0.95]),
    ("selecsls60b", 0.0, "bn", [0.9, 0.95]),
    ("mobilevitv2_150", 0.0, "bn", [0.9, 0.95]),
    ("iformer_l2_distilled", 0.0, "bn", [0.9, 0.95]),
    ("cpubone_b2_bfrobust", 0.0, "bn", [0.9, 0.95]),
    ("lowformer_b15", 0.0, "bn", [0.9, 0.95]),
    ("hgnetv2_b4", 0.0, "bn", [0.9, 0.95]),
    ("starnet_s1", 0.0, "bn", [0.9, 0.95]),
    ("fasternet_t0", 0.0, "bn", [0.9, 0.95]),
    ("repvit_m1_1", 0.0, "bn", [0.9, 0.95]),
    ("dpn92", 0.0, "bn", [0.9, 0.95]),
    ("ese_vovnet39b", 0.0, "bn", [0.9, 0.95]),
    ("cspnext_m", 0.0, "bn", [0.9, 0.95]),
    ("legacy_seresnext50_32x4d", 0.0, "bn", [0.9, 0.95]),
    ("dla34", 0.0, "bn", [0.9, 0.95]),
    ("repghostnet_100", 0.0, "bn", [0.9, 0.95]),
    ("lcnetv2_base", 0.0, "bn", [0.9, 0.95]),
    ("efficientvit_b1", 0.0, "bn", [0.9, 0.95]),
    ("efficientvit_l2", 0.0, "bn", [0.9, 0.95]),
    ("swiftformer_l1", 0.0, "bn", [0.9, 0.95]),
    ("xception65p", 0.0, "bn", [0.9, 0.95]),
    ("hrnet_w32", 0.0, "bn", [0.9, 0.95]),
    ("fastvit_s12", 0.0, "bn", [0.9, 0.95]),
    ("tresnet_m", 0.0, "bn", [0.9, 0.95]),
    # timm modules of another module's class: entries of their own
    ("hardcorenas_a", 0.0, "bn", [0.9, 0.95]),
    ("res2net50_26w_4s", 0.0, "bn", [0.9, 0.95]),
    ("resnest50d", 0.0, "bn", [0.9, 0.95]),
    ("skresnet50", 0.0, "bn", [0.9, 0.95]),
    ("mambaout_tiny", 0.0, "ln", [0.9, 0.999]),  # layer-norm nets: the ConvNeXt recipe, by size
    ("mambaout_small", 0.2, "ln", [0.9, 0.999]),
    ("mambaout_base_wide_rw", 0.3, "ln", [0.9, 0.999]),
    ("rdnet_tiny", 0.0, "ln", [0.9, 0.999]),
    ("rdnet_base", 0.3, "ln", [0.9, 0.999]),
    ("convformer_s18", 0.0, "ln", [0.9, 0.999]),  # MetaFormer's ConvFormers, by size
    ("convformer_m36", 0.2, "ln", [0.9, 0.999]),
    ("convformer_b36", 0.3, "ln", [0.9, 0.999]),
    ("poolformer_s36", 0.0, "ln", [0.9, 0.999]),  # and its PoolFormers
    ("poolformerv2_m48", 0.2, "ln", [0.9, 0.999]),
    ("caformer_s18", 0.0, "ln", [0.9, 0.999]),  # and its CAFormers
    ("caformer_b36", 0.3, "ln", [0.9, 0.999]),
    ("focalnet_tiny_srf", 0.0, "ln", [0.9, 0.999]),  # FocalNets, by size
    ("focalnet_base_lrf", 0.3, "ln", [0.9, 0.999]),
    ("focalnet_huge_fl4", 0.4, "ln", [0.9, 0.999]),
    ("pvt_v2_b2", 0.0, "ln", [0.9, 0.999]),  # PVT v2, by size
    ("pvt_v2_b3", 0.2, "ln", [0.9, 0.999]),
    ("pvt_v2_b5", 0.3, "ln", [0.9, 0.999]),
    ("twins_pcpvt_small", 0.0, "ln", [0.9, 0.999]),  # Twins, by size
    ("twins_svt_base", 0.2, "ln", [0.9, 0.999]),
    ("twins_svt_large", 0.3, "ln", [0.9, 0.999]),
    ("tiny_vit_21m_512", 0.0, "ln", [0.9, 0.999]),  # TinyViT: ConvNeXt-T's
    ("swin_tiny_patch4_window7_224", 0.0, "ln", [0.9, 0.999]),  # Swin, by size
    ("swin_small_patch4_window7_224", 0.2, "ln", [0.9, 0.999]),
    ("swin_large_patch4_window12_384", 0.4, "ln", [0.9, 0.999]),
    ("swin_s3_base_224", 0.3, "ln", [0.9, 0.999]),
    ("swinv2_tiny_window16_256", 0.0, "ln", [0.9, 0.999]),  # Swin V2, by size
    ("swinv2_base_window12to24_192to384", 0.3, "ln", [0.9, 0.999]),
    ("swinv2_cr_tiny_ns_224", 0.0, "ln", [0.9, 0.999]),  # Swin V2-CR, by size
    ("swinv2_cr_small_ns_256", 0.2, "ln", [0.9, 0.999]),
    ("swinv2_cr_giant_384", 0.4, "ln", [0.9, 0.999]),
    ("efficientformer_l3", 0.0, "bn", [0.9, 0.95]),  # batch norms but in its last block: ResNet's
    ("efficientformerv2_l", 0.0, "bn", [0.9, 0.95]),  # V2: batch norms throughout, ResNet's
    ("edgenext_base", 0.0, "ln", [0.9, 0.999]),  # EdgeNeXt: ConvNeXt-T's, every size
    ("mobilenetv5_300m", 0.0, "ln", [0.9, 0.999]),  # MobileNetV5: RMS norms, no batch norm
    ("davit_tiny", 0.0, "ln", [0.9, 0.999]),  # DaViT, by size
    ("davit_base_fl", 0.3, "ln", [0.9, 0.999]),
    ("davit_huge_fl", 0.4, "ln", [0.9, 0.999]),
    ("sebotnet33ts_256", 0.0, "bn", [0.9, 0.95]),  # BotNets and Lambda-ResNets (ByobNets): batch-norm nets
    ("lambda_resnet50ts", 0.0, "bn", [0.9, 0.95]),
    ("hiera_tiny_224", 0.0, "ln", [0.9, 0.999]),  # Hiera, by size
    ("hiera_small_abswin_256", 0.2, "ln", [0.9, 0.999]),
    ("hiera_base_plus_224", 0.3, "ln", [0.9, 0.999]),
    ("hiera_huge_224", 0.4, "ln", [0.9, 0.999]),
    ("sam2_hiera_tiny", 0.0, "ln", [0.9, 0.999]),  # SAM 2's Hiera, as Hiera
    ("hieradet_small", 0.2, "ln", [0.9, 0.999]),
    ("sam2_hiera_large", 0.4, "ln", [0.9, 0.999]),
    ("gcvit_xtiny", 0.0, "ln", [0.9, 0.999]),  # GCViT, by size
    ("gcvit_small", 0.2, "ln", [0.9, 0.999]),
    ("gcvit_base", 0.3, "ln", [0.9, 0.999]),
    ("coat_lite_tiny", 0.0, "ln", [0.9, 0.999]),  # CoaT-Lite, by size
    ("coat_lite_small", 0.2, "ln", [0.9, 0.999]),
    ("coat_lite_medium_384", 0.3, "ln", [0.9, 0.999]),
    ("visformer_small", 0.0, "bn", [0.9, 0.95]),  # Visformer: batch norms throughout, ResNet's
    ("nest_tiny", 0.0, "ln", [0.9, 0.999]),  # NesT, by size (its "_jx" ports alike)
    ("nest_small_jx", 0.2, "ln", [0.9, 0.999]),
    ("nest_base", 0.3, "ln", [0.9, 0.999]),
    ("mvitv2_tiny", 0.0, "ln", [0.9, 0.999]),  # MViTv2, by size
    ("mvitv2_small", 0.2, "ln", [0.9, 0.999]),
    ("mvitv2_large", 0.4, "ln", [0.9, 0.999]),
    ("maxvit_tiny_tf_224", 0.0, "ln", [0.9, 0.999]),  # MaxViT, MaxxViT and CoAtNet, by size
    ("maxvit_rmlp_small_rw_256", 0.2, "ln", [0.9, 0.999]),
    ("maxvit_base_tf_512", 0.3, "ln", [0.9, 0.999]),
    ("maxxvitv2_rmlp_large_rw_224", 0.4, "ln", [0.9, 0.999]),
    ("coatnet_0_rw_224", 0.0, "ln", [0.9, 0.999]),
    ("coatnet_rmlp_2_rw_384", 0.3, "ln", [0.9, 0.999]),
    ("coatnet_5_224", 0.4, "ln", [0.9, 0.999]),
    ("inception_next_tiny", 0.0, "bn", [0.9, 0.999]),  # ConvNeXt's shape with batch norms
    ("inception_next_small", 0.2, "bn", [0.9, 0.999]),
])
def test_the_model_picks_its_recipe(model, drop_path, norm, betas):
    cfg = config(f"model={model}")
    assert cfg.drop_path_rate == drop_path
    assert cfg.decoder.densify_norm == norm
    assert list(cfg.optim.betas) == betas


@pytest.mark.parametrize("module", [m for family in FAMILIES for m in family.timm_modules])
def test_every_timm_module_the_encoders_convert_has_a_pretraining_and_a_fine_tuning_recipe(module):
    # hardcorenas converted (MobileNetV3s) while its models had no recipe and stopped at the first key
    pretraining, fine_tuning = (OmegaConf.load(f"{CONF_DIR}/recipe/{name}.yaml") for name in ("spark", "finetune"))
    for model in timm.list_models(module=module):
        for key in pretraining.resnet:
            assert recipe_value(pretraining, model, key) is not None, (model, key)
        for key in fine_tuning.resnet:
            assert recipe_value(fine_tuning, model, key) is not None, (model, key)


@pytest.mark.parametrize("module", [m for family in FAMILIES for m in family.timm_modules])
def test_every_timm_modules_recipes_give_a_drop_path_its_models_take(module):
    # GhostNets have no stochastic depth, and fine-tuning one failed by default on the recipe's 0.05
    name = timm.list_models(module=module)[0]
    for recipe in ("spark", "finetune"):
        rate = recipe_value(OmegaConf.load(f"{CONF_DIR}/recipe/{recipe}.yaml"), name, "drop_path_rate")
        with torch.device("meta"):
            create_timm_model(name, num_classes=0, drop_path_rate=rate)  # a rate it does not take: ValueError


def composed(app: str, *overrides: str):
    register_resolver()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(app, overrides=list(overrides))


@pytest.mark.parametrize("model, pretraining, fine_tuning", [
    ("resnet18", 128, 64),  # the bundled photos' sizes
    ("mobilevit_xxs", 128, 64),  # 2x2 blocks of sites at stride 32: 128 has them
    ("maxvit_tiny_tf_224", 224, 224),  # groups and grids of 7x7 sites at stride 32; timm: its own size
    ("maxvit_nano_rw_256", 256, 256),
    ("botnet26t_256", 128, 256),  # position tables reach its own size: smaller ones run; timm: its own
    ("halonet26t", 256, 256),
    ("sam2_hiera_tiny", 224, 224),  # windows whole at strides 16 and 32: multiples of 224  # halo attention's blocks whole at stride 32: multiples of 256
    ("swin_tiny_patch4_window7_224", 128, 224),  # our windows run at any size; timm's at its own
    ("hiera_tiny_224", 224, 224),  # a position embedding of its own size, in both
    ("hiera_small_abswin_256", 256, 256),
    ("gcvit_xxtiny", 224, 224),  # groups and global tokens fractions of its own size, in both
    ("mvitv2_tiny", 224, 224),  # relative position tables of its own map, in both
    ("coat_lite_tiny", 128, 224),  # our patch embeddings run at any size; timm's at its own
    ("efficientformerv2_s0", 224, 224),  # attention biases of its own maps, in both
    ("visformer_tiny", 224, 224),  # position embeddings of its own maps, in both
    ("nest_tiny", 224, 224),  # the same
])
def test_by_default_a_model_runs_at_the_bundled_size_or_the_least_size_up_from_it_it_runs_at(
        model, pretraining, fine_tuning):
    assert composed("pretrain", f"model={model}").input_size == pretraining
    assert composed("finetune", f"model={model}").input_size == fine_tuning
    assert composed("pretrain", f"model={model}", "input_size=512").input_size == 512  # the command line wins
    assert composed("finetune", f"model={model}", "input_size=512").input_size == 512


@needs_minkowski  # pretraining's default engine
@pytest.mark.parametrize("model", EVERY_FAMILY)
def test_every_familys_default_pretraining_and_fine_tuning_configs_are_accepted(model):
    """``python -m spark_sparse.pretrain model=X`` and ``... finetune model=X`` need no input_size."""
    pretrain_checks.validate(composed("pretrain", f"model={model}"))
    finetune_checks.validate(composed("finetune", f"model={model}"))


@pytest.mark.parametrize("model, batch_size, epochs, base_lr", [
    ("resnet50", 2048, 300, 2e-3),  # SparK's downstream table
    ("resnet101", 2048, 300, 1e-3),
    ("convnext_small", 4096, 400, 2e-4),
    ("convnext_base", 4096, 400, 1e-4),
    ("convnext_large", 4096, 200, 1e-4),
    ("regnety_040", 2048, 300, 2e-3),  # the batch-norm nets take ResNet's
    ("swin_large_patch4_window7_224", 4096, 200, 1e-4),  # the large layer-norm nets ConvNeXt-L's
])
def test_the_papers_fine_tuning_schedule_comes_with_the_model(model, batch_size, epochs, base_lr):
    cfg = composed("finetune", "+experiment=finetune_paper", f"model={model}")
    assert (cfg.batch_size, cfg.epochs, cfg.optim.base_lr) == (batch_size, epochs, base_lr)
    assert (cfg.mode, cfg.input_size, cfg.device) == ("finetune", 224, "cuda")
    assert composed("finetune", "+experiment=finetune_paper", "epochs=10").epochs == 10  # the command line wins


def test_the_papers_pretraining_recipe_asks_for_the_image_folder():
    cfg = composed("pretrain", "+experiment=paper")
    assert (cfg.data.kind, cfg.batch_size, cfg.epochs, cfg.decoder.width) == ("imagefolder", 4096, 1600, 768)
    with pytest.raises(ConfigError, match=r"data.root must be set \(add data.root=... to the command line\)"):
        check_model_and_missing(cfg)


def test_an_image_folder_is_read_by_four_workers_or_one_per_core_where_there_are_fewer(monkeypatch):
    assert config("data=imagefolder", "data.root=/data").data.num_workers == min(4, len(os.sched_getaffinity(0)))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert cpu_workers(4) == 2 and cpu_workers(1) == 1
    assert config("data=imagefolder", "data.root=/data").data.num_workers == 2
    assert config("data=imagefolder", "data.root=/data", "data.num_workers=6").data.num_workers == 6  # asked for


def test_the_command_line_wins_over_the_recipe():
    cfg = config("model=convnext_small", "drop_path_rate=0.1", "decoder.densify_norm=bn", "optim.betas=[0.9,0.95]")
    assert (cfg.drop_path_rate, cfg.decoder.densify_norm, list(cfg.optim.betas)) == (0.1, "bn", [0.9, 0.95])


def test_a_key_the_recipe_lacks_is_named():
    with pytest.raises(KeyError, match="no 'decoder_width' for model 'convnext_tiny'"):
        recipe_value({"convnext": {"densify_norm": "ln"}}, "convnext_tiny", "decoder_width")
    assert default_recipe("convnext_atto", "densify_norm") == "ln"


@needs_minkowski  # pretraining's default engine
def test_a_convnext_pretrains_with_layer_norm_densify_and_exports_timm_weights(tmp_path):
    summary = pretrain.train(config("model=convnext_atto", "max_steps=2", "save_every=2"), tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["config"]["decoder"]["densify_norm"] == "ln"
    assert ckpt["config"]["optim"]["betas"] == [0.9, 0.999]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    encoder = torch.load(summary["encoder"])
    timm.create_model("convnext_atto", num_classes=0).load_state_dict(encoder, strict=True)


@needs_minkowski  # pretraining's default engine
@pytest.mark.parametrize("model, norm", [("resnetv2_50x1_bit", "ln"), ("tf_efficientnet_b0", "bn")])
def test_bit_and_a_tensorflow_port_pretrain_and_export_timm_weights(tmp_path, model, norm):
    # BiT: GroupNorm and weight-standardised convolutions; the TensorFlow port: 'same' padding
    summary = pretrain.train(config(f"model={model}", "max_steps=2", "save_every=2"), tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["config"]["decoder"]["densify_norm"] == norm
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    encoder = torch.load(summary["encoder"])
    timm.create_model(model, num_classes=0).load_state_dict(encoder, strict=True)


@needs_minkowski
@pytest.mark.parametrize("model", ["repvgg_a0", "cspdarknet53"])
def test_byobnet_and_cspnet_pretrain_and_export_timm_weights(tmp_path, model):
    # RepVGG's train-time branches; CSPDarkNet's stride-1 stem, split stages and LeakyReLU
    summary = pretrain.train(config(f"model={model}", "max_steps=2", "save_every=2"), tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["config"]["decoder"]["densify_norm"] == "bn"
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    encoder = torch.load(summary["encoder"])
    timm.create_model(model, num_classes=0).load_state_dict(encoder, strict=True)


@needs_minkowski
def test_the_coarsest_densify_projection_is_an_identity_where_widths_match():
    # ConvNeXt-S ends at 768 channels, the paper's decoder width; atto at 320
    model = SparK.build("convnext_atto", decoder_width=320, densify_norm="ln")
    assert isinstance(model.densify[0].proj, torch.nn.Identity)
    assert isinstance(model.densify[1].proj, torch.nn.Conv2d)  # 3x3 at the finer scales
    assert isinstance(SparK.build("convnext_atto", decoder_width=256).densify[0].proj, torch.nn.Conv2d)


def test_unknown_and_unsupported_models_are_refused_before_any_work():
    with pytest.raises(pretrain.ConfigError, match=r"expected a timm model of resnet, res2net, .* \(did you mean"):
        pretrain.validate(config("model=convnext_tinny"))
    with pytest.raises(pretrain.ConfigError, match=r"model 'vit_base_patch16_224' is timm's "
                                                   r"\(timm.models.vision_transformer\), a family spark_sparse "
                                                   r"does not convert; supported: the models of resnet, res2net"):
        pretrain.validate(config("model=vit_base_patch16_224"))
