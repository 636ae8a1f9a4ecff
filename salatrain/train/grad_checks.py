"""DeepSpeed ZeRO-1/2's two per-tensor loops over the gradient partitions, as multi-tensor kernels.

Before every optimizer step DeepSpeed's ZeRO-1/2 optimizer walks the gradients of the parameters this rank owns
twice, one tensor at a time: the overflow test (``amax``, ``amin``, two ``isfinite``, ``logical_and``,
``logical_not`` and an add per tensor) and the gradient norm (a float64 copy and ``vector_norm`` per tensor). A
model of a few hundred small tensors (SmolLM2-135M's hybrid has 368) pays ~3,000 eager launches a step for them,
tens of milliseconds of host time while the GPU idles (docs/perf.md). ``fuse(optimizer)`` replaces both, on that
one optimizer object, by ``torch._foreach_norm`` over all tensors at once (a handful of launches):

- overflow: the max-norm of each tensor (NaN propagates through it, ±inf shows as inf) must be finite; the
  result is the same [1] boolean tensor DeepSpeed's ``has_overflow`` reduces across ranks and decides on.
- norm: the same per-tensor selection (padding, pipeline-replicated and model-parallel rules), the same float64
  accumulation, the same cross-rank reductions and the same masking of a non-finite total; only the order of
  additions inside a tensor differs.

Everything else of DeepSpeed's step (clipping, the skip decision for the whole step, the all-gathers) is
untouched. Other optimizers (ZeRO-0's bf16 optimizer, ZeRO-3, CPU offload) and DeepSpeed versions whose step
does not have these two methods keep DeepSpeed's own code. ``deepspeed.fused_grad_checks=false`` turns it off.
"""

from __future__ import annotations

import types

import torch

_INF = float("inf")


def fuse(optimizer) -> bool:
    """Swap the two loops of a ZeRO-1/2 ``optimizer`` (DeepSpeed's ``engine.optimizer``); True if swapped."""
    try:
        from deepspeed.runtime.zero import stage_1_and_2 as z
    except ImportError:
        return False
    needed = ("PIPE_REPLICATED", "is_model_parallel_parameter", "get_norm_dtype", "mask_nan_or_inf_with_val_inplace",
              "get_accelerator", "dist")
    if type(optimizer) is not z.DeepSpeedZeroOptimizer or getattr(optimizer, "cpu_offload", True) \
            or not all(hasattr(z, n) for n in needed) \
            or not all(hasattr(optimizer, n) for n in ("get_grad_norm_direct", "has_overflow_partitioned_grads_serial",
                                                         "averaged_gradients", "bit16_groups", "dp_process_group")):
        return False
    original_norm = optimizer.get_grad_norm_direct
    original_overflow = optimizer.has_overflow_partitioned_grads_serial

    def get_grad_norm_direct(self, gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            return original_norm(gradients, params, norm_type)
        unpadded = (g for g in gradients if not getattr(g, "_zero_padding", False))
        kept = [g.detach() for g, p in zip(unpadded, params)
                if not (hasattr(p, z.PIPE_REPLICATED) and p.ds_pipe_replicated)
                and (z.is_model_parallel_parameter(p) or self.model_parallel_rank == 0)]
        if kept:
            norms = torch._foreach_norm(kept, 2, dtype=z.get_norm_dtype())
            total = torch.stack(norms).to(z.get_accelerator().current_device_name()).pow(2).sum().float()
        else:
            total = torch.tensor(0.0, dtype=torch.float32).to(self.device)
        z.dist.all_reduce(total, op=z.dist.ReduceOp.SUM, group=self.dp_process_group)
        self._model_parallel_all_reduce(tensor=total, op=z.dist.ReduceOp.SUM)
        total = total.pow(0.5)
        z.mask_nan_or_inf_with_val_inplace(total, device=self.device)
        return total

    def has_overflow_partitioned_grads_serial(self):
        grads = [g.detach() for i in range(len(self.bit16_groups)) for g in (self.averaged_gradients[i] or [])
                 if g is not None and g.numel()]
        if any(g.is_sparse for g in grads):
            return original_overflow()
        device = z.get_accelerator().current_device_name()
        if not grads:
            return torch.zeros([1], dtype=torch.bool, device=device)
        peaks = torch.stack(torch._foreach_norm(grads, _INF)).to(device)
        return torch.isfinite(peaks).all().logical_not().reshape(1)

    optimizer.get_grad_norm_direct = types.MethodType(get_grad_norm_direct, optimizer)
    optimizer.has_overflow_partitioned_grads_serial = types.MethodType(has_overflow_partitioned_grads_serial,
                                                                       optimizer)
    return True
