"""A generation engine for measurement: static caches sized for the batch, fast kernels, a CUDA-graph decode.

Teacher and hybrids run through the same engine (the teacher as an all-attention `HybridForCausalLM`),
so a throughput ratio measures the architecture, not two code paths.

- Caches, allocated once for (batch, max_length): K and V (b, h_kv, max_length, e) per attention layer in
  the model dtype; per Mamba layer the conv window (b, d_inner, d_conv) in the model dtype (it holds
  projections the model computed in that dtype, so nothing is lost) and the SSM state (b, d_inner, d_state)
  in fp32; per Gated DeltaNet layer its conv window (b, (h + 2 g) e, k) in the model dtype and its
  delta-rule state (b, h, e, e) in fp32.
- Prefill: the model's own forward (fast kernels: SDPA / flash-attn, mamba_ssm's selective scan,
  causal_conv1d) on micro-batches of sequences, logits of the last position only; the transformers
  cache it fills is copied into the static buffers.
- Decode: one token for every sequence per step. On CUDA with a 16-bit model ("fused" path,
  `decode_kernels`): residual add + RMSNorm in one kernel, RoPE applied and K/V written to the cache
  in one kernel straight from the fused QKV projection, split-K flash-decoding attention that reads
  only the cache columns filled so far (each K/V byte once, all query heads of a KV head together),
  silu(gate) * up in one kernel, and per Mamba layer one GEMM for in_proj + dt_in_proj, then the
  mixer's own `MambaMixer.step` on those projections (one Triton kernel for the rest of the step).
  Elsewhere (CPU, fp32) the same step in plain PyTorch: attention over the whole static buffer under a
  mask, the query heads of each KV head folded into the query rows so K/V are never expanded, and
  `MambaMixer.step` (causal_conv1d_update + selective_state_update where installed). Both paths, and
  `generate()`, run the one Mamba step (`kernels.mamba_decode_step`). Gated DeltaNet layers run their
  mixer's own `GatedDeltaNetMixer.step` on both paths (fla-core's fused recurrent kernel on CUDA, PyTorch
  elsewhere). On CUDA the step is captured once in a CUDA graph and replayed.
- Left-padded prompts are supported (padding masked in attention, zeroed in Mamba states), so the
  `evaluate` stage uses the engine for answers as well as for speed (`generate(..., eos_token_id=)` stops
  once every sequence has written its end-of-sequence token).
- The engine copies what it fuses (q/k/v, gate/up, in_proj/dt_in_proj weights) into its own buffers and
  leaves the model as it found it: same parameters, same storage, same train/eval mode.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from pipeline.evaluate import decode_kernels
from pipeline.model.config import ATTENTION, GDN, MAMBA
from pipeline.model.cache import MambaCacheView, RecurrentCacheView


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # (b, new_tokens) generated ids
    prefill_s: float
    decode_s: float
    batch_size: int
    prompt_length: int
    new_tokens: int

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second over the whole call (prefill + decode)."""
        return self.batch_size * self.new_tokens / (self.prefill_s + self.decode_s)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(self.new_tokens - 1, 1)
        return self.batch_size * steps / max(self.decode_s, 1e-9)


