"""What each loss trains, as modules DeepSpeed wraps: ``forward(input_ids, position_ids, labels)`` returns
(sum of the loss over this micro-batch's targets, detached statistics). A sequence shard (sequence
parallelism) comes with ``shift_labels`` (each position's own target) instead of ``labels``. Every stage keeps
the trained model under ``.student`` with the hybrid's parameter names; a frozen teacher is held outside the
module tree (it is placed, or sharded under ZeRO-3, separately) and never trained.

    AlignStage   loss mse_align: one Lightning layer per attention layer of the dense teacher, fed the
                 teacher's own input to that layer (the input_layernorm output, its RoPE and document
                 layout), regressing that layer's attention output; all layers in one teacher forward
    DistillStage loss kl: KL(teacher ‖ student) on next-token distributions, chunked
    LMStage      loss lm: next-token cross-entropy, chunked
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..data import IGNORE, num_targets
from ..errors import UserError
from ..hf_checkpoint import CheckpointDir
from ..models import SalaHybridConfig, SalaHybridForCausalLM
from ..models.loading import dense_config, load_dense_as_hybrid
from ..models.modeling_sala_hybrid import LightningAttention, SparseAttention
from .profile import phase

log = logging.getLogger(__name__)
NO_SPARSE = 1 << 62  # dense_len that keeps every query dense


def load_model(path: str, dtype: torch.dtype = torch.float32) -> SalaHybridForCausalLM:
    """A hybrid checkpoint as is, or a dense one (any supported family) with every layer full_attention, on CPU
    with parameters in ``dtype`` (buffers such as RoPE frequencies and Lightning decays stay fp32)."""
    ckpt = CheckpointDir(path)
    if ckpt.model_type == SalaHybridConfig.model_type:
        try:
            return SalaHybridForCausalLM.from_pretrained(ckpt.path, dtype=dtype)
        except ValueError as e:  # its config.json (mixer types, sparse geometry, ...) does not hold together
            raise UserError(f"{ckpt.path}: {str(e).splitlines()[0]}") from None
    return _load_dense(ckpt, dtype)


def _load_dense(ckpt: CheckpointDir, dtype: torch.dtype) -> SalaHybridForCausalLM:
    try:
        return load_dense_as_hybrid(ckpt, dtype=dtype)
    except ValueError as e:  # keys that do not match the family's layout: the user's checkpoint
        raise UserError(str(e)) from None


def disable_sparse(model: nn.Module) -> None:
    """Sparse layers attend densely at every position (dense_len = ∞); ``model.config`` keeps its dense_len,
    so a checkpoint exported afterwards selects blocks as before."""
    for m in model.modules():
        if isinstance(m, SparseAttention):
            m.sparse_params["dense_len"] = NO_SPARSE


def warn_rope(config: SalaHybridConfig, seq_len: int, what: str) -> None:
    full = [i for i, m in enumerate(config.mixer_types) if m == "full_attention"]
    trained = (config.rope_parameters or {}).get("original_max_position_embeddings") or config.max_position_embeddings
    if full and seq_len > trained:
        log.warning("trainer.seq_len=%d exceeds the %d positions the RoPE of %s's full_attention layers %s was "
                    "trained for; expect degraded quality unless its RoPE is scaled", seq_len, trained, what, full)


def enable_activation_checkpointing(model: SalaHybridForCausalLM) -> None:
    """Recompute each decoder layer in the backward pass (transformers >= 5.2x renamed the method)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def head_of(model: SalaHybridForCausalLM):
    from .losses import Head

    return Head(model.lm_head, float(model.config.logit_scale))


def predicting(h_BTH: torch.Tensor, labels_BT, shift_labels_BT) -> torch.Tensor:
    """The positions that can predict a next token: all of a shard's, all but the last of a whole row's."""
    return h_BTH if shift_labels_BT is not None else h_BTH[:, :-1]


