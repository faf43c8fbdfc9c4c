"""The sparse-vs-dense benchmark: exact FLOP counts, memory measurement, and the app end to end."""

import importlib
import json
import os
import re
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from .conftest import HAS_MINKOWSKI, WITHOUT_MINKOWSKI

if not HAS_MINKOWSKI:  # this module's subject is the sparse engine
    pytest.skip(WITHOUT_MINKOWSKI, allow_module_level=True)

from benchmarks.flops import ConvFlopCounter, encoder_flops, kernel_pairs
from spark_sparse import MaskedDenseEncoder, SparseEncoder, random_active
from spark_sparse.sparse import ME  # the engine's import (its CPU_ONLY note silenced)

from .runs import cli_in_process, run_child

ROOT = Path(__file__).resolve().parents[1]

# one image, stride 1: three sites in the top-left corner and one lone site at (2, 2)
SITES = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 2, 2]], dtype=torch.int32)


@pytest.mark.parametrize("kernel, stride, pairs", [
    # submanifold 3x3: each corner site sees the three corner sites, (2, 2) only itself
    (3, 1, 3 + 3 + 3 + 1),
    # 3x3 stride 2: outputs (0, 0) and (2, 2); (0, 0) sees the corner three, (2, 2) itself
    (3, 2, 3 + 1),
    (1, 1, 4),
])
def test_sparse_conv_flops_by_hand(kernel, stride, pairs):
    c_in, c_out = 3, 5
    x = ME.SparseTensor(torch.randn(len(SITES), c_in), coordinates=SITES)
    conv = ME.MinkowskiConvolution(c_in, c_out, kernel_size=kernel, stride=stride, dimension=2)
    with ConvFlopCounter(conv) as counter:
        conv(x)
    assert counter.total == 2 * pairs * c_in * c_out


def test_kernel_pairs_of_a_same_padded_window_by_hand():
    # TensorFlow 'same' 3x3 at stride 2 pads nothing above and left: the window of output (0, 0)
    # spans sites 0..2, holding all four sites; (2, 2)'s spans 2..4, holding only itself
    out = torch.tensor([[0, 0, 0], [0, 2, 2]], dtype=torch.int32)
    assert kernel_pairs(SITES, 1, out, 3, padding=0) == 4 + 1
    assert kernel_pairs(SITES, 1, out, 3) == 3 + 1  # centred (padding 1)


@pytest.mark.parametrize("kernel, stride", [(3, 1), (3, 2), (5, 1), (7, 2), (1, 2), (2, 2)])
def test_kernel_pairs_equal_minkowski_kernel_maps(kernel, stride):
    """Our occupancy-grid count equals the size of MinkowskiEngine's own kernel map."""
    g = torch.Generator().manual_seed(kernel * 10 + stride)
    cells = torch.unique(torch.randint(0, 12, (2, 70, 2), generator=g).view(-1, 2), dim=0)
    batch = torch.arange(len(cells)) % 2
    coords = torch.cat([batch[:, None], cells], 1).unique(dim=0).int()
    x = ME.SparseTensor(torch.randn(len(coords), 2), coordinates=coords)
    y = ME.MinkowskiConvolution(2, 2, kernel_size=kernel, stride=stride, dimension=2)(x)
    maps = x.coordinate_manager.kernel_map(x.coordinate_map_key, y.coordinate_map_key,
                                           stride=stride, kernel_size=kernel)
    assert kernel_pairs(x.C, 1, y.C, kernel) == sum(m.shape[-1] for m in maps.values())


@pytest.fixture(scope="module")
def resnet18_pair():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    return SparseEncoder.from_timm(model), MaskedDenseEncoder.from_timm(model)


def test_dense_count_equals_torch_flop_counter(resnet18_pair):
    _, dense = resnet18_pair
    images, active = torch.randn(2, 3, 64, 64), random_active(2, (2, 2), 0.5)
    with FlopCounterMode(display=False) as mode, torch.no_grad():
        dense(images, active)
    assert sum(encoder_flops(dense, images, active).values()) == mode.get_total_flops()


