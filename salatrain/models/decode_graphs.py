"""Token-by-token decoding of a SalaHybridForCausalLM with the work between attention calls replayed as CUDA graphs.

At batch 1 a decoded token costs the host more than the GPU: every norm, projection, gate and Lightning step is
a kernel launch of a few microseconds of GPU work, and the host pays ~10-20 us to dispatch each (a 1B hybrid
decodes at ~17 ms a token on an H200 whose kernels take ~2-4 ms; bench/decode_profile.py). Lightning layers
have a fixed-size state, so everything a decoding step does is shape-static except the softmax-type layers'
attention over a growing cache. ``GraphDecoder`` cuts the step at those calls: each run of layers between
two of them (embedding and RoPE tables first, final norm, head and greedy argmax last) is one CUDA graph; the
cache append and ``attend`` of sparse and full-attention layers run eagerly between the graphs, on the same
code as the model's forward (``prepare`` / ``attend`` / ``finish``), so the tokens are the model's own.

    dec, token = GraphDecoder.from_prompt(model, input_ids)   # prefill; the first greedy token [B, 1]
    for _ in range(n):
        token = dec.step()                      # the next greedy token [B, 1]; dec.cache stays the model's cache

(``GraphDecoder(model, cache, token)`` continues a prefill made otherwise: its SalaHybridCache and first token.)

Off CUDA (or with ``graphs=False``) the same pieces run eagerly: tests/test_decode_graphs.py holds that path to
the model's forward on the CPU, and the captured one to it on a GPU. Scope: rows without padding (a prefill of
equal-length prompts), eval mode, RoPE other than the dynamic kinds (``GraphDecoder.unsupported``).
``generate`` on CUDA uses it through ``sample`` below (transformers' decoding loop with these steps);
`salatrain bench`, bench/decode_gpu.py and bench/generate_gpu.py time it beside transformers' loop.
"""
from __future__ import annotations

import torch
from transformers import GenerationMixin

from .modeling_sala_hybrid import SalaHybridCache, SalaHybridForCausalLM, SeqInfo