def targets(h_BTH: torch.Tensor, labels_BT: torch.Tensor | None, shift_labels_BT: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states at positions whose next token is a target: (h [M, H], target [M], mask over
    ``predicting(h, ...)``). ``labels`` [B, T] are the row's own tokens (position i predicts labels[i + 1]);
    ``shift_labels`` [B, T] already hold each position's target."""
    shifted = shift_labels_BT if shift_labels_BT is not None else labels_BT[:, 1:]
    mask = shifted != IGNORE
    return predicting(h_BTH, labels_BT, shift_labels_BT)[mask], shifted[mask], mask


def count_targets(batch: dict) -> int:
    if "shift_labels" in batch:
        return int((batch["shift_labels"] != IGNORE).sum())
    return num_targets(batch["labels"])


class LMStage(nn.Module):
    def __init__(self, student: SalaHybridForCausalLM, chunk: int):
        super().__init__()
        self.student = student
        self.chunk = chunk

    def count(self, batch: dict) -> int:
        return count_targets(batch)

    def forward(self, input_ids, position_ids, labels=None, shift_labels=None):
        with phase("student"):
            h = self.student.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        from .losses import chunked_cross_entropy

        with phase("loss"):
            h_M, t_M, _ = targets(h, labels, shift_labels)
            return chunked_cross_entropy(h_M, t_M, head_of(self.student), self.chunk), {}


class DistillStage(nn.Module):
    def __init__(self, student: SalaHybridForCausalLM, chunk: int, temperature: float):
        super().__init__()
        self.student = student
        self.chunk, self.temperature = chunk, temperature
        self._teacher: list[SalaHybridForCausalLM] = []  # a list keeps it out of the module tree

    def attach_teacher(self, teacher: SalaHybridForCausalLM) -> None:
        if teacher.config.vocab_size != self.student.config.vocab_size:
            raise ValueError(f"teacher vocabulary {teacher.config.vocab_size} != student vocabulary "
                             f"{self.student.config.vocab_size}")
        self._teacher[:] = [teacher]

    def count(self, batch: dict) -> int:
        return count_targets(batch)

    def forward(self, input_ids, position_ids, labels=None, shift_labels=None):
        from .losses import chunked_kl

        teacher = self._teacher[0]
        with phase("student"):
            h = self.student.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        with phase("teacher"), torch.no_grad():
            ht = teacher.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        with phase("loss"):
            hs_M, t_M, mask = targets(h, labels, shift_labels)
            ht_M = predicting(ht, labels, shift_labels)[mask]
            kl, ce = chunked_kl(hs_M, ht_M, t_M, head_of(self.student), head_of(teacher), self.chunk,
                                self.temperature)
        return kl, {"kl": kl.detach(), "lm_loss": ce}


class _Attn(nn.Module):
    def __init__(self, attn: nn.Module):
        super().__init__()
        self.self_attn = attn


class AlignStage(nn.Module):
    """``student.model.layers[i].self_attn`` is layer i's Lightning replacement (names as in the hybrid)."""

    def __init__(self, teacher: SalaHybridForCausalLM, base: CheckpointDir):
        super().__init__()
        from ..convert.transfer import transfer_attention

        n = teacher.config.num_hidden_layers
        self.hybrid_config = dense_config(base, mixer_types=["linear_attention"] * n)
        layers = []
        for i, layer in enumerate(teacher.model.layers):
            attn = LightningAttention(self.hybrid_config, i)
            dense = {k: v.detach().float() for k, v in layer.self_attn.state_dict().items()}
            attn.load_state_dict(transfer_attention("linear_attention", dense, self.hybrid_config))
            layers.append(_Attn(attn))
        self.student = nn.Module()
        self.student.model = nn.Module()
        self.student.model.layers = nn.ModuleList(layers)
        self._teacher: list[SalaHybridForCausalLM] = []
        self._captured: dict[int, tuple] = {}
        self._hooks: list = []

    def attach_teacher(self, teacher: SalaHybridForCausalLM) -> None:
        for h in self._hooks:
            h.remove()
        self._teacher[:] = [teacher]
        self._hooks = [layer.self_attn.register_forward_hook(self._capture(i))
                       for i, layer in enumerate(teacher.model.layers)]

    def _capture(self, i: int):
        def hook(module, args, output):
            self._captured[i] = (args[0], args[1], args[2], output)

        return hook

    def count(self, batch: dict) -> int:
        return batch["input_ids"].numel()

    def forward(self, input_ids, position_ids, labels=None, shift_labels=None):
        self._captured.clear()
        with phase("teacher"), torch.no_grad():
            self._teacher[0].model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        per_layer = []
        with phase("student"):
            for i, layer in enumerate(self.student.model.layers):
                x, rope, seq, target = self._captured[i]
                out = layer.self_attn(x, rope, seq, None)
                per_layer.append((out.float() - target.float()).pow(2).mean(-1).sum())
        self._captured.clear()
        per_layer = torch.stack(per_layer)
        return per_layer.sum(), {"layer_mse": per_layer.detach()}


def base_has_qk_norm(stage: nn.Module) -> bool:
    cfg = stage.hybrid_config if isinstance(stage, AlignStage) else stage.student.config
    return bool(cfg.qk_norm)


def mixer_types(stage: nn.Module) -> list[str]:
    cfg = stage.hybrid_config if isinstance(stage, AlignStage) else stage.student.config
    return list(cfg.mixer_types)