def test_resnet18_sparse_dense_flops_ratio(resnet18_pair):
    sparse, dense = resnet18_pair
    images = torch.randn(2, 3, 224, 224)
    g = torch.Generator().manual_seed(0)
    ratios = {}
    for mask_ratio in (0.0, 0.6):
        active = random_active(2, (7, 7), mask_ratio, g)
        s, d = encoder_flops(sparse, images, active), encoder_flops(dense, images, active)
        assert s.keys() == d.keys() and len(s) == 20  # every convolution of a ResNet-18
        visible = float(active.float().mean())
        # a visible output site has at most k*k pairs, so no layer beats the visible fraction
        assert all(s[k] <= visible * d[k] for k in s)
        ratios[mask_ratio] = sum(s.values()) / sum(d.values())
    # all visible: only the zero padding at the image border is missing
    assert 0.9 <= ratios[0.0] < 1.0
    # 20 of 49 patches visible (0.408), but each visible patch also loses the pairs that reach
    # into hidden neighbours; at stride 32 a patch is one site, so layer4 keeps ~0.18 of its
    # dense FLOPs and the whole encoder about 0.30 (0.29-0.31 over mask seeds)
    assert 0.27 <= ratios[0.6] <= 0.33


def test_linear_layers_on_rows_and_on_tokens_are_counted_per_token():
    # SwiftFormer's attention runs plain linear layers on the sparse engine's (N, C) rows and on the
    # dense-masked engine's (B, n, C) tokens: a linear layer's work is per token, so the sparse count
    # is the dense one times the visible share, exactly
    torch.manual_seed(0)
    model = timm.create_model("swiftformer_xs", pretrained=False, num_classes=0)
    sparse, dense = SparseEncoder.from_timm(model), MaskedDenseEncoder.from_timm(model)
    images = torch.randn(2, 3, 128, 128)
    for mask_ratio in (0.0, 0.5):
        active = random_active(2, (4, 4), mask_ratio, torch.Generator().manual_seed(0))
        s, d = encoder_flops(sparse, images, active), encoder_flops(dense, images, active)
        attention = [k for k in s if ".attn." in k]
        assert len(attention) == 4 * 4  # to_query, to_key, proj, final in each stage's last block
        for k in attention:
            assert s[k] == d[k] * float(active.float().mean())


