"""The torch ops one decoded token dispatches, by part of the model: on a GPU every op that is not a view is a
kernel launch the host pays for, and at batch 1 those launches, not the weights' memory traffic, set a decoded
token's time (bench/decode_gpu.py times it there). CPU, deterministic, seconds:

    TRITON_INTERPRET=1 python bench/decode_ops.py --prompts 300 9000 --out decode_ops.json

Models: the layer structure of bench/train_bench.py's 1B pair (16 layers, 32 query / 2 K/V heads of 64) at a tiny
width with random weights in bf16 (the count depends on the layers, not their width): transformers' Llama, and the hybrid
of its uniform 25% conversion (4 InfLLM-V2 + 12 Lightning layers). The hybrid decodes as it does on a GPU where
the kernels run: Lightning layers and norms on the Triton kernels (under the interpreter; each launch counted as
one op, the interpreter's own torch calls not), sparse layers on the one-token step (`decode_with_step`). The
prefill runs the PyTorch references (the interpreter would take minutes). At 300 tokens the sparse layers attend
densely (SALA's dense_len is 8192); at 9000 they select blocks. ``--scaled-down`` converts with SALA's sparse
settings scaled down 4x (top-16 blocks, window 512, dense_len 1024): a 2400-token prompt then selects blocks as
9000 do at SALA's, and the prefill takes seconds instead of minutes on a CPU (the tests use it); a decoded token's
op count depends on whether the layers select, not on how many blocks they select.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VIEWS = {"view", "_unsafe_view", "t", "transpose", "permute", "unsqueeze", "squeeze", "select", "slice", "expand",
         "detach", "split", "alias", "as_strided", "lift_fresh", "_reshape_alias", "unfold", "narrow"}
SHAPE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=32768, rope_theta=500000.0,
             rms_norm_eps=1e-5, tie_word_embeddings=False)
FUSED = ("qk_norm_rope", "out_norm_gate", "rms_norm")


class OpCounter(TorchDispatchMode):
    """Counts dispatched ops by the part of the model that runs them (``part``, set by module hooks); a fused
    Triton launch counts as one op of its part, and the ops inside it (the interpreter's) do not count."""

    def __init__(self):
        super().__init__()
        self.ops, self.part, self.paused = collections.Counter(), "other", False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            name = func.overloadpacket.__name__
            self.ops[(self.part, "view" if name in VIEWS else "op")] += 1
        return func(*args, **(kwargs or {}))

    def launch(self, real):
        def run(*a, **kw):
            self.ops[(self.part, "op")] += 1
            self.paused = True
            try:
                return real(*a, **kw)
            finally:
                self.paused = False
        return run


SCALED_DOWN = dict(topk=16, window_size=512, dense_len=1024)


def build(work: Path, scaled_down: bool = False) -> tuple[Path, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from salatrain.config.schema import ConvertConfig, PlanSettings, SparseSettings
    from salatrain.convert.convert import convert

    llama, hybrid = work / "llama", work / "hybrid"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE, bos_token_id=None, eos_token_id=None)).save_pretrained(llama)
    sparse = SparseSettings(**SCALED_DOWN) if scaled_down else SparseSettings()
    convert(ConvertConfig(model=str(llama), output_dir=str(hybrid), plan=PlanSettings(method="uniform", ratio=0.25),
                          sparse=sparse, kl_check=False))
    return llama, hybrid


def hook_parts(model, counter: OpCounter) -> None:
    """Attribute each decoder layer's ops to its norms, its MLP or its mixer (by class)."""
    def enter(part):
        def pre(module, *args, **kwargs):
            module._outer_part, counter.part = counter.part, part
        return pre

    def leave(module, *args, **kwargs):
        counter.part = module._outer_part

    for layer in model.model.layers:
        for name, child in layer.named_children():
            part = ("norms" if "norm" in name else "mlp" if name == "mlp" else f"mixer: {type(child).__name__}")
            child.register_forward_pre_hook(enter(part))
            child.register_forward_hook(leave)
    model.model.norm.register_forward_pre_hook(enter("norms"))
    model.model.norm.register_forward_hook(leave)


def count(kind: str, path: Path, prompt: int) -> dict:
    from salatrain.eval.bench_measure import cache_arg, decode, load_bench_model, prefill, synthetic_ids
    from salatrain.models import modeling_sala_hybrid as modeling

    model = load_bench_model(kind, str(path), torch.device("cpu"), torch.bfloat16)  # as on a GPU (casts included)
    arg = cache_arg(model)
    cache, token = prefill(model, synthetic_ids(model.config.vocab_size, 1, prompt, 0, model.device), None, arg)
    counter = OpCounter()
    if kind == "hybrid":
        # the start-up self-tests are skipped: under the interpreter bf16 kernels do not match (its rounding), and a
        # count needs no correctness (tests/ check it in fp32 and fp16, GPU runs in bf16)
        modeling._kernels.self_test = lambda what, **kw: None
        fused = modeling._fused_ops()
        for name in FUSED:
            if hasattr(fused, name):  # (a checkout from before a kernel existed counts the ops it replaced)
                setattr(fused, name, counter.launch(getattr(fused, name)))
        for m in model.modules():
            if type(m).__name__ == "SparseAttention":  # the step (a checkout from before decode_with_step: the
                m.decode_with_step = True              # reference backend, which decoded through the step)
                m.kernel_backend = "auto" if hasattr(m, "decode_with_step") else "torch"
            elif hasattr(m, "kernel_backend"):
                m.kernel_backend = "triton"
    hook_parts(model, counter)
    cache, token = decode(model, cache, token, 2, arg)  # the kernels' self-tests and first launches
    counter.ops.clear()
    with counter:
        decode(model, cache, token, 1, arg)
    parts = sorted({part for part, _ in counter.ops})
    return {"model": kind, "prompt": prompt, "ops": sum(v for (_, t), v in counter.ops.items() if t == "op"),
            "views": sum(v for (_, t), v in counter.ops.items() if t == "view"),
            "by_part": {p: {"ops": counter.ops[(p, "op")], "views": counter.ops[(p, "view")]} for p in parts}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, nargs="+", default=[300, 9000])
    ap.add_argument("--out", required=True)
    ap.add_argument("--scaled-down", action="store_true", help=f"sparse settings {SCALED_DOWN} (SALA's / 4)")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        sys.exit("set TRITON_INTERPRET=1 (before Python starts): the hybrid's kernels run under Triton's interpreter")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        llama, hybrid = build(Path(tmp), a.scaled_down)
        for prompt in a.prompts:
            for kind, path in (("hybrid", hybrid), ("transformers", llama)):
                r = count(kind, path, prompt)
                rows.append(r)
                parts = ", ".join(f"{p} {v['ops']}" for p, v in r["by_part"].items())
                print(f"{kind} after {prompt} tokens: {r['ops']} ops + {r['views']} views per token ({parts})",
                      flush=True)
    info = {"torch": torch.__version__, "shape": SHAPE, "note": __doc__.split("\n\n")[0]}
    Path(a.out).write_text(json.dumps({"settings": vars(a), "info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
