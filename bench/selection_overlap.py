"""How much neighbouring queries' InfLLM-V2 selections overlap on a real model's q/k, against the benchmark's
synthetic q/k (i.i.d. random, and correlated along T) at the same settings: the fraction of gathered blocks a tile
of ``share_tokens`` queries loads with sharing, per query, over what they load alone (1.0: no overlap; 1/TQ: all
TQ queries chose the same blocks). It says which of bench_infllmv2's "random" and "correlated" rows a converted
model's sparse layers resemble, i.e. whether ``infllmv2_attn(..., share_tokens=TQ)`` pays on real selections.

    python bench/selection_overlap.py                          # the offline SmolLM2-135M, prose and code, CPU
    python bench/selection_overlap.py --model <dense dir> --T 8192 --layers 0 8 17 --out overlap.json
    python bench/selection_overlap.py --T 16384 --time           # GPU: also time share_tokens 1 and 4 on these q/k

The q/k are the dense model's own projections (no RoPE: the converted sparse layers are NoPE), captured with
forward hooks on ``q_proj`` / ``k_proj`` while the model reads held-out-style text (the carried prose file,
.gpu/prose.jsonl.gz, when present, and this Python's standard-library sources). The sparse settings are those of
the SmolLM2 quality recipes (recipes/pipeline_halo_smollm2.yaml: topk 16, a 512-token window, dense_len 1024,
blocks of 64), or SALA's with ``--sala`` (topk 64, a 2048-token window, dense_len 8192).

``--time`` (CUDA): for every row, also the forward+backward of ``infllmv2_attn`` (Triton, bf16, the default
``share_max_union`` rule) on those q/k with ``share_tokens`` 1 and 4, and torch's default dense attention on the same
tensors in the layout a dense user holds (contiguous ``[B, H, T, D]``, ``F.scaled_dot_product_attention(...,
is_causal=True, enable_gqa=True)``), triton.testing.do_bench medians.
"""

from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_infllmv2 import SALA, block_overlap, correlated  # noqa: E402

SHARE = (2, 4, 8)
# the sparse settings of recipes/pipeline_{halo,stepwise,uniform}_smollm2.yaml (docs/quality.md's hybrids)
SMOLLM2 = dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, topk=16, window_size=512, dense_len=1024)


def texts(T_tokens: int, tok) -> dict[str, list[int]]:
    """Token ids of T_tokens for each kind of text found offline: prose (the carried file) and code (stdlib)."""
    import sysconfig

    out = {}
    prose = ROOT / ".gpu" / "prose.jsonl.gz"
    if prose.is_file():
        ids = []
        with gzip.open(prose, "rt") as f:
            for line in f:
                ids += tok(json.loads(line)["text"] + "\n\n")["input_ids"]
                if len(ids) >= T_tokens:
                    out["prose"] = ids[:T_tokens]
                    break
    ids = []
    for path in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        ids += tok(path.read_text(errors="ignore") + "\n\n")["input_ids"]
        if len(ids) >= T_tokens:
            out["code"] = ids[:T_tokens]
            break
    return out


@torch.no_grad()
def capture_qk(model, ids: list[int], layers: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (q [1, T, HQ, D], k [1, T, HKV, D])} from the layer's q_proj / k_proj outputs."""
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    got, hooks = {}, []
    for i in layers:
        attn = model.model.layers[i].self_attn
        for name in ("q_proj", "k_proj"):
            def hook(_m, _inp, out, i=i, name=name):
                got[(i, name)] = out.float().reshape(1, out.shape[1], -1, d)
            hooks.append(getattr(attn, name).register_forward_hook(hook))
    try:
        model(input_ids=torch.tensor([ids], device=model.device))
    finally:
        for h in hooks:
            h.remove()
    return {i: (got[(i, "q_proj")], got[(i, "k_proj")]) for i in layers}


def time_share(q: torch.Tensor, k: torch.Tensor, settings: dict) -> dict[str, float]:
    """fwd+bwd ms on the GPU: the sparse op with share_tokens 1 and 4, and the default dense attention."""
    import triton
    from salatrain_kernels.infllm_v2 import infllmv2_attn

    g = torch.Generator().manual_seed(1)
    q, k = (x.detach().cuda().bfloat16().requires_grad_() for x in (q, k))
    v = torch.randn(k.shape, generator=g).cuda().bfloat16().requires_grad_()
    do = torch.randn(q.shape, generator=g).cuda().bfloat16()

    def sparse(tq):
        return lambda: infllmv2_attn(q, k, v, share_tokens=tq, **settings)

    qd, kd, vd = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))  # a user's layout
    do_d = do.transpose(1, 2).contiguous()

    def dense():
        return torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)

    out = {}
    for name, fn, leaves, grad in (("x1 ms", sparse(1), (q, k, v), do), ("x4 ms", sparse(4), (q, k, v), do),
                                   ("dense ms", dense, (qd, kd, vd), do_d)):
        def step(fn=fn, leaves=leaves, grad=grad):
            for t in leaves:
                t.grad = None
            fn().backward(grad)
        out[name] = triton.testing.do_bench(step, warmup=25, rep=200)
    out["x4 gain"] = out["x1 ms"] / out["x4 ms"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="dense HF checkpoint dir (default: the offline SmolLM2-135M)")
    ap.add_argument("--T", type=int, default=8192, help="tokens per text (default 8192)")
    ap.add_argument("--layers", type=int, nargs="+", help="layers to read (default: every fourth)")
    ap.add_argument("--sala", action="store_true", help="SALA's sparse settings instead of the SmolLM2 recipes'")
    ap.add_argument("--out", type=pathlib.Path, help="write the rows as JSON here")
    ap.add_argument("--time", action="store_true", help="CUDA: time the sparse op with share_tokens 1 and 4")
    args = ap.parse_args(argv)
    if args.time and not torch.cuda.is_available():
        sys.exit("--time needs a CUDA GPU")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model is None:
        from salatrain.realmodel import smollm2_dir

        args.model = str(smollm2_dir())
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval().to(device)
    n_layers = model.config.num_hidden_layers
    layers = args.layers or list(range(0, n_layers, 4))
    settings = dict(SALA if args.sala else SMOLLM2)
    print(f"model {args.model}; T={args.T}; layers {layers}; settings {settings}", flush=True)
    rows = []
    for kind, ids in texts(args.T, tok).items():
        qk = capture_qk(model, ids, layers)
        for layer, (q, k) in qk.items():
            row = {"data": kind, "layer": layer}
            for tq in SHARE:
                row[f"share x{tq}"] = block_overlap(q, k, tq, settings)
            if args.time:
                row.update(time_share(q, k, settings))
            rows.append(row)
            print(row, flush=True)
    g = torch.Generator().manual_seed(0)
    q, k = next(iter(qk.values()))
    for kind, draw in (("random", lambda s: torch.randn(s, generator=g)), ("correlated", lambda s: correlated(s, g))):
        row = {"data": kind, "layer": "-"}
        qs, ks = draw(tuple(q.shape)).to(device), draw(tuple(k.shape)).to(device)
        for tq in SHARE:
            row[f"share x{tq}"] = block_overlap(qs, ks, tq, settings)
        if args.time:
            row.update(time_share(qs, ks, settings))
        rows.append(row)
        print(row, flush=True)
    keys = ["data", "layer"] + [f"share x{tq}" for tq in SHARE]
    keys += ["x1 ms", "x4 ms", "x4 gain", "dense ms"] if args.time else []
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "T": args.T, "settings": settings, "rows": rows},
                                       indent=1))


if __name__ == "__main__":
    main()
