"""GPU check of the whole hybrid model: the mixers run the Triton kernels (behind the self-test) and agree with
the PyTorch reference mixers; cached generation equals uncached; prints timings of one forward+backward.

    python bench/model_gpu.py [--layers 4] [--seq 4096]

Needs CUDA. Shapes: SALA-like heads (32 query heads, 2 KV heads, head dim 128, hidden 4096) on a few layers.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from salatrain.models import SalaHybridConfig, SalaHybridForCausalLM


def build(layers: int, dtype, device="cuda") -> SalaHybridForCausalLM:
    plan = ["sparse_attention" if i % 4 == 0 else "linear_attention" for i in range(layers)]
    cfg = SalaHybridConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=2, head_dim=128, mixer_types=plan,
        sparse_config=dict(dense_len=1024, topk=16, window_size=512), max_position_embeddings=65536,
    )
    torch.manual_seed(0)
    model = SalaHybridForCausalLM(cfg).to(device, dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "g_proj" in name or "z_proj" in name:
                p.normal_(0, 0.02)
    return model


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = build(args.layers, torch.float32)
    ids = torch.randint(0, 32000, (1, args.seq), device="cuda")
    results = {}
    for name, dtype, backend in (("fp32 reference", torch.float32, "torch"), ("bf16 torch mixers", torch.bfloat16,
                                 "torch"), ("bf16 Triton kernels", torch.bfloat16, "auto")):
        model.to(dtype).set_kernel_backend(backend)
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids, use_cache=False)
        out.loss.backward()
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
        t0 = time.perf_counter()
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids, use_cache=False).loss.backward()
        torch.cuda.synchronize()
        results[name] = (out.logits.detach().float(), out.loss.item(), grads, (time.perf_counter() - t0) / 3)
        print(f"{name}: loss {out.loss.item():.5f}, fwd+bwd {results[name][3] * 1e3:.1f} ms "
              f"({args.layers} layers, T={args.seq})")
    ref_logits, _, ref_grads, _ = results["fp32 reference"]
    err = {}
    for name in ("bf16 torch mixers", "bf16 Triton kernels"):
        logits, _, grads, _ = results[name]
        err[name] = (rel(logits, ref_logits), max(rel(grads[n], ref_grads[n]) for n in ref_grads))
        print(f"{name}: logits rel err vs fp32 {err[name][0]:.2e}, worst grad rel err {err[name][1]:.2e}")
    ok = all(err["bf16 Triton kernels"][i] <= 2 * err["bf16 torch mixers"][i] + 1e-3 for i in range(2))
    print("kernels within 2x of PyTorch's own bf16 error:", "PASS" if ok else "FAIL")
    model.to(torch.bfloat16)
    model.set_kernel_backend("auto")
    prompt = ids[:, :1100]
    with torch.no_grad():
        gen = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        seq = prompt
        for _ in range(8):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    agree = int((gen[0, -8:] == seq[0, -8:]).sum())
    print(f"generate (cache, crossing dense_len=1024) vs uncached greedy: {agree}/8 tokens agree (bf16)")
    print(f"card: {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
