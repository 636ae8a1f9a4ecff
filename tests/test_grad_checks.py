"""ZeRO-1/2's overflow test and gradient norm as multi-tensor kernels (salatrain/train/grad_checks.py) give
DeepSpeed's own answers, on a real DeepSpeed engine, for finite gradients and for NaN / +inf / -inf in any one
tensor; other optimizers keep DeepSpeed's code."""

from __future__ import annotations

import pytest
import torch

from salatrain.train import engine as ds_engine

# The suite runs DeepSpeed on its CPU accelerator (conftest: DS_ACCELERATOR=cpu) while a CUDA machine's process
# group is NCCL, so these engines cannot be built there; on a GPU the swapped methods run inside every ZeRO-1/2
# training run (docs/perf.md).
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed runs on its CPU accelerator in tests")


def _engine(stage: int, fused: bool, precision: str = "fp32"):
    ds_engine.init_distributed()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(6)], torch.nn.LayerNorm(16))
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "bf16": {"enabled": precision == "bf16"}, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 60}
    eng = ds_engine.initialize(model, opt, config, fused_grad_checks=fused)
    x = torch.randn(4, 16, dtype=torch.bfloat16 if precision == "bf16" else torch.float32, device=eng.device)
    eng.backward(eng(x).float().square().mean())
    return eng


@pytest.mark.parametrize("stage,precision", [(1, "fp32"), (2, "fp32"), (2, "bf16")])
def test_fused_checks_match_deepspeed(stage, precision):
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Zero

    eng = _engine(stage, fused=True, precision=precision)
    try:
        opt = eng.optimizer
        assert "get_grad_norm_direct" in vars(opt) and "has_overflow_partitioned_grads_serial" in vars(opt)
        grads = [g for i in range(len(opt.bit16_groups)) for g in opt.averaged_gradients[i]]
        assert len(grads) == 14
        params = opt.params_in_partition[0]
        ours = opt.get_grad_norm_direct(opt.averaged_gradients[0], params)
        theirs = Zero.get_grad_norm_direct(opt, opt.averaged_gradients[0], params)
        assert float(theirs) > 0 and torch.allclose(ours, theirs, rtol=1e-6), (ours, theirs)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        assert not opt.has_overflow_partitioned_grads_serial().item()
        assert not Zero.has_overflow_partitioned_grads_serial(opt).item()
        for value in (float("nan"), float("inf"), -float("inf")):
            for k in (0, 7, 13):
                g = grads[k]
                kept = g.view(-1)[-1].item()
                g.view(-1)[-1] = value
                found = opt.has_overflow_partitioned_grads_serial()
                assert found.shape == (1,) and found.item() is True, (value, k)
                assert Zero.has_overflow_partitioned_grads_serial(opt).item() is True
                # an invalid total norm is masked to DeepSpeed's -1 sentinel in both
                assert float(opt.get_grad_norm_direct(opt.averaged_gradients[0], params)) == -1.0
                assert float(Zero.get_grad_norm_direct(opt, opt.averaged_gradients[0], params)) == -1.0
                g.view(-1)[-1] = kept
        assert not opt.has_overflow_partitioned_grads_serial().item()
        eng.step()  # the step itself runs through the swapped methods
    finally:
        ds_engine.release([eng])


@pytest.mark.parametrize("stage,fused", [(0, True), (3, True), (2, False)])
def test_other_optimizers_keep_deepspeed_code(stage, fused):
    eng = _engine(stage, fused=fused)
    try:
        assert "get_grad_norm_direct" not in vars(eng.optimizer)
        assert "has_overflow_partitioned_grads_serial" not in vars(eng.optimizer)
    finally:
        ds_engine.release([eng])