class GenerationEngine:
    def __init__(self, model, batch_size: int, max_length: int, *, cuda_graph: bool | None = None,
                 prefill_batch: int = 1, fused: bool | None = None) -> None:
        config = model.config
        if config.sliding_window is not None and config.sliding_window < max_length:
            raise ValueError(f"the engine has no sliding-window attention (window {config.sliding_window} < "
                             f"max_length {max_length})")
        self.model = model
        self.config = config
        self.batch_size, self.max_length, self.prefill_batch = batch_size, max_length, prefill_batch
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.use_graph = (self.device.type == "cuda") if cuda_graph is None else cuda_graph
        b, L = batch_size, max_length
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.conv: dict[int, torch.Tensor] = {}
        self.ssm: dict[int, torch.Tensor] = {}
        self.gdn_conv: dict[int, torch.Tensor] = {}  # Gated DeltaNet layers: conv window, delta-rule state
        self.gdn_state: dict[int, torch.Tensor] = {}
        for index, kind in enumerate(config.layer_types):
            if kind == ATTENTION:
                shape = (b, config.num_key_value_heads, L, config.head_dim)
                self.keys[index] = torch.zeros(shape, dtype=self.dtype, device=self.device)
                self.values[index] = torch.zeros(shape, dtype=self.dtype, device=self.device)
            elif kind == MAMBA:
                d = config.mamba_d_inner
                self.conv[index] = torch.zeros(b, d, config.mamba_d_conv, dtype=self.dtype, device=self.device)
                self.ssm[index] = torch.zeros(b, d, config.mamba_d_state, dtype=torch.float32, device=self.device)
            elif kind == GDN:
                mixer = model.model.layers[index].mixer
                self.gdn_conv[index] = torch.zeros(b, mixer.conv_width, mixer.d_conv, dtype=self.dtype,
                                                   device=self.device)
                self.gdn_state[index] = torch.zeros(b, mixer.num_heads, mixer.head_dim, mixer.head_dim,
                                                    dtype=torch.float32, device=self.device)
        # decode-step inputs and outputs (static addresses for the CUDA graph)
        self.tokens = torch.zeros(b, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(b, dtype=torch.long, device=self.device)  # RoPE position of the next token
        self.slot = torch.zeros(1, dtype=torch.long, device=self.device)  # cache column the next token fills
        self.key_valid = torch.zeros(b, L, dtype=torch.bool, device=self.device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=self.device)
        self.output = torch.zeros(b, 1, dtype=torch.long, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._warm_steps = 0
        self._fuse_projections()
        self.fused = self._fused_supported() if fused is None else fused
        if self.fused:
            self._init_fused_buffers()
        # created up front: a driver allocation after the caches have filled the card could fail
        self._side_stream = torch.cuda.Stream(self.device) if self.use_graph else None

    @torch.no_grad()
    def _fuse_projections(self) -> None:
        """One GEMM for q/k/v and one for gate/up per layer in decode (one weight read, fewer launches).

        The fused tensors are copies: the model's own weights (which prefill uses) are not touched, so a
        model still being trained or evaluated elsewhere is safe; the price is one extra copy of these
        projections while the engine lives.
        """
        self.fused_qkv: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.fused_gate_up: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self.model.model.layers):
            if self.config.layer_types[index] == ATTENTION:
                mixer = layer.mixer
                self.fused_qkv[index] = (
                    _fuse([mixer.q_proj, mixer.k_proj, mixer.v_proj], "weight"),
                    _fuse([mixer.q_proj, mixer.k_proj, mixer.v_proj], "bias"),
                )
            mlp = layer.mlp
            if getattr(mlp, "gate_proj", None) is not None and mlp.gate_proj.bias is None:
                self.fused_gate_up[index] = _fuse([mlp.gate_proj, mlp.up_proj], "weight")

    def _fused_supported(self) -> bool:
        """The Triton decode path: CUDA (triton importable), a 16-bit model, shapes the kernels take."""
        config = self.config
        return (
            decode_kernels.available(self.device)
            and self.dtype in (torch.bfloat16, torch.float16)
            and config.head_dim >= 16 and config.head_dim & (config.head_dim - 1) == 0
            and config.hidden_act == "silu"
            and (not self.conv or config.mamba_d_state & (config.mamba_d_state - 1) == 0)
            and getattr(self.model.model.rotary_emb, "inv_freq", torch.empty(0)).numel() * 2 == config.head_dim
        )

    def _init_fused_buffers(self) -> None:
        config, b = self.config, self.batch_size
        self.hidden = torch.zeros(b, config.hidden_size, dtype=self.dtype, device=self.device)  # residual stream
        self.normed = torch.zeros_like(self.hidden)
        self.query = torch.zeros(b, config.num_attention_heads, config.head_dim, dtype=self.dtype, device=self.device)
        self.act = torch.zeros(b, config.intermediate_size, dtype=self.dtype, device=self.device)
        # in_proj and dt_in_proj read the same input: one GEMM when in_proj has no bias
        self.fused_in: dict[int, torch.Tensor] = {}
        for index in self.conv:
            mixer = self.model.model.layers[index].mixer
            fused = _fuse([mixer.in_proj, mixer.dt_in_proj], "weight") if mixer.in_proj.bias is None else None
            self.fused_in[index] = fused if fused is not None else mixer.in_proj.weight
        rows = config.num_attention_heads // config.num_key_value_heads
        self.decode_attention = decode_kernels.DecodeAttention(
            b, config.num_key_value_heads, rows, config.head_dim, self.max_length, self.device, self.dtype
        ) if self.keys else None

    # --- sizes ---------------------------------------------------------------------------------
    def _recurrent_states(self) -> list[torch.Tensor]:
        return [*self.conv.values(), *self.ssm.values(), *self.gdn_conv.values(), *self.gdn_state.values()]

    def cache_bytes(self) -> int:
        buffers = [*self.keys.values(), *self.values.values(), *self._recurrent_states()]
        return sum(t.numel() * t.element_size() for t in buffers)

    def bytes_per_decode_step(self, length: float | None = None) -> int:
        """Bytes a decode step must read or write at least: weights once, the K/V columns filled so far
        (`length` of them, default the whole buffer) once, recurrent (Mamba, Gated DeltaNet) states read and
        written back."""
        weights = sum(p.numel() * p.element_size() for name, p in self.model.named_parameters()
                      if "embed_tokens" not in name)
        embed_rows = self.batch_size * self.config.hidden_size * self.dtype.itemsize
        mamba_states = sum(t.numel() * t.element_size() for t in self._recurrent_states())
        kv = sum(t.numel() * t.element_size() for t in [*self.keys.values(), *self.values.values()])
        if length is not None:
            kv = kv * min(length, self.max_length) / self.max_length
        return int(weights + embed_rows + kv + 2 * mamba_states)

    # --- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 32, eos_token_id: int | Sequence[int] | None = None,
                 check_every: int = 8) -> GenerationResult:
        """Greedy tokens (b, new) for a left-padded batch. With `eos_token_id` (one id or several: any of
        them ends a sequence, e.g. `pipeline.data.stop_token_ids`), decoding stops (checked every
        `check_every` steps, one host sync each) once every sequence has produced one; positions after a
        sequence's first stop token hold the first of the ids (the caller cuts there), and `new_tokens` is
        the number of steps actually run."""
        training = self.model.training
        self.model.eval()
        try:
            return self._generate(input_ids, attention_mask, max_new_tokens, eos_token_id, check_every)
        finally:
            self.model.train(training)

    def _generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, check_every) -> GenerationResult:
        batch, prompt = input_ids.shape
        if batch != self.batch_size:
            raise ValueError(f"engine was built for batch {self.batch_size}, got {batch}")
        if prompt + max_new_tokens > self.max_length:
            raise ValueError(f"prompt {prompt} + {max_new_tokens} new tokens exceeds max_length {self.max_length}")
        input_ids = input_ids.to(self.device)
        mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)).long()
        self._reset()
        self._sync()
        start = time.perf_counter()
        first = self._prefill(input_ids, mask)
        self._sync()
        prefill_s = time.perf_counter() - start
        generated = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=self.device)
        generated[:, 0] = first
        self.tokens.copy_(first)
        self.positions.copy_(mask.sum(-1))
        self.slot.fill_(prompt)
        self.key_valid[:, :prompt] = mask.bool()
        stops = _stop_ids(eos_token_id, self.device)
        finished = torch.isin(first, stops) if stops is not None else None
        produced = max_new_tokens
        start = time.perf_counter()
        for step in range(1, max_new_tokens):
            if finished is not None and step % check_every == 0 and bool(finished.all()):
                produced = step
                break
            self._run_step()
            generated[:, step] = self.output[:, 0]
            if finished is not None:
                finished |= torch.isin(self.output[:, 0], stops)
        self._sync()
        decode_s = time.perf_counter() - start
        generated = generated[:, :produced]
        if stops is not None:  # after a sequence's end, only end tokens (as generate() pads)
            ended = torch.isin(generated, stops).long().cumsum(-1) > 0
            ended = torch.cat([torch.zeros_like(ended[:, :1]), ended[:, :-1]], dim=-1)
            generated = generated.masked_fill(ended, int(stops[0]))
        return GenerationResult(generated, prefill_s, decode_s, batch, prompt, produced)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _reset(self) -> None:
        for buffer in [*self.keys.values(), *self.values.values(), *self._recurrent_states()]:
            buffer.zero_()
        self.key_valid.zero_()

    @torch.no_grad()
    def _prefill(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The model's forward over micro-batches; fills the static caches; returns the first new tokens."""
        prompt = input_ids.shape[1]
        firsts = []
        for start in range(0, input_ids.shape[0], self.prefill_batch):
            rows = slice(start, start + self.prefill_batch)
            cache = DynamicCache(config=self.config)
            padded = not bool(mask[rows].all())
            out = self.model(input_ids[rows], attention_mask=mask[rows] if padded else None, cache=cache,
                             use_cache=True, logits_to_keep=1)
            firsts.append(out.logits[:, -1].argmax(-1))
            for index in self.keys:
                layer = cache.layers[index]
                self.keys[index][rows, :, :prompt] = layer.keys
                self.values[index][rows, :, :prompt] = layer.values
            for index in self.conv:
                view = MambaCacheView(cache, index)
                self.conv[index][rows] = view.conv.to(self.dtype)
                self.ssm[index][rows] = view.ssm
            for index in self.gdn_conv:
                view = RecurrentCacheView(cache, index)
                self.gdn_conv[index][rows] = view.conv.to(self.dtype)
                self.gdn_state[index][rows] = view.state
            del cache, out
        return torch.cat(firsts)

    @torch.no_grad()
    def _run_step(self) -> None:
        if not self.use_graph:
            self._decode_step()
            return
        if self.graph is None:
            # Warm up on a side stream (Triton compiles, cuBLAS picks kernels), then capture. The warm-up
            # steps are real steps of this generation; capturing itself runs nothing.
            if self._warm_steps < 2:
                stream = self._side_stream
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    self._decode_step()
                torch.cuda.current_stream(self.device).wait_stream(stream)
                self._warm_steps += 1
                return
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._decode_step()
        self.graph.replay()

    @torch.no_grad()
    def _decode_step(self) -> None:
        """Everything one decode step does, on static buffers (capturable)."""
        if self.fused:
            self._decode_step_fused()
            return
        model, config = self.model.model, self.config
        hidden = model.embed_tokens(self.tokens)[:, None, :]  # (b, 1, H)
        cos, sin = model.rotary_emb(hidden, self.positions[:, None])
        self.key_valid.index_fill_(1, self.slot, True)
        attend = self.key_valid[:, None, None, :]  # (b, 1, 1, L)
        for index, layer in enumerate(model.layers):
            normed = layer.input_layernorm(hidden)
            kind = config.layer_types[index]
            if kind == ATTENTION:
                hidden = hidden + self._attention(layer.mixer, normed, cos, sin, index, attend)
            elif kind == MAMBA:
                hidden = hidden + layer.mixer.step(normed[:, 0], self.conv[index], self.ssm[index])[:, None, :]
            elif kind == GDN:
                update = layer.mixer.step(normed[:, 0], self.gdn_conv[index], self.gdn_state[index])
                hidden = hidden + update[:, None, :]
            hidden = hidden + self._mlp(index, layer.mlp, layer.post_attention_layernorm(hidden))
        self._advance(self.model.lm_head(model.norm(hidden[:, 0])))

    @torch.no_grad()
    def _decode_step_fused(self) -> None:
        """The decode step on the Triton kernels; the residual stream stays in `self.hidden` (b, H)."""
        model, config = self.model.model, self.config
        layers = model.layers
        hidden, normed = self.hidden, self.normed
        torch.index_select(model.embed_tokens.weight, 0, self.tokens, out=hidden)
        cos, sin = model.rotary_emb(hidden[:, None, :], self.positions[:, None])  # (b, 1, e)
        self.key_valid.index_fill_(1, self.slot, True)
        first = layers[0].input_layernorm
        decode_kernels.add_rms_norm(hidden, None, first.weight, first.variance_epsilon, normed)
        for index, layer in enumerate(layers):
            kind = config.layer_types[index]
            update = None
            if kind == ATTENTION:
                update = self._attention_fused(layer.mixer, normed, cos, sin, index)
            elif kind == MAMBA:
                update = self._mamba_fused(layer.mixer, normed, index)
            elif kind == GDN:
                update = layer.mixer.step(normed, self.gdn_conv[index], self.gdn_state[index])
            post = layer.post_attention_layernorm
            decode_kernels.add_rms_norm(hidden, update, post.weight, post.variance_epsilon, normed)
            update = self._mlp(index, layer.mlp, normed)
            following = layers[index + 1].input_layernorm if index + 1 < len(layers) else model.norm
            decode_kernels.add_rms_norm(hidden, update, following.weight, following.variance_epsilon, normed)
        self._advance(self.model.lm_head(normed))

    def _advance(self, logits: torch.Tensor) -> None:
        """The end of either step: greedy tokens from the logits (b, V) become the next step's input."""
        self.last_logits = logits  # in a captured step, the graph's buffer: valid after each replay
        self.output.copy_(logits.argmax(-1, keepdim=True))
        self.tokens.copy_(self.output[:, 0])
        self.positions.add_(1)
        self.slot.add_(1)

    def _attention_fused(self, mixer, normed, cos, sin, index) -> torch.Tensor:
        b = normed.shape[0]
        weight, bias = self.fused_qkv[index]
        qkv = F.linear(normed, weight, bias)  # (b, (h + 2 h_kv) e)
        decode_kernels.rope_kv_write(qkv, cos, sin, self.query, self.keys[index], self.values[index], self.slot,
                                     mixer.num_heads, mixer.num_kv_heads)
        q = self.query.view(b, mixer.num_kv_heads, mixer.num_heads // mixer.num_kv_heads, mixer.head_dim)
        out = self.decode_attention(q, self.keys[index], self.values[index], self.key_valid, self.slot, mixer.scale)
        return mixer.o_proj(out.view(b, -1))

    def _mamba_fused(self, mixer, normed, index) -> torch.Tensor:
        """The mixer's own step (`MambaMixer.step`: one Triton kernel here) on projections from one GEMM."""
        weight = self.fused_in[index]
        proj = F.linear(normed, weight, mixer.in_proj.bias if weight is mixer.in_proj.weight else None)
        width = 2 * mixer.d_inner + 2 * mixer.d_xb
        dt_low = proj[:, width:] if proj.shape[-1] > width else mixer.dt_in_proj(normed)  # (b, dt_rank)
        return mixer.step(normed, self.conv[index], self.ssm[index], projected=(proj, dt_low))

    def _mlp(self, index, mlp, hidden) -> torch.Tensor:
        if index not in self.fused_gate_up:
            return mlp(hidden)
        gate_up = F.linear(hidden, self.fused_gate_up[index])  # (..., 2 I)
        if self.fused:  # hidden (b, H): silu(gate) * up in one kernel
            return mlp.down_proj(decode_kernels.silu_mul(gate_up, self.act))
        gate, up = gate_up.chunk(2, dim=-1)
        return mlp.down_proj(mlp.act_fn(gate) * up)

    def _attention(self, mixer, hidden, cos, sin, index, attend) -> torch.Tensor:
        b = hidden.shape[0]
        heads, kv_heads, dim = mixer.num_heads, mixer.num_kv_heads, mixer.head_dim
        weight, bias = self.fused_qkv[index]
        q, k, v = F.linear(hidden, weight, bias).split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        q = q.view(b, 1, heads, dim).transpose(1, 2)  # (b, h, 1, e)
        k = k.view(b, 1, kv_heads, dim).transpose(1, 2)  # (b, h_kv, 1, e)
        v = v.view(b, 1, kv_heads, dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        self.keys[index].index_copy_(2, self.slot, k)
        self.values[index].index_copy_(2, self.slot, v)
        # GQA without expanding K/V: the h / h_kv query heads sharing a KV head become its query rows.
        # Two batched GEMMs read K and V once each; every (sequence, KV head) splits over the cache
        # length, which keeps the GPU busy even at batch 1 (a fused attention kernel with 4 query rows
        # per KV head is latency-bound there).
        q = q.reshape(b, kv_heads, heads // kv_heads, dim)  # (b, h_kv, r, e)
        scores = torch.matmul(q, self.keys[index].transpose(-1, -2)).float() * mixer.scale  # (b, h_kv, r, L)
        probs = scores.masked_fill(~attend, float("-inf")).softmax(-1).to(q.dtype)
        out = torch.matmul(probs, self.values[index])  # (b, h_kv, r, e)
        return mixer.o_proj(out.reshape(b, 1, heads * dim))


def _stop_ids(eos_token_id: int | Sequence[int] | None, device: torch.device) -> torch.Tensor | None:
    """The stop ids as a 1-d tensor on `device`, None for none."""
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def _fuse(linears, name: str) -> torch.Tensor | None:
    """The linears' weights (or biases) concatenated into a new tensor (a copy; the linears are untouched)."""
    tensors = [getattr(linear, name) for linear in linears]
    if any(t is None for t in tensors):
        return None
    return torch.cat([t.detach() for t in tensors], dim=0)


__all__ = ["GenerationEngine", "GenerationResult"]