def test_peak_memory_sees_an_allocation_and_only_what_it_adds():
    # in a fresh process: in this one, memory that earlier tests freed and the heap kept could serve
    # the allocation without growing the resident set
    code = textwrap.dedent("""
        import json, torch
        from benchmarks.memory import peak_memory_mb
        keep = []  # the first 64 MiB stay allocated during the second measurement
        print(json.dumps([peak_memory_mb(lambda: keep.append(torch.ones(mib * 2**20 // 4)), torch.device("cpu"))
                          for mib in (64, 128)]))
    """)
    done = run_child([sys.executable, "-c", code], timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    (first, method), (second, _) = json.loads(done.stdout.splitlines()[-1])
    if first is None:
        pytest.skip(f"no memory measurement on this platform ({method})")
    # every page of the tensor is written, so it is resident; a few MiB of slack for the allocator
    assert 64 <= first <= 64 + 8 and 128 <= second <= 128 + 8, (first, second, method)


def test_app_end_to_end(tmp_path):
    done = cli_in_process("benchmarks.sparse_vs_dense", "models=[resnet18]", "mask_ratios=[0.6]", "batch_size=2",
                          "input_size=64", "repeats=1", "warmup=0", "decoder_width=64", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads((tmp_path / "results.json").read_text())
    assert len(records) == 6  # 3 passes x 2 engines
    assert {(r["pass"], r["engine"]) for r in records} == {
        (p, e) for p in ("fwd", "fwd_bwd", "train_step") for e in ("sparse", "dense_masked")}
    keys = {"model", "input_size", "batch_size", "mask_ratio", "engine", "pass", "images_per_s",
            "gflops_per_image", "peak_mem_mb", "device", "torch", "minkowski_engine", "threads", "times_s"}
    for r in records:
        assert keys <= r.keys()
        assert r["images_per_s"] > 0 and len(r["times_s"]) == 1 and r["device"] == "cpu"
        assert r["precision"] == "fp32"  # the default; bf16 passes: test_precision_speed_...
    by = {(r["pass"], r["engine"]): r for r in records}
    assert by["fwd", "sparse"]["gflops_per_image"] < by["fwd", "dense_masked"]["gflops_per_image"]
    # train_step adds the same dense head to both engines
    head = {e: by["train_step", e]["gflops_per_image"] - by["fwd", e]["gflops_per_image"]
            for e in ("sparse", "dense_masked")}
    assert head["sparse"] == pytest.approx(head["dense_masked"]) and head["sparse"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "| resnet18 | 2 | 0.60 | train_step |" in table
    assert "precision fp32 (both engines)" in table
    assert (tmp_path / "speedup.png").stat().st_size > 0
    assert (tmp_path / "flops_ratio.png").stat().st_size > 0
    assert "speed-up" in done.stdout


def test_app_refuses_missing_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    done = cli_in_process("benchmarks.sparse_vs_dense", "device=cuda", f"hydra.run.dir={tmp_path}")
    assert done.returncode != 0
    assert "device=cuda" in done.stderr


def test_precisions_the_device_cannot_run_are_refused_before_any_model_is_built():
    from omegaconf import OmegaConf

    from benchmarks.sparse_vs_dense import BenchConfigError, validate

    cfg = OmegaConf.load(ROOT / "conf/bench/sparse_vs_dense.yaml")
    assert cfg.precision == "fp32"
    validate(cfg)
    for precision, conv, error in [("fp16", None, "precision=fp16 needs a CUDA device"),
                                   ("bf16", "minkowski", "sparse_conv=minkowski .* no precision=bf16"),
                                   ("fp64", None, "precision must be one of")]:
        cfg.precision, cfg.sparse_conv = precision, conv
        with pytest.raises(BenchConfigError, match=error):
            validate(cfg)
    cfg.precision, cfg.sparse_conv, cfg.tf32 = "fp32", None, "yes"
    with pytest.raises(BenchConfigError, match="tf32 must be true or false, got 'yes'"):
        validate(cfg)
    cfg.tf32, cfg.idle_steps = True, 0
    with pytest.raises(BenchConfigError, match="idle_steps must be a whole number of at least 1, got 0"):
        validate(cfg)


@pytest.mark.parametrize("override, message", [
    ("repeats=many", "repeats must be a whole number of at least 1, got 'many'"),
    ("warmup=1.5", "warmup must be a whole number of at least 0, got 1.5"),
    ("input_size=abc", "input_size must be a positive multiple of 32, got 'abc'"),
    ("decoder_width=100", "decoder_width must be a positive multiple of 32, got 100"),
    ("mask_ratios=[0.6,abc]", "mask_ratios must be a list of numbers in [0, 1), got [0.6, 'abc']"),
    ("mask_ratios=[1.2]", "mask_ratios must be a list of numbers in [0, 1), got [1.2]"),
    ("batch_size=[8,x]", "batch_size must be a whole number, or a list of them (one per model), got [8, 'x']"),
    ("seed=-1", "seed must be a whole number of at least 0, got -1"),
    ("threads=abc", "threads must be a whole number of at least 1 or null, got 'abc'"),
    ("device=tpu", "device must be one of cpu, cuda, got 'tpu'"),
    ("sparse_conv=foo", "sparse_conv must be one of patch, minkowski or null, got 'foo'"),
])
def test_a_value_of_the_wrong_type_or_range_is_refused_in_one_line_naming_its_key(override, message):
    """Before, a word where a number belongs (repeats=many) met a comparison deep in the run as a traceback."""
    from omegaconf import OmegaConf

    from benchmarks.sparse_vs_dense import BenchConfigError, validate

    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "conf/bench/sparse_vs_dense.yaml"), OmegaConf.from_dotlist([override]))
    with pytest.raises(BenchConfigError, match=f"^{re.escape(message)}$"):
        validate(cfg)


@pytest.mark.parametrize("key, value", [("models", []), ("mask_ratios", []), ("passes", []), ("mask_ratios", 0.6),
                                        ("models", "resnet18")])
def test_what_the_tables_rows_are_made_of_must_be_lists_of_at_least_one(key, value):
    from omegaconf import OmegaConf

    from benchmarks.sparse_vs_dense import BenchConfigError, validate

    cfg = OmegaConf.load(ROOT / "conf/bench/sparse_vs_dense.yaml")
    cfg[key] = value
    message = f"{key} must be a list of at least one ({key}=[...]), got {value}"
    with pytest.raises(BenchConfigError, match=f"^{re.escape(message)}$"):
        validate(cfg)


def test_cuda_graphs_are_refused_off_cuda_and_for_minkowskis_own_modules(monkeypatch):
    from omegaconf import OmegaConf

    from benchmarks.sparse_vs_dense import BenchConfigError, validate

    cfg = OmegaConf.load(ROOT / "conf/bench/sparse_vs_dense.yaml")
    assert cfg.cuda_graph is False
    cfg.cuda_graph = True
    with pytest.raises(BenchConfigError, match="cuda_graph=true .* needs device=cuda"):
        validate(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what validate asks of the GPU
    cfg.device = "cuda"
    validate(cfg)
    cfg.sparse_conv = "minkowski"
    with pytest.raises(BenchConfigError, match="cuda_graph=true cannot replay MinkowskiEngine's own modules"):
        validate(cfg)


def test_on_cuda_only_minkowskis_own_convolutions_need_its_cuda_build(monkeypatch):
    from omegaconf import OmegaConf

    from benchmarks.sparse_vs_dense import BenchConfigError, validate

    if ME.is_cuda_available():
        pytest.skip("this MinkowskiEngine is a CUDA build")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what validate asks of the GPU
    cfg = OmegaConf.load(ROOT / "conf/bench/sparse_vs_dense.yaml")
    cfg.device = "cuda"
    validate(cfg)  # the default convolutions: our own, no CUDA build needed
    cfg.sparse_conv = "minkowski"
    with pytest.raises(BenchConfigError, match="sparse_conv=minkowski on device=cuda .* CPU-only build"):
        validate(cfg)


def test_gpu_idle_share_is_the_window_not_covered_by_gpu_work():
    from spark_sparse.run.profiling import WINDOW, covered, idle_from_trace, profile_steps

    assert covered([(0, 4), (2, 6), (8, 9), (12, 20)], 1, 15) == 5 + 1 + 3  # overlaps once, clipped
    events = [{"ph": "X", "cat": "user_annotation", "name": WINDOW, "ts": 100, "dur": 100},
              {"ph": "X", "cat": "kernel", "name": "k", "ts": 110, "dur": 40},
              {"ph": "X", "cat": "gpu_memcpy", "name": "c", "ts": 140, "dur": 20},  # overlaps the kernel
              {"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 100, "dur": 100},  # not the GPU's
              {"ph": "X", "cat": "kernel", "name": "late", "ts": 190, "dur": 50}]  # ends after the window
    share, busy = idle_from_trace(events)
    assert busy == 50 + 10 and share == pytest.approx(0.4)
    with pytest.raises(ValueError, match="no 'other' annotation"):
        idle_from_trace(events, "other")
    # the window of real steps is found in a real trace; one without GPU work (here: the CPU's; on a GPU
    # machine: a profiler without CUPTI) is refused rather than read as a GPU idle all the time
    cpu_trace = profile_steps(lambda: torch.ones(8).sum(), 2, torch.device("cpu"))
    assert any(e.get("name") == WINDOW for e in cpu_trace)
    with pytest.raises(ValueError, match="no GPU work in its 'spark_sparse.steps' window"):
        idle_from_trace(cpu_trace)


def test_gpu_idle_is_not_measured_when_the_profiler_saw_no_gpu_work(monkeypatch):
    import spark_sparse.run.profiling as gpu_idle

    monkeypatch.setattr(gpu_idle, "profile_steps", lambda step, steps, device: [
        {"ph": "X", "cat": "user_annotation", "name": gpu_idle.WINDOW, "ts": 0, "dur": 100}])
    with pytest.warns(UserWarning, match="GPU idle share not measured: the trace has no GPU work"):
        assert gpu_idle.gpu_idle(lambda: None, 2, torch.device("cuda")) is None
    assert gpu_idle.gpu_idle(lambda: None, 2, torch.device("cpu")) is None  # off CUDA: nothing to measure


def test_idle_steps_run_every_mask_once_each_planned_during_the_step_before(monkeypatch):
    """The profiled steps (on CUDA only) dry-run here: ``gpu_idle`` made to run them on the CPU."""
    import benchmarks.sparse_vs_dense as bench
    from spark_sparse.model.spark import MaskPlan, SparK

    monkeypatch.setattr(bench, "gpu_idle", lambda step, steps, device: [step() for _ in range(steps)] and (0.0, 0.0))
    model = SparK(SparseEncoder.from_timm(timm.create_model("resnet18", num_classes=0)), decoder_width=32)
    images = torch.randn(2, 3, 64, 64)
    masks = [random_active(2, (2, 2), 0.5, torch.Generator().manual_seed(i)) for i in range(3)]
    seen, built = [], []
    run = bench.make_pass("train_step", model, images, "fp32")

    def step(mask):
        seen.append(mask)
        built.append(mask.encoder.sites.tables() if isinstance(mask, MaskPlan) else None)  # before the step
        run(mask)

    for plan in (None, bench.PlannedAhead(model, torch.device("cpu"))):
        seen.clear(), built.clear()
        assert bench.idle_of(step, masks, model, torch.device("cpu"), plan) == (0.0, 0.0)
        got = [m.active if isinstance(m, MaskPlan) else m for m in seen]
        assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, masks))
        assert [isinstance(m, MaskPlan) for m in seen] == [plan is not None] * 3
        if plan is not None:
            # the first planned before the steps (by a fresh planner: its visible patches' index
            # alone), each later one like the mask before, with the tables that mask's step read
            assert built[0] == [("patch_index",)] and len(plan.seconds) == 3
            assert built[1] == seen[0].encoder.sites.tables() and built[2] == seen[1].encoder.sites.tables()
            assert len(built[2]) > 1


def test_each_timed_pass_plans_the_next_mask_before_it_waits_for_the_device(monkeypatch):
    """As pretraining runs its steps: every pass, of either engine, runs on a mask planned during
    that engine's pass before; a timed pass queues its work, plans the next mask, then waits for
    the device, so on a GPU the planning overlaps the GPU's work and counts in the pass's time
    (``plan_s``: the CPU's share of it)."""
    import benchmarks.sparse_vs_dense as bench
    from spark_sparse.model.spark import SparK

    cfg = OmegaConf.load(ROOT / "conf/bench/sparse_vs_dense.yaml")
    cfg.merge_with({"models": ["resnet18"], "batch_size": 2, "input_size": 64, "mask_ratios": [0.6],
                    "decoder_width": 32, "passes": ["fwd_bwd", "train_step"], "repeats": 3, "warmup": 1})
    cpu = torch.device("cpu")
    models = bench.build_pair("resnet18", cfg, cpu)
    name = {id(m): e for e, m in models.items()}
    events = []
    monkeypatch.setattr(bench, "_sync", lambda device: events.append(("wait",)))
    planned = SparK.plan

    def plan(model, active, device, like=None):
        events.append(("plan", name[id(model)], id(active)))
        return planned(model, active, device, like)

    make_pass = bench.make_pass

    def logged_pass(pass_name, model, images, precision):
        run = make_pass(pass_name, model, images, precision)

        def logged(active):
            events.append(("run", name[id(model)], id(active.active)))
            run(active)
        return logged

    monkeypatch.setattr(SparK, "plan", plan)
    monkeypatch.setattr(bench, "make_pass", logged_pass)
    memory = {(p, e): (None, "test") for p in cfg.passes for e in bench.ENGINES}
    records = bench.bench_ratio(models, "resnet18", 2, 0.6, cfg, cpu, {}, memory)

    last_planned = {}
    timed = []
    for i, event in enumerate(events):
        if event[0] == "plan":
            last_planned[event[1]] = event[2]
        elif event[0] == "run":
            assert event[2] == last_planned[event[1]], f"pass {i} ran on a mask its engine did not plan last"
            after = events[i + 1:i + 3]
            if after[0][0] == "plan":
                assert after[0][1] == event[1] and after[1] == ("wait",)
                timed.append(event)
    # each pass timed: repeats per engine, in each one the next mask planned before the wait
    assert len(timed) == len(cfg.passes) * len(bench.ENGINES) * cfg.repeats
    assert all(r["plan_s"] > 0 for r in records) and len(records) == 4


def test_batch_size_is_one_int_or_one_per_model():
    from omegaconf import OmegaConf

    from benchmarks.sparse_vs_dense import BenchConfigError, batch_sizes

    cfg = OmegaConf.create({"models": ["resnet18", "resnet50"], "batch_size": 8})
    assert batch_sizes(cfg) == {"resnet18": 8, "resnet50": 8}
    cfg.batch_size = [16, 8]
    assert batch_sizes(cfg) == {"resnet18": 16, "resnet50": 8}
    cfg.batch_size = [16]
    with pytest.raises(BenchConfigError, match="a list of 2 ints"):
        batch_sizes(cfg)


def test_summary_puts_the_step_speed_up_next_to_its_limit():
    from benchmarks.report import pair_rows, summary_table

    def rec(engine, pass_, seconds):
        return {"model": "resnet50", "batch_size": 8, "mask_ratio": 0.6, "engine": engine, "pass": pass_,
                "median_s": seconds, "images_per_s": 8 / seconds, "gflops_per_image": 1.0,
                "peak_mem_mb": 50.0 if engine == "sparse" else 100.0}

    # encoder 2 s dense, 1 s sparse; the step 10 s dense, 9.5 s sparse: the limit is 10 / 9
    records = [rec("sparse", "fwd_bwd", 1.0), rec("dense_masked", "fwd_bwd", 2.0),
               rec("sparse", "train_step", 9.5), rec("dense_masked", "train_step", 10.0)]
    table = summary_table(pair_rows(records))
    assert "| resnet50 | 8 | 0.60 | **2.00x** | 0.50 | 1.05x (1.11x) |" in table


def test_conv_paths_times_every_path_of_every_layer(capsys):
    from benchmarks.conv_paths import main

    main(["--model", "resnet18", "--batch-size", "2", "--input-size", "64", "--repeats", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith(("| layer |", "|---"))]
    assert len(rows) == 1 + 16  # the stem and the 16 3x3 convolutions of a ResNet-18
    # a patch is one site at stride 32: three timings, offset GEMMs picked on the CPU
    last = next(r for r in rows if r.startswith("| layer4.1.conv2 | 512->512 | 3/1 | 1->1 |"))
    assert len(last.split(" | ")[4:7]) == 3 and " | offsets | " in last
    assert "total: tiles" in out and "small blocks: offsets" in out
    assert "depthwise" not in out  # a ResNet has none


def test_conv_paths_times_each_layout_and_backward_of_every_depthwise_layer(capsys):
    from benchmarks.conv_paths import main

    main(["--model", "convnext_atto", "--batch-size", "2", "--input-size", "64", "--repeats", "1"])
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if ".conv_dw |" in line]
    assert [r[0] for r in rows] == [f"| stages.{i}.blocks.{j}.conv_dw" for i, n in enumerate((2, 2, 6, 2)) for j in range(n)]
    first, last = rows[0], rows[-1]
    # 8x8 blocks at stride 4: all four; one site at stride 32, where a 7x7 tile would reach beyond
    # the neighbouring blocks: the canvas only; the CPU picks tiles or canvas with adjoint convolutions
    assert first[2:4] == ["7", "8"] and "n/a" not in first and first[-2] == "tiles adjoint"
    assert last[2:4] == ["7", "1"] and last[4:6] == ["n/a", "n/a"] and "n/a" not in last[6:]
    assert last[-2] == "canvas adjoint" and "depthwise total" in out


def test_queued_ops_counts_what_each_engine_hands_a_gpu_and_how_often_the_cpu_waits(capsys):
    from benchmarks.queued_ops import main

    main(["--models", "resnet18", "--batch-size", "2", "--input-size", "64", "--decoder-width", "64"])
    rows = {line.split(" | ")[1]: line.strip("| ").split(" | ")[2:5] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| resnet18 |")}
    assert set(rows) == {"fwd_bwd", "train_step"}
    (timm_ops, timm_reads), (masked_ops, masked_reads), (sparse_ops, sparse_reads) = (
        map(int, cell.split(" / ")) for cell in rows["fwd_bwd"])
    # the dense-masked engine reads each batch norm's visible sites back (20 in a ResNet-18); the
    # sparse engine and plain timm never wait for the device
    assert (timm_reads, masked_reads, sparse_reads) == (0, 20, 0)
    assert min(timm_ops, masked_ops, sparse_ops) > 0
    assert rows["train_step"][0] == "n/a" and rows["train_step"][2].endswith(" / 0")


def test_queued_ops_shows_timm_as_na_where_timm_runs_no_other_input_size(capsys):
    """BotNet's encoders run at any size up to its own (256), timm's model at 256 alone."""
    from benchmarks.queued_ops import main

    main(["--models", "botnet26t_256", "--batch-size", "2", "--input-size", "64", "--decoder-width", "64"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| botnet26t_256 | fwd_bwd |"))
    timm_cell, masked, sparse = row.strip("| ").split(" | ")[2:5]
    assert timm_cell == "n/a" and sparse.endswith(" / 0") and masked != "n/a"


@pytest.mark.parametrize("module, argv, error", [
    ("conv_paths", ["--model", "resnet_nope"], "--model resnet_nope: unknown timm model 'resnet_nope'"),
    ("conv_paths", ["--model", "bat_resnext26ts"], "--model bat_resnext26ts: cannot convert BatNonLocalAttn"),
    ("conv_paths", ["--input-size", "100"], "argument --input-size: must be a positive multiple of 32, got 100"),
    ("conv_paths", ["--batch-size", "1"],
     "argument --batch-size: must be a whole number of at least 2 (train-mode batch norm), got 1"),
    ("queued_ops", ["--models", "resnet18", "resnet_nope"], "--models: unknown timm model(s) resnet_nope"),
    ("queued_ops", ["--models", "bat_resnext26ts"], "--models bat_resnext26ts: cannot convert"),
    ("queued_ops", ["--models", "gcvit_xxtiny", "--input-size", "256"],
     "--models gcvit_xxtiny: model gcvit_xxtiny has windows made for its own input size: input_size must be 224, "
     "got 256"),
    ("queued_ops", ["--mask-ratio", "1.5"], "argument --mask-ratio: must be in [0, 1), got 1.5"),
    ("queued_ops", ["--decoder-width", "100"], "argument --decoder-width: must be a positive multiple of 32, got 100"),
    ("batch_tables", ["--input-size", "100"], "argument --input-size: must be a positive multiple of 32, got 100"),
    ("batch_tables", ["--batch-sizes", "16", "0"],
     "argument --batch-sizes: must be a whole number of at least 1, got 0"),
    ("batch_tables", ["--repeats", "many"], "argument --repeats: must be a whole number of at least 1, got 'many'"),
    ("batch_tables", ["--model", "resnet_nope"], "--model: unknown timm model resnet_nope"),
    ("batch_tables", ["--model", "nest_tiny", "--input-size", "256"],
     "--model nest_tiny: model nest_tiny adds position embeddings made for its own input size: input_size must be "
     "224, got 256"),
    ("precision_error", ["--mask-ratio", "nan"], "argument --mask-ratio: must be in [0, 1), got nan"),
    ("precision_error", ["--seed", "-1"], "argument --seed: must be a whole number of at least 0, got -1"),
])
def test_benchmark_command_lines_refuse_bad_arguments_in_one_line(module, argv, error, capsys):
    """Refused before any model is built: a bad value used to end in a traceback from the first pass."""
    main = importlib.import_module(f"benchmarks.{module}").main
    batch = "--batch-sizes" if module == "batch_tables" else "--batch-size"
    with pytest.raises(SystemExit) as stop:
        main(argv + ([batch, "2"] if batch not in argv else []))
    assert stop.value.code == 2
    assert f": error: {error}" in capsys.readouterr().err


def test_batch_tables_masks_in_the_models_own_patch(capsys):
    """NesT's mask patch is 16 pixels (its coarsest stride): MinkowskiEngine hashed its sites at
    strides 1 to 16, and its tables are of 16-pixel patches."""
    from benchmarks.batch_tables import main

    main(["--model", "nest_tiny", "--input-size", "224", "--batch-sizes", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| me_insert")] == \
        [f"| me_insert s{s}" for s in (1, 2, 4, 8, 16)]
    assert "| **our tables, on the CPU** |" in out


def test_precision_speed_times_both_engines_under_each_precision(capsys):
    from benchmarks.precision_speed import main

    main(["models=[resnet18]", "batch_size=2", "input_size=64", "mask_ratios=[0.6]", "passes=[fwd,train_step]",
          "decoder_width=64", "repeats=1", "warmup=0"])
    out = capsys.readouterr().out
    assert "| model | batch | mask ratio | pass | engine | fp32 s | bf16 s | bf16 speed vs fp32 |" in out
    rows = [line for line in out.splitlines() if line.startswith("| resnet18 | 2 | 0.60 |")]
    assert [r.split(" | ")[3:5] for r in rows] == [["fwd", "sparse"], ["fwd", "dense_masked"],
                                                   ["train_step", "sparse"], ["train_step", "dense_masked"]]
    assert all(r.endswith("x |") for r in rows)
    assert "avx512_bf16" in out  # the CPU features bf16 speed depends on
    with pytest.raises(SystemExit, match="precision=fp16 needs a CUDA device"):
        main(["precisions=[fp32,fp16]"])


def test_precision_error_compares_each_engine_and_precision_with_float64(capsys):
    from benchmarks.precision_error import main

    main(["--models", "resnet10t", "--batch-size", "2", "--input-size", "64", "--decoder-width", "64"])
    rows = [line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| resnet10t |")]
    assert [r[1:3] for r in rows] == [["sparse", "fp32"], ["sparse", "bf16"], ["dense_masked", "fp32"],
                                      ["dense_masked", "bf16"]]
    for _, _, precision, stages, loss, grads, _ in rows:
        errors = [float(e) for e in stages.split(" / ")] + [float(loss)]
        # float32: rounding of 2^-24 grown over the layers; bf16: 2^-9 per layer
        assert all(e < 1e-4 for e in errors) if precision == "fp32" else all(2**-14 < e < 2**-4 for e in errors[:4])
