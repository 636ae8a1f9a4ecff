"""GPU check of packed long rows, as the trainer feeds them: document bounds on the host (``cu_seqlens`` on the CPU
with ``max_seqlen``). Needs CUDA.

    python bench/packed_rows_gpu.py [--layers 4] [--docs 3000,2100,3092]

Checks, on a SALA-shaped hybrid whose documents run past the sparse layers' dense prefix (so the Triton sparse
kernels take the packed layout):
- the same forward and gradients whether the bounds come from the host or from the device;
- each document's logits equal to that document run alone (no attention across a boundary);
- a forward+backward with host bounds reads nothing back from the GPU (``torch.cuda.set_sync_debug_mode("error")``);
- and prints the time of one forward+backward with each kind of bounds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_gpu import build, rel  # noqa: E402


def step(model, ids, pos, cu, max_seqlen):
    model.zero_grad(set_to_none=True)
    out = model(ids, position_ids=pos, cu_seqlens=cu, max_seqlen=max_seqlen, use_cache=False)
    out.logits.float().square().mean().backward()
    return out.logits.detach().float()


def grads(model):
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def timed(fn, sync, reps=5):
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--docs", default="3000,2100,3092", help="document lengths laid end to end in one row")
    ap.add_argument("--device", default="cuda", help="cpu only to try the script itself (no sync check)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    lens = [int(x) for x in args.docs.split(",")]
    n = sum(lens)
    model = build(args.layers, torch.bfloat16, dev)
    model.set_kernel_backend("auto")
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=dev)
    cu_host = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    pos = torch.cat([torch.arange(k) for k in lens]).view(1, n).to(dev)
    longest = max(lens)
    print(f"row of {n} tokens, documents {lens}, sparse dense_len {model.config.sparse_config['dense_len']}")

    host_logits = step(model, ids, pos, cu_host, longest)
    host_grads = grads(model)
    dev_logits = step(model, ids, pos, cu_host.to(dev), None)
    dev_grads = grads(model)
    worst = max(rel(host_grads[k], dev_grads[k]) for k in dev_grads)
    print(f"host vs device bounds: logits rel {rel(host_logits, dev_logits):.2e}, worst grad rel {worst:.2e}")
    ok = rel(host_logits, dev_logits) < 1e-3 and worst < 1e-2

    alone = []
    with torch.no_grad():
        for a, b in zip(cu_host[:-1].tolist(), cu_host[1:].tolist()):
            alone.append(model(ids[:, a:b], use_cache=False).logits.float())
    alone = torch.cat(alone, 1)
    doc_err = rel(host_logits, alone)
    print(f"packed row vs each document alone: logits rel {doc_err:.2e}")
    ok = ok and doc_err < 2e-2

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    if dev.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        step(model, ids, pos, cu_host, longest)
        print("forward+backward with host bounds under sync debug mode 'error': no read-back")
    except RuntimeError as exc:
        ok = False
        print(f"forward+backward with host bounds read back from the GPU: {str(exc).splitlines()[0]}")
    finally:
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")

    t_host = timed(lambda: step(model, ids, pos, cu_host, longest), sync)
    t_dev = timed(lambda: step(model, ids, pos, cu_host.to(dev), None), sync)
    print(f"fwd+bwd ({args.layers} layers, {n} tokens): host bounds {t_host:.1f} ms, device bounds {t_dev:.1f} ms")
    print("packed rows:", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
