"""Memory estimates, checked before long sequences run (eval and select lengths, training rows).

The estimates count what dominates and err low, so a refusal means the run could not fit: the message says how
much memory it needs, how much is available and which length would fit. Per token, a forward without
gradients holds one layer's activations at a time (hidden states, q/k/v, the MLP's intermediate; Lightning
layers add their fp32 intra-chunk scores), keys and values when fed through the cache in chunks, and full
vocabulary logits for a model outside salatrain. Probe prompts are Python tuples until scored (~24 bytes per
token), all of them generated before the first model runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError
from .hf_checkpoint import CheckpointDir

GiB = 2**30
PROBE_BYTES_PER_TOKEN = 24  # tuple + list of references to cached ints, int64 tensor when scored
TEXT_BYTES_PER_TOKEN = 36  # token ids from a tokenizer: a Python int each plus the list's reference


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need from a checkpoint's config.json and safetensors headers."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    linear_layers: int  # Lightning layers
    kv_layers: int  # layers that keep keys and values (sparse, full attention)
    chunk: int  # Lightning chunk length
    params: int
    salatrain: bool  # the hybrid class (its heads run in chunks) or a dense family loaded as it

    @classmethod
    def of(cls, ckpt: CheckpointDir, salatrain: bool = True) -> "ModelShape":
        c = ckpt.config
        hidden = int(c.get("hidden_size", 0) or 0)
        heads = int(c.get("num_attention_heads", 1) or 1)
        layers = int(c.get("num_hidden_layers", 0) or 0)
        mixers = c.get("mixer_types") or ["full_attention"] * layers
        linear = sum(m == "linear_attention" for m in mixers)
        params = 0
        for shape in ckpt.shapes().values():
            n = 1
            for s in shape:
                n *= int(s)
            params += n
        return cls(hidden=hidden, intermediate=int(c.get("intermediate_size", 4 * hidden) or 4 * hidden),
                   layers=layers, heads=heads, kv_heads=int(c.get("num_key_value_heads") or heads),
                   head_dim=int(c.get("head_dim") or hidden // heads), vocab=int(c.get("vocab_size", 0) or 0),
                   linear_layers=linear, kv_layers=len(mixers) - linear,
                   chunk=int((c.get("lightning_config") or {}).get("chunk_size", 64)), params=params,
                   salatrain=salatrain)

    def forward_per_token(self, dtype_bytes: int) -> float:
        """Bytes per token of one forward without gradients (one layer's activations at a time)."""
        b = dtype_bytes
        act = b * (4 * self.hidden + 3 * self.intermediate + 2 * (self.heads + 2 * self.kv_heads) * self.head_dim)
        if self.linear_layers:
            act += 4 * (self.heads * self.chunk + 4 * self.heads * self.head_dim)
        if not self.salatrain:
            act += 8 * self.vocab  # fp32 logits and their log-softmax over the whole sequence
        return act

    def kv_per_token(self, dtype_bytes: int) -> float:
        return self.kv_layers * 2 * self.kv_heads * self.head_dim * dtype_bytes


def available_bytes(device: torch.device) -> int:
    """Free memory where tensors of ``device`` live (GPU memory, or the host's available RAM)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


@dataclass
class Need:
    """fixed + per_token × length bytes, itemised for the message."""

    key: str  # the setting whose length is checked, e.g. "probes.lengths"
    length: int
    fixed: dict[str, float]
    per_token: dict[str, float]
    hint: str = ""

    @property
    def total(self) -> float:
        return sum(self.fixed.values()) + self.length * sum(self.per_token.values())

    def check(self, available: int, where: str) -> None:
        if self.total <= available:
            return
        parts = {**self.fixed, **{k: v * self.length for k, v in self.per_token.items()}}
        detail = ", ".join(f"{k} {gib(v)}" for k, v in parts.items() if v >= 0.05 * GiB)
        room = available - sum(self.fixed.values())
        fit = int(room / sum(self.per_token.values())) if room > 0 else 0
        what = (f"{self.key} up to ~{fit} tokens fit" if fit >= 32 else
                f"not even a short sequence fits next to {gib(sum(self.fixed.values()))} of fixed costs")
        raise UserError(f"{self.key} with {self.length} tokens needs ~{gib(self.total)} of memory on {where}"
                        + (f" ({detail})" if detail else "") + f"; {gib(available)} is available: {what}"
                        + (f"; {self.hint}" if self.hint else ""))


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def check_eval_memory(models: list[ModelShape], probe_lengths: list[int], probes_per_length: int,
                      seq_lens: list[int], max_tokens: int, chunk_tokens: int | None, device: torch.device,
                      dtype: torch.dtype, keys: tuple[str, str] = ("probes.lengths", "perplexity.seq_lens")) -> None:
    """Refuse lengths whose forward (plus the probe prompts, all built up front) cannot fit."""
    lengths = [(int(n), keys[0]) for n in probe_lengths] + [(int(n), keys[1]) for n in seq_lens]
    if not lengths or not models:
        return
    longest, key = max(lengths)
    b = _dtype_bytes(dtype)
    probe_total = PROBE_BYTES_PER_TOKEN * probes_per_length * sum(probe_lengths)
    text_total = TEXT_BYTES_PER_TOKEN * max([max_tokens, *seq_lens]) if seq_lens else 0
    probe_per_token = PROBE_BYTES_PER_TOKEN * probes_per_length if key == keys[0] else 0
    shape = max(models, key=lambda m: m.params * b + m.forward_per_token(b) * longest)
    fixed = {"weights": shape.params * b, "probe prompts": probe_total - probe_per_token * longest,
             "text": text_total}
    if chunk_tokens and longest > chunk_tokens:
        fixed["activations"] = shape.forward_per_token(b) * chunk_tokens
        per_token = {"keys/values": shape.kv_per_token(b)}
        hint = ""
    else:
        per_token = {"activations": shape.forward_per_token(b)}
        hint = "chunk_tokens=<n> feeds long sequences through the cache n tokens at a time"
    per_token["probe prompts"] = probe_per_token
    where = "the GPU" if device.type == "cuda" else "this machine"
    Need(key, longest, fixed, per_token, hint).check(available_bytes(device) + _host_extra(device, fixed), where)


def _host_extra(device: torch.device, fixed: dict) -> int:
    """On a GPU the prompts and text live in host memory: do not count them against the GPU."""
    if device.type != "cuda":
        return 0
    return int(fixed.get("probe prompts", 0) + fixed.get("text", 0))


def check_sweep_memory(shape: ModelShape, lengths: list[int], text_seq_len: int, text_tokens: int,
                       device: torch.device, dtype: torch.dtype) -> None:
    """The layer sweep keeps every layer's input for every sequence: (L+1)·T·hidden per sequence."""
    b = _dtype_bytes(dtype)
    cache = (shape.layers + 1) * shape.hidden * b
    seqs = [(n, "sweep.probes.lengths") for n in lengths] + [(text_seq_len, "sweep.text.seq_len")]
    longest, key = max(seqs)
    total_tokens = sum(lengths) + max(text_tokens, text_seq_len)
    fixed = {"weights": shape.params * b * 2, "cached layer inputs": cache * (total_tokens - longest)}
    per_token = {"cached layer inputs": cache, "activations": shape.forward_per_token(b)}
    Need(key, longest, fixed, per_token).check(available_bytes(device), "the GPU" if device.type == "cuda"
                                                else "this machine")


def check_training_memory(cfg, student_config, stage: torch.nn.Module, teacher, dist) -> None:
    """A lower bound per rank: weights, gradients and AdamW states (sharded as the ZeRO stage shards them), the
    teacher, and every layer's input of the micro-batch (kept for the backward pass even with activation
    checkpointing). On CPU the weights already loaded are not counted again."""
    t = cfg.trainer
    b = 2 if t.precision == "bf16" else 4
    params = sum(p.numel() for p in stage.parameters())
    trained = sum(p.numel() for p in stage.parameters() if p.requires_grad) or params
    world, zero = dist.world_size, cfg.deepspeed.zero_stage
    states = trained * (8 + (4 if b == 2 else 0)) / (world if zero >= 1 else 1)
    grads = trained * b / (world if zero >= 2 else 1)
    weights = params * b / (world if zero == 3 else 1)
    teacher_bytes = sum(p.numel() for p in teacher.parameters()) * b if isinstance(teacher, torch.nn.Module) else 0
    cpu = dist.device.type != "cuda"
    fixed = {"optimizer states": states, "gradients": grads}
    if not cpu:
        fixed.update(weights=weights, teacher=teacher_bytes)
    hidden = int(getattr(student_config, "hidden_size", 0))
    layers = int(getattr(student_config, "num_hidden_layers", 0))
    vocab = int(getattr(student_config, "vocab_size", 0))
    fixed["logit chunk"] = 8.0 * min(t.loss_chunk_tokens, t.seq_len * t.micro_batch_size) * vocab
    split = max(1, int(getattr(t, "sequence_parallel", 1)))  # a sequence-parallel rank holds seq_len / split
    per_token = {"layer inputs": (layers + 1) * hidden * b * t.micro_batch_size / split}
    hint = ("lower trainer.micro_batch_size, turn on trainer.activation_checkpointing or use more ranks with "
            "a higher deepspeed.zero_stage")
    Need("trainer.seq_len", t.seq_len, fixed, per_token, hint).check(available_bytes(dist.device),
                                                                      "each GPU" if not cpu else "this machine")
