# The commands of the README: `make pretrain`, `make finetune` and `make test`. Each runs the idempotent
# set-up first, so a fresh clone needs nothing else.
PY := .venv/bin/python
ARGS ?=

.PHONY: setup pretrain finetune test bench clean

setup:
	@bash scripts/setup.sh

pretrain: setup
	$(PY) -m spark_sparse.pretrain $(ARGS)

# about 2 minutes on 2 cores: ResNet-18 fine-tuned on the bundled photos task (which photo a crop
# comes from); ARGS="pretrained=outputs/<date>/<time>" starts from a pretraining run's encoder.
# The recipe's lr at batch 32 (LAMB 2e-3 * 32 / 256) learns little in 10 epochs: the demo sets one.
FINETUNE_ARGS ?= optim.lr=0.02
finetune: setup
	$(PY) -m spark_sparse.finetune $(FINETUNE_ARGS) $(ARGS)

# the suite in one worker process per core (pytest-xdist; each worker keeps its share of the cores'
# threads). Tests are handed out one by one, except those sharing an expensive module fixture
# (marked xdist_group), which one worker runs together. TEST_WORKERS=0: all in this process.
TEST_WORKERS ?= auto
test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(ARGS)

# `make bench`: the speed benchmark at the speed targets' settings, one model of each family that
# had a speed target (NFNet, MambaOut, DenseNet, RexNet, GhostNet and MobileNetV4 are measured by
# the `benchmarks.sparse_vs_dense` commands their README sections quote) (about 2 hours on 2 cores, most of it the whole SparK step with its 768-wide decoder;
# BENCH_ARGS with passes=[fwd_bwd] alone takes about 15 minutes)
# and a short mask-ratio ablation (about 5), then the README's tables and docs/ plots are
# refreshed. Override the grids with BENCH_ARGS / ABLATION_ARGS; ARGS is appended to the speed
# benchmark's overrides.
BENCH_DIR := outputs/bench/latest
ABLATION_DIR := outputs/ablation/latest
BENCH_ARGS ?= models=[resnet18,resnet50,resnext50_32x4d,convnext_tiny,regnety_016,efficientnet_b0,mobilenetv3_large_100,resnetv2_50x1_bit,tf_efficientnet_b0,repvgg_b0,cspdarknet53] \
	batch_size=[16,8,8,8,8,16,16,8,16,8,8] mask_ratios=[0.6,0.75] \
	passes=[fwd_bwd,train_step] repeats=5
ABLATION_ARGS ?= mask_ratio=0.4,0.6,0.75,0.9 model=resnet18 input_size=96 batch_size=16 \
	max_steps=100 log_every=2 save_every=1000 vis_every=1000 vis_images=2

bench: setup
	$(PY) -m benchmarks.update_readme --readme README.md --check
	rm -rf $(BENCH_DIR) $(ABLATION_DIR)
	$(PY) -m benchmarks.sparse_vs_dense $(BENCH_ARGS) $(ARGS) hydra.run.dir=$(BENCH_DIR)
	$(PY) -m spark_sparse.pretrain -m $(ABLATION_ARGS) hydra.sweep.dir=$(ABLATION_DIR)
	$(PY) -m spark_sparse.report $(ABLATION_DIR)
	$(PY) -m benchmarks.update_readme --readme README.md --bench $(BENCH_DIR) --ablation $(ABLATION_DIR)

clean:
	rm -rf outputs multirun .pytest_cache
