"""The layer sweep: swap one layer at a time to its aligned Lightning mixer and measure R_i and C_i.

Built-in metrics (default):
    R_i  retrieval: the probes' mean answer log-probability (mean over samples per task, then over tasks), or
         their greedy exact match (``retrieval_metric=exact_match``)
    C_i  general ability: −(mean next-token loss) on held-out text
Layers before i are unchanged, so the hidden states entering every layer are computed once per sequence
(one forward of the dense model) and layer i's run starts from the cached input of layer i: the sweep costs
L·(L+1)/2 layer passes per token, about (L+1)/2 full forwards, instead of L.

With lm-eval tasks (``retrieval_tasks`` / ``commonsense_tasks``) each swap is a full evaluation by lm-eval.

Layer i's aligned mixer comes from the align stage's output (:class:`AlignedLayers`): an HF checkpoint whose
config has every layer ``linear_attention`` and whose ``model.layers.{i}.self_attn.*`` tensors are layer i's
aligned Lightning mixer, plus ``align_report.json`` (``base_fingerprint``: the dense base it was aligned from).
:func:`run_sweep` loads the dense base and the align output, builds the probe batch and the held-out text, and
returns per-layer metrics (:class:`LayerMetrics`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..eval import lm_eval_adapter
from ..eval.loading import resolve_device, resolve_dtype
from ..eval.probes import ProbeSample, make_samples
from ..eval.scoring import answer_scores, hidden_to_logprobs
from ..eval.text import builtin_documents, read_documents, token_windows
from ..hf_checkpoint import CheckpointDir
from ..models import SalaHybridConfig
from ..models.modeling_sala_hybrid import LightningAttention, SeqInfo
from .config import SelectConfig

log = logging.getLogger(__name__)
_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "vocab_size")


class AlignedLayers:
    """Validated align output; ``layer(i)`` builds layer i's aligned ``LightningAttention``."""

    def __init__(self, path: str, base: CheckpointDir, base_config: SalaHybridConfig):
        self.ckpt = CheckpointDir(path, what="aligned")
        self.report = self._check_report(base)
        try:
            self.config = SalaHybridConfig.from_pretrained(self.ckpt.path)
        except (ValueError, TypeError, OSError) as e:
            raise UserError(f"{self.ckpt.path}: not a salatrain hybrid checkpoint ({str(e).splitlines()[0]})") from None
        mixers = self.config.mixer_types
        if self.ckpt.model_type != "sala_hybrid" or any(m != "linear_attention" for m in mixers):
            raise UserError(f"{self.ckpt.path} is not an align output (expected every layer linear_attention)")
        for key in _SHAPE_KEYS:
            if getattr(self.config, key) != getattr(base_config, key):
                raise UserError(f"aligned {key}={getattr(self.config, key)} does not match the base model's "
                                f"{getattr(base_config, key)}")

    def _check_report(self, base: CheckpointDir) -> dict:
        path = self.ckpt.path / "align_report.json"
        if not path.is_file():
            log.warning("%s has no align_report.json; cannot check it was aligned from %s", self.ckpt.path, base.path)
            return {}
        try:
            report = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        fp = report.get("base_fingerprint")
        if fp and fp != base.fingerprint():
            raise UserError(f"{self.ckpt.path} was aligned from a different base model than {base.path} "
                            f"(fingerprint {fp} != {base.fingerprint()})")
        return report

    def layer(self, i: int, dtype: torch.dtype, device: torch.device) -> LightningAttention:
        prefix = f"model.layers.{i}.self_attn."
        keys = [k for k in self.ckpt.key_files() if k.startswith(prefix)]
        with self.ckpt.reader() as r:
            state = {k[len(prefix):]: r.get(k) for k in keys}
        mixer = LightningAttention(self.config, i)
        missing, unexpected = mixer.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(f"{self.ckpt.path}: layer {i} Lightning weights do not match (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
        return mixer.to(device=device, dtype=dtype).eval()


@dataclass
class LayerMetrics:
    retrieval: list[float] | None
    commonsense: list[float] | None
    baseline: dict | None
    source: dict
    cost: dict
    raw: dict | None = None  # metrics.json to write (sweep mode)
    gains: tuple[list, list] | None = None  # method=stepwise: (R gain, C gain) per layer when restored


@dataclass
class Metrics:
    """What one model variant (baseline or layer i swapped) scores."""

    retrieval: float
    commonsense: float
    detail: dict = field(default_factory=dict)


@dataclass
class SweepResult:
    baseline: Metrics
    layers: list[Metrics]
    cost: dict


@contextlib.contextmanager
def swapped(model, i: int, mixer: torch.nn.Module):
    """Layer i of ``model`` (the hybrid class) uses ``mixer`` inside the block; restored afterwards."""
    layer = model.model.layers[i]
    original = layer.self_attn
    layer.self_attn = mixer
    try:
        yield model
    finally:
        layer.self_attn = original


class ActivationCache:
    """The hidden states entering every layer of the unswapped model, for one sequence [1, T]."""

    def __init__(self, model, ids: torch.Tensor):
        inner = model.model
        h = inner.embed_tokens(ids)
        if model.config.scale_emb != 1.0:
            h = h * model.config.scale_emb
        pos = torch.arange(ids.shape[1], device=ids.device).view(1, -1)
        self.seq = SeqInfo(pos)
        self.rope = inner.rotary_emb(h, pos)
        self.inputs: list[torch.Tensor] = []
        for layer in inner.layers:
            self.inputs.append(h)
            h = layer(h, self.rope, self.seq, None)
        self.final = inner.norm(h)

    def run_from(self, model, i: int) -> torch.Tensor:
        """Final normed hidden states when layers i.. run again (layer i as it is now in ``model``)."""
        h = self.inputs[i]
        for layer in model.model.layers[i:]:
            h = layer(h, self.rope, self.seq, None)
        return model.model.norm(h)


@torch.no_grad()
def probe_metrics(model, h_final: torch.Tensor, sample: ProbeSample) -> tuple[float, bool]:
    start = len(sample.prompt_ids) - 1
    h = h_final[0, start : start + len(sample.answer_ids)]
    scale = getattr(model.config, "logit_scale", 1.0)
    logits = model.get_output_embeddings()(h * scale if scale != 1.0 else h)
    return answer_scores(logits, torch.tensor(sample.answer_ids, device=logits.device))


@torch.no_grad()
def text_loss(model, h_final: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    lp = hidden_to_logprobs(model, h_final[:, :-1], ids[:, 1:])
    return float(-lp.sum()), lp.numel()


def metrics_of(model, finals: list[torch.Tensor], samples, windows: list[torch.Tensor],
               retrieval_metric: str) -> Metrics:
    """Metrics from the final hidden states of the probe samples, then of the text windows (ids [1, T])."""
    by_task: dict[str, list[tuple[float, bool]]] = {}
    for h, s in zip(finals[: len(samples)], samples):
        by_task.setdefault(s.task, []).append(probe_metrics(model, h, s))
    task_lp = {t: sum(v[0] for v in vals) / len(vals) for t, vals in by_task.items()}
    task_em = {t: sum(v[1] for v in vals) / len(vals) for t, vals in by_task.items()}
    loss_sum, count = 0.0, 0
    for h, w in zip(finals[len(samples):], windows):
        total, n = text_loss(model, h, w)
        loss_sum, count = loss_sum + total, count + n
    lm_loss = loss_sum / count if count else math.nan
    per_task = task_em if retrieval_metric == "exact_match" else task_lp
    retrieval = sum(per_task.values()) / len(per_task) if per_task else math.nan
    detail = {"answer_logprob": task_lp, "exact_match": task_em, "lm_loss": lm_loss}
    return Metrics(retrieval=retrieval, commonsense=-lm_loss, detail=detail)


@torch.no_grad()
def sweep(model, aligned: AlignedLayers, samples: list[ProbeSample], windows: list[list[int]],
          retrieval_metric: str = "answer_logprob", device: torch.device | str = "cpu") -> SweepResult:
    """Swap each layer in turn (built-in metrics); ``model`` is the dense model as the hybrid class. Without
    samples R is NaN, without windows C is NaN (those come from lm-eval then)."""
    if not samples and not windows:
        raise ValueError("the sweep needs probe samples or text windows")
    t0 = time.time()
    dtype = next(model.parameters()).dtype
    seqs = [torch.tensor([s.prompt_ids + s.answer_ids], device=device) for s in samples]
    seqs += [torch.tensor([w], device=device) for w in windows]
    caches = [ActivationCache(model, ids) for ids in seqs]
    texts = seqs[len(samples):]
    baseline = metrics_of(model, [c.final for c in caches], samples, texts, retrieval_metric)
    log.info("sweep: baseline R %.4f, C %.4f (%d sequences, %d tokens, %.1f s)", baseline.retrieval,
             baseline.commonsense, len(seqs), sum(s.shape[1] for s in seqs), time.time() - t0)
    num_layers = len(model.model.layers)
    layers = []
    for i in range(num_layers):
        t = time.time()
        with swapped(model, i, aligned.layer(i, dtype, device)):
            finals = [c.run_from(model, i) for c in caches]
            layers.append(metrics_of(model, finals, samples, texts, retrieval_metric))
        log.info("sweep: layer %d/%d linear: R %.4f, C %.4f (%.1f s)", i, num_layers - 1, layers[-1].retrieval,
                 layers[-1].commonsense, time.time() - t)
    tokens = sum(s.shape[1] for s in seqs)
    passes = tokens * (num_layers + num_layers * (num_layers + 1) // 2)
    cost = {"tokens": tokens, "sequences": len(seqs), "layer_token_passes": passes,
            "full_forward_equivalents": round(passes / (tokens * num_layers), 2), "seconds": round(time.time() - t0, 1)}
    return SweepResult(baseline, layers, cost)


def lm_eval_sweep(model, tokenizer, aligned: AlignedLayers, retrieval_tasks: list[str], commonsense_tasks: list[str],
                  builtin: SweepResult | None, **lm_eval_kwargs) -> SweepResult:
    """R and/or C from lm-eval tasks (mean headline metric); a metric without tasks comes from ``builtin``."""
    t0 = time.time()
    tasks = list(dict.fromkeys([*retrieval_tasks, *commonsense_tasks]))
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device

    def measure(i: int | None) -> Metrics:
        res = lm_eval_adapter.run_tasks(model, tokenizer, tasks, **lm_eval_kwargs)
        ref = None
        if builtin is not None:
            ref = builtin.baseline if i is None else builtin.layers[i]
        r = lm_eval_adapter.mean_primary(res, retrieval_tasks) if retrieval_tasks else ref.retrieval
        c = lm_eval_adapter.mean_primary(res, commonsense_tasks) if commonsense_tasks else ref.commonsense
        return Metrics(r, c, {"lm_eval": res})

    baseline = measure(None)
    layers = []
    for i in range(len(model.model.layers)):
        with swapped(model, i, aligned.layer(i, dtype, device)):
            layers.append(measure(i))
        log.info("sweep (lm-eval): layer %d linear: R %.4f, C %.4f", i, layers[-1].retrieval, layers[-1].commonsense)
    cost = dict(builtin.cost) if builtin is not None else {}
    cost["lm_eval_runs"] = len(layers) + 1
    cost["seconds"] = round(cost.get("seconds", 0.0) + time.time() - t0, 1)
    return SweepResult(baseline, layers, cost)


@dataclass
class SweepInputs:
    """What a sweep reads: the dense base (as the hybrid class, on the sweep's device), its aligned layers, the
    probe samples and the held-out windows."""

    base: CheckpointDir
    aligned: AlignedLayers
    tok: object
    samples: list
    windows: list
    device: torch.device
    model: torch.nn.Module

    @classmethod
    def load(cls, cfg: SelectConfig) -> "SweepInputs":
        from ..hf_checkpoint import load_tokenizer
        from ..models.loading import dense_config, load_dense_as_hybrid

        s = cfg.sweep
        base = CheckpointDir(cfg.model)
        aligned = AlignedLayers(cfg.aligned, base, dense_config(base))
        tok = load_tokenizer(base.path)
        samples, windows = probe_batch(tok, cfg), heldout_windows(tok, cfg)
        device = resolve_device(s.device)
        model = load_dense_as_hybrid(base, dtype=resolve_dtype(s.dtype, device)).to(device)
        return cls(base, aligned, tok, samples, windows, device, model)

    def source(self, cfg: SelectConfig, mode: str) -> dict:
        """How R and C were measured, and from which models (layer_plan.json's ``source``)."""
        s = cfg.sweep
        return {
            "mode": mode, "model": str(self.base.path), "model_fingerprint": self.base.fingerprint(),
            "aligned": str(self.aligned.ckpt.path), "align_report": self.aligned.report or None,
            "retrieval": (f"lm-eval {list(s.retrieval_tasks)} (mean headline metric)" if s.retrieval_tasks else
                          f"probes {list(s.probes.tasks)} at {list(s.probes.lengths)} tokens, "
                          f"{s.probes.num_samples} samples each, seed {s.probes.seed}: mean {s.retrieval_metric}"),
            "commonsense": (f"lm-eval {list(s.commonsense_tasks)} (mean headline metric)" if s.commonsense_tasks
                            else f"-(LM loss) on {len(self.windows)} held-out windows of {s.text.seq_len} tokens "
                                 f"({', '.join(s.text.files) or 'built-in ' + s.text.builtin})"),
        }


def run_sweep(cfg: SelectConfig):
    s = cfg.sweep
    inp = SweepInputs.load(cfg)
    builtin = None
    if not (s.retrieval_tasks and s.commonsense_tasks):
        builtin = sweep(inp.model, inp.aligned, inp.samples, inp.windows, s.retrieval_metric, inp.device)
    result = builtin
    if s.retrieval_tasks or s.commonsense_tasks:
        result = lm_eval_sweep(inp.model, inp.tok, inp.aligned, list(s.retrieval_tasks), list(s.commonsense_tasks),
                               builtin, limit=s.lm_eval_limit, num_fewshot=s.lm_eval_num_fewshot)
    return LayerMetrics([m.retrieval for m in result.layers], [m.commonsense for m in result.layers],
                        {"retrieval": result.baseline.retrieval, "commonsense": result.baseline.commonsense},
                        inp.source(cfg, "sweep"), result.cost, raw=_raw(result))


def probe_batch(tok, cfg: SelectConfig) -> list:
    p = cfg.sweep.probes
    if cfg.sweep.retrieval_tasks:
        return []
    try:
        return [x for task in p.tasks for n in p.lengths for x in make_samples(tok, task, int(n), p.num_samples, p.seed)]
    except ValueError as e:
        raise UserError(str(e)) from None


def heldout_windows(tok, cfg: SelectConfig) -> list[list[int]]:
    t = cfg.sweep.text
    if cfg.sweep.commonsense_tasks:
        return []
    docs = read_documents(list(t.files), t.text_field) if t.files else [d for _, d in builtin_documents(t.builtin)]
    return token_windows(tok, docs, t.seq_len, t.max_tokens)


def _raw(result: SweepResult) -> dict:
    layers = {str(i): {"retrieval": m.retrieval, "commonsense": m.commonsense, **m.detail}
              for i, m in enumerate(result.layers)}
    base = result.baseline
    return {"layers": layers, "baseline": {"retrieval": base.retrieval, "commonsense": base.commonsense,
                                           **base.detail}, "cost": result.cost}