class GraphDecoder:
    def __init__(self, model: SalaHybridForCausalLM, cache: SalaHybridCache, token: torch.Tensor,
                 graphs: bool | None = None, warmup: int = 2):
        inner = model.model
        if model.training:
            raise ValueError("GraphDecoder needs the model in eval mode (model.eval())")
        if not isinstance(cache, SalaHybridCache) or cache.seen_tokens == 0:
            raise ValueError("GraphDecoder continues a prefill: pass the SalaHybridCache it returned")
        why = self.unsupported(model)
        if why:
            raise ValueError(f"GraphDecoder cannot decode this model: {why}; decode with generate()")
        self.model, self.inner, self.cache = model, inner, cache
        device = token.device
        self.graphs = device.type == "cuda" if graphs is None else graphs
        if self.graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA model")
        self.ids = token.detach().clone().long()  # the static inputs: the token and its position
        self.pos = torch.full_like(self.ids, cache.seen_tokens)
        # pieces: run i covers layers[bounds[i]:bounds[i+1]]; every boundary but the last is a softmax-type layer
        # whose prepare ends run i and whose attend (eager) and finish (run i+1) follow
        cuts = [i for i, layer in enumerate(inner.layers) if layer.mixer_type != "linear_attention"]
        self.cuts = cuts
        self._graphs: list[torch.cuda.CUDAGraph] | None = None
        self._out: list[dict] = []
        self._attn_in: torch.Tensor | None = None
        self._warmup = warmup if self.graphs else 0
        self.setup_steps = self._warmup + 1 if self.graphs else 0  # eager warm-up steps, then the capturing one

    @staticmethod
    def unsupported(model) -> str | None:
        """Why this model's decoding steps cannot be captured, or None. RoPE whose frequencies follow the longest
        position seen (dynamic NTK, LongRoPE) changes on the host between steps; every other type is fixed."""
        rope_type = (getattr(model.config, "rope_parameters", None) or {}).get("rope_type", "default")
        if "dynamic" in rope_type or rope_type == "longrope":
            return f"RoPE type {rope_type!r} updates its frequencies on the host"
        return None

    @classmethod
    @torch.no_grad()
    def from_prompt(cls, model: SalaHybridForCausalLM, input_ids: torch.Tensor, **kw) -> tuple[GraphDecoder,
                                                                                               torch.Tensor]:
        """Prefill input_ids [B, T] (rows without padding) through the model; returns (decoder, first greedy token
        [B, 1]); ``decoder.step()`` gives the ones after it."""
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        token = out.logits[:, -1:].argmax(-1)
        return cls(model, cache, token, **kw), token

    # ------------------------------------------------------------------------------------------------ the pieces
    def _seq(self) -> SeqInfo:
        return SeqInfo(self.pos, self.cache.seen_tokens)

    def _layers(self, h, lo: int, hi: int, rope, seq, resume=None):
        """Layers lo..hi-1 from the residual stream h; with resume = (x, o), layer lo starts at its finish (its
        mixer's input x, kept from the run before, and attend's output o); a softmax-type layer hi stops after
        its prepare. Returns the state the next eager part needs."""
        layers = self.inner.layers
        for i in range(lo, hi):
            layer = layers[i]
            if i == lo and resume is not None:
                h = layer.add_mixer_and_mlp(h, layer.self_attn.finish(*resume))
            else:
                h = layer(h, rope, seq, self.cache)
        if hi < len(layers):
            x = layers[hi].input_layernorm(h)
            q, k, v = layers[hi].self_attn.prepare(x, rope, seq)
            return {"h": h, "x": x, "q": q, "k": k, "v": v}
        h = self.inner.norm(h)
        if self.model.config.logit_scale != 1.0:
            h = h * self.model.config.logit_scale
        logits = self.model.lm_head(h)
        return {"token": logits.argmax(-1), "logits": logits}

    def _head(self):
        """Piece 0: embedding, RoPE tables of the new position, then the layers up to the first cut."""
        h = self.inner.embed_tokens(self.ids)
        if self.model.config.scale_emb != 1.0:
            h = h * self.model.config.scale_emb
        rope = self.inner.rotary_emb(h, self.pos)
        out = self._layers(h, 0, self._bound(0), rope, self._seq())
        return {**out, "rope": rope}

    def _bound(self, piece: int) -> int:
        return self.cuts[piece] if piece < len(self.cuts) else len(self.inner.layers)

    def _piece(self, piece: int, prev: dict, rope, attn_out):
        """Piece `piece` > 0: the cut layer's finish from attend's output, then the layers up to the next cut."""
        return self._layers(prev["h"], self.cuts[piece - 1], self._bound(piece), rope, self._seq(),
                            resume=(prev["x"], attn_out))

    def _attend(self, piece: int, prev: dict) -> torch.Tensor:
        """The eager part after piece `piece`: the softmax-type layer's cache append and attention."""
        mixer = self.inner.layers[self.cuts[piece]].self_attn
        k, v = self.cache.append_kv(mixer.layer_idx, prev["k"], prev["v"])
        return mixer.attend(prev["q"], k, v, self._seq())

    # --------------------------------------------------------------------------------------------------- a step
    def _eager_step(self) -> dict:
        out = self._head()
        rope = out["rope"]
        for piece in range(1, len(self.cuts) + 1):
            o = self._attend(piece - 1, out)
            out = self._piece(piece, out, rope, o)
        return out

    def _run(self) -> dict:
        """The model on the current token (self.ids at self.pos): the last piece's outputs (token, logits)."""
        if self._warmup > 0 or not self.graphs:
            out = self._eager_step()
            self._warmup -= 1
        elif self._graphs is None:
            out = self._capture_step()
        else:
            out = self._replay_step()
        self.cache.seen_tokens += 1
        self.pos.add_(1)
        return out

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Decode one token: the greedy next token [B, 1] after the current one (the cache grows by one)."""
        token = self._run()["token"]
        self.ids.copy_(token)
        return token.clone()

    @torch.no_grad()
    def logits(self, token: torch.Tensor) -> torch.Tensor:
        """Feed ``token`` [B, 1] (the token chosen after the previous step, e.g. sampled) and return the logits of
        the one after it, [B, V] in float32 (the cache grows by one)."""
        self.ids.copy_(token.reshape(self.ids.shape))
        return self._run()["logits"][:, -1].to(torch.float32, copy=True)  # the graph's buffer is reused

    def _static_states(self):
        """Lightning states the graphs read and write in place: the cache keeps these tensors."""
        for i, s in enumerate(self.cache.states):
            if s is not None:
                self.cache.states[i] = s.clone()
        return list(self.cache.states)

    def _keep_states(self, static):
        """After a capture: copy each new state into its static tensor (in the graph) and keep the static one."""
        for i, s in enumerate(static):
            if s is not None and self.cache.states[i] is not s:
                s.copy_(self.cache.states[i])
                self.cache.states[i] = s

    def _capture_step(self) -> torch.Tensor:
        """Capture each piece, replay it (capturing runs nothing), and run the eager parts between them."""
        static = self._static_states()
        pool = torch.cuda.graph_pool_handle()
        graphs, outs = [], []
        torch.cuda.synchronize()
        for piece in range(len(self.cuts) + 1):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                if piece == 0:
                    out = self._head()
                else:
                    out = self._piece(piece, outs[-1], outs[0]["rope"], self._attn_in)
                self._keep_states(static)
            g.replay()
            graphs.append(g)
            outs.append(out)
            if piece < len(self.cuts):  # one static buffer serves every cut: the pieces run one after another
                o = self._attend(piece, out)
                if self._attn_in is None:
                    self._attn_in = torch.empty_like(o)
                self._attn_in.copy_(o)
        self._graphs, self._out = graphs, outs
        return outs[-1]

    def _replay_step(self) -> torch.Tensor:
        outs = self._out
        for piece, g in enumerate(self._graphs):
            g.replay()
            if piece < len(self.cuts):
                self._attn_in.copy_(self._attend(piece, outs[piece]))
        return outs[-1]


# ------------------------------------------------------------------------------------------------ generate


def sample_unsupported(model, input_ids: torch.Tensor, generation_config, synced_gpus: bool,
                       model_kwargs: dict) -> str | None:
    """Why ``sample`` hands this call to transformers' own loop, or None."""
    why = GraphDecoder.unsupported(model)
    if why:
        return why
    mask = model_kwargs.get("attention_mask")
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    pos = model_kwargs.get("position_ids")
    unknown = set(model_kwargs) - {"attention_mask", "cache", "past_key_values", "use_cache", "output_attentions",
                                   "output_hidden_states", "logits_to_keep", "position_ids"}
    checks = [
        (model.training, "the model is in training mode"),
        (synced_gpus, "synced_gpus"),
        (not model_kwargs.get("use_cache", True), "use_cache=False"),
        (generation_config.return_dict_in_generate, "return_dict_in_generate"),
        (getattr(generation_config, "prefill_chunk_size", None), "prefill_chunk_size"),
        (mask is not None and not bool(mask.all()), "padded rows (an attention mask with zeros)"),
        (pos is not None and not torch.equal(pos, torch.arange(pos.shape[-1], device=pos.device).expand_as(pos)),
         "position_ids other than 0, 1, 2, ..."),
        (cache is not None and (not isinstance(cache, SalaHybridCache) or cache.seen_tokens > 0),
         "a cache passed in"),
        (unknown, f"model inputs {sorted(unknown)}"),
    ]
    return next((what for bad, what in checks if bad), None)


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, logits_processor, stopping_criteria, generation_config,
           synced_gpus: bool = False, streamer=None, **model_kwargs) -> torch.Tensor:
    """transformers' greedy / multinomial decoding loop (``GenerationMixin._sample``: the same logits processors,
    stopping criteria, padding after EOS and streamer calls) with the decoding steps run by ``GraphDecoder``.
    ``SalaHybridForCausalLM.generate`` uses it on CUDA; ``model.generate(..., custom_generate=sample)`` asks for it
    anywhere (off CUDA the pieces run eagerly). Calls it does not cover (``sample_unsupported``: padded rows,
    ``return_dict_in_generate``, a cache passed in, ...) go to transformers' loop."""
    if sample_unsupported(model, input_ids, generation_config, synced_gpus, model_kwargs) is not None:
        return GenerationMixin._sample(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                       synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
    pad = generation_config._pad_token_tensor
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    out = model(input_ids=input_ids, use_cache=True, cache=cache, logits_to_keep=1)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    logits = out.logits[:, -1].to(torch.float32, copy=True)
    del out
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    dec = None
    while True:
        scores = logits_processor(input_ids, logits)
        if generation_config.do_sample:
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            token = scores.argmax(-1)
        if has_eos:
            token = token * unfinished + pad.to(token.device) * (1 - unfinished)
        input_ids = torch.cat([input_ids, token[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(token.cpu())
        unfinished = unfinished & ~stopping_criteria(input_ids, scores)
        if unfinished.max() == 0:
            break
        if dec is None:
            dec = GraphDecoder(model, cache, token[:, None])
        logits = dec.logits(token[:, None])
    if streamer is not None:
        streamer.end()
    return input_ids
