"""trainer.profile_steps: per-phase times of a real (tiny, CPU) run, and the accounting of a traced step's kernels."""

import json

import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

from salatrain.train import compose_train, run_stage
from salatrain.train.profile import StepProfiler, kind_of, sync_site
from tests.helpers.common import data_cache, one_thread  # noqa: F401 (fixtures)


def test_profile_steps_time_every_phase_of_a_distill_run(tmp_path, data_cache):
    out = tmp_path / "run"
    cfg = compose_train("tiny", [f"output_dir={out}", "trainer.max_steps=5", f"data.cache_dir={data_cache}",
                                 "stage=distill", "trainer.profile_steps=[2,3]"])
    run_stage(cfg)
    prof = json.loads((out / "profile.json").read_text())
    assert prof["steps_timed"] == 2
    ph = prof["phase_seconds_per_step"]
    for name in ("step", "step/data", "step/forward", "step/forward/student", "step/forward/teacher",
                 "step/forward/loss", "step/backward", "step/optimizer"):
        assert ph[name] > 0, name
    top = sum(v for k, v in ph.items() if k.count("/") == 1)
    assert top <= ph["step"] * 1.001  # the phases nest inside the step
    assert ph["step/forward/student"] + ph["step/forward/teacher"] + ph["step/forward/loss"] <= ph["step/forward"]
    assert "| step/backward |" in (out / "profile.md").read_text()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # profiled steps still train and log


@pytest.mark.parametrize("name, kind", [
    ("nvjet_sm90_tst_192x192_64x3_1x2_h_bz_coopB_NNN", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false",
     "softmax attention (flash/cuDNN)"),
    ("_scan_kernel", "Lightning kernels"),
    ("_qk_norm_rope_bwd_kernel", "Lightning kernels"),
    ("_logit_loss_kernel", "logit loss"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>",
     "elementwise and other"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamW", "optimizer (multi-tensor)"),
    ("Memcpy HtoD (Pinned -> Device)", "copies and casts"),
    ("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication (NCCL)"),
    ("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", "communication (NCCL)"),
])
def test_kernels_of_an_h200_trace_fall_in_their_kind(name, kind):
    assert kind_of(name) == kind


def _device_event(i, name, start, end, annotation=False):
    return FunctionEvent(id=i, name=name, thread=0, start_us=start, end_us=end, device_type=DeviceType.CUDA,
                         is_user_annotation=annotation)


def test_a_traced_step_counts_kernels_once_and_skips_annotations(tmp_path):
    p = StepProfiler([1, 1], torch.device("cpu"), tmp_path, tokens_per_step=1000)
    p._collect([
        _device_event(0, "gemm_a", 0, 100),
        _device_event(1, "gemm_a", 150, 250),
        _device_event(2, "nccl_reduce", 200, 300),  # another stream, overlapping the second gemm
        _device_event(3, "Optimizer.step#AdamW.step", 0, 1000, annotation=True),  # a range over kernels
        FunctionEvent(id=4, name="aten::mm", thread=0, start_us=0, end_us=900),  # a host-side op
    ])
    p.traced_wall_s = 0.0004
    s = p.summary()
    assert s["kernel_launches"] == 3
    assert s["top_kernels_seconds"] == {"gemm_a": pytest.approx(200e-6), "nccl_reduce": pytest.approx(100e-6)}
    assert s["device_busy_seconds"] == pytest.approx(250e-6)  # [0,100] + [150,300], the overlap once
    p.write()
    assert "3 device operations" in (tmp_path / "profile.md").read_text()
    assert "device busy 0.2 ms of the step's 0.4 ms (62%" in (tmp_path / "profile.md").read_text()


def test_host_synchronisations_are_counted_by_the_line_that_caused_them(tmp_path):
    import traceback

    import salatrain.train.loop as loop

    here = traceback.FrameSummary(loop.__file__, 258, "_train_step")
    inner = traceback.FrameSummary(torch.__file__, 10, "item")
    outside = traceback.FrameSummary(__file__, 5, "test")
    assert sync_site([outside, here, inner]) == "train/loop.py:258 (_train_step)"
    assert sync_site([outside, inner]) is None
    p = StepProfiler([1, 1], torch.device("cpu"), tmp_path, tokens_per_step=1000)
    for _ in range(3):  # what torch's sync debug mode warns, seen from this test (no salatrain frame on the stack)
        p._on_warning(UserWarning("called a synchronizing CUDA operation"), UserWarning, "/x/loop.py", 7)
    shown = []
    p._show_other = lambda *args: shown.append(args[:4])
    p._on_warning(UserWarning("something else"), UserWarning, "/x/loop.py", 8)
    assert len(shown) == 1 and shown[0][2:] == ("/x/loop.py", 8)  # passed on, not counted
    assert p.summary()["host_syncs"] == {"loop.py:7": 3}
    p.write()
    assert "host synchronisations in the traced step: 3" in (tmp_path / "profile.md").read_text()
