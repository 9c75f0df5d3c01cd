"""`PagedEngine`: continuous batching of a transformers causal LM over `PagedKVCache`.

One `step()`: the scheduler picks the batch (decodes and prompt chunks, preempting or forking as needed),
`cache.plan` reserves the slots, one packed forward runs the model (runner.py; a CUDA graph for pure decode
steps on the GPU, graphs.py), the last-token logits of the sequences that completed their known tokens are
sampled (sampling.py), and each sampled token is checked against the request's stop conditions and turned
into streamed text (text.py). A finished or aborted request frees its blocks at once.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

import torch

from ..cache import PagedKVCache
from ..calibration import ChannelCalibration
from ..integrations.transformers import default_calibration, kv_geometry, paged_windows
from ..spec import KVCacheSpec
from .api import RequestError, SamplingParams, TokenEvent
from .runner import Step, forward_step, use_engine_attention
from .sampling import choose_tokens, make_generator
from .scheduler import Scheduler, SeqState
from .text import RequestText

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    params: SamplingParams
    generator: torch.Generator | None
    text: RequestText
    num_generated: int = 0


class PagedEngine:
    """The paged-cache serving engine (implements serving.api.Engine).

    model:            a transformers causal LM (eval mode); it is switched to the "sawint4_engine" attention.
    tokenizer:        optional; needed for text prompts, text output and stop strings.
    kv_format:        bf16 | int8 | int4 | saw_int4 (spec_options: rotation_block, rotate_v, ... of KVCacheSpec).
    num_blocks:       pool size in blocks (tokens_per_block tokens of every layer each); or give
                      kv_cache_bytes, the memory budget of the pool (the same budget holds ~3.8x more tokens
                      in int4 than in bf16). Default: max_batch sequences of max_seq_len tokens.
    max_batch:        most sequences in one step.
    max_step_tokens:  most new tokens in one step (prompt chunks plus decodes).
    max_seq_len:      longest sequence (prompt + generated); default min(config.max_position_embeddings,
                      what the pool holds).
    decode_graphs:    "auto" (CUDA graphs for pure decode steps when the model is on CUDA), "on", "off", or
                      "static" (the graphs' padded static-buffer path run eagerly, no capture: for tests).
    prefix_sharing:   fork running requests for waiting ones that share a prompt prefix (scheduler.py).
    reserve_output:   admit a request only when its whole prompt + max_tokens fits besides the running ones
                      (no preemption ever); default off: use the pool fully and preempt when it runs out.
    seed:             seeds the generators of sampled requests that give no seed of their own.
    """

    def __init__(self, model, tokenizer=None, *, kv_format: str = "saw_int4", num_blocks: int | None = None,
                 kv_cache_bytes: int | None = None, max_batch: int = 8, max_step_tokens: int = 2048,
                 tokens_per_block: int = 64, max_seq_len: int | None = None,
                 calibration: ChannelCalibration | None = None, spec_options: dict | None = None,
                 decode_graphs: str = "auto", graph_batch_sizes: tuple[int, ...] | None = None,
                 prefix_sharing: bool = True, reserve_output: bool = False, seed: int = 0,
                 eos_token_ids: tuple[int, ...] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.geometry = kv_geometry(model.config)
        self.spec = KVCacheSpec(head_dim=self.geometry.head_dim, num_kv_heads=self.geometry.num_kv_heads,
                                tokens_per_block=tokens_per_block, kv_format=kv_format, **(spec_options or {}))
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.vocab_size = int(cfg.vocab_size)
        limit = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)
        if max_seq_len is not None:
            if max_seq_len < 2:
                raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
            limit = min(limit, max_seq_len)
        if decode_graphs not in ("auto", "on", "off", "static"):
            raise ValueError(f"decode_graphs must be 'auto', 'on', 'off' or 'static', got {decode_graphs!r}")
        if decode_graphs == "on" and self.device.type != "cuda":
            raise ValueError("decode_graphs='on' needs the model on a CUDA device")
        capture = decode_graphs == "on" or (decode_graphs == "auto" and self.device.type == "cuda")
        use_graphs = capture or decode_graphs == "static"
        # blocks the cache keeps for the padding rows of graph steps
        reserved = -(-max_batch // tokens_per_block) if use_graphs else 0
        t, layers = tokens_per_block, self.geometry.num_layers
        if num_blocks is None and kv_cache_bytes is not None:
            num_blocks = int(kv_cache_bytes) // (self.spec.block_bytes * layers)
            if num_blocks <= reserved:
                raise ValueError(f"kv_cache_bytes={kv_cache_bytes} holds {num_blocks} blocks of "
                                 f"{self.spec.block_bytes * layers} bytes; need at least {reserved + 1}")
        elif num_blocks is None:
            num_blocks = max_batch * math.ceil(min(limit, 4096) / t) + reserved
        elif kv_cache_bytes is not None:
            raise ValueError("give num_blocks or kv_cache_bytes, not both")
        if num_blocks - reserved < 1:
            raise ValueError(f"num_blocks must be >= {reserved + 1}, got {num_blocks}")
        self.max_seq_len = min(limit, (num_blocks - reserved) * t)
        windows = paged_windows(self.geometry, self.max_seq_len)
        if calibration is None:  # the format model.generate() with SawInt4Cache stores
            calibration = default_calibration(model, self.spec)
        self.cache = PagedKVCache(self.spec, layers, num_blocks, device=self.device, calibration=calibration,
                                  num_query_heads=self.geometry.num_heads, query_dtype=next(model.parameters()).dtype,
                                  **({} if windows is None else {"windows": list(windows)}))
        self.scheduler = Scheduler(self.cache, max_batch=max_batch, max_step_tokens=max_step_tokens,
                                   watermark=max(1, num_blocks // 100) if num_blocks > 8 else 0,
                                   prefix_sharing=prefix_sharing, reserve_output=reserve_output)
        self.graphs = None
        if use_graphs:
            from .graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, batch_sizes=graph_batch_sizes, capture=capture)
        self.reserved_blocks = num_blocks - self.cache.allocator.num_free
        use_engine_attention(model)
        self.eos_token_ids = self._eos_ids(model, tokenizer) if eos_token_ids is None else tuple(eos_token_ids)
        self._seeds = random.Random(seed)
        self._requests: dict[str, SeqState] = {}
        self._events: list[TokenEvent] = []
        self._arrivals = 0
        # host-side seconds per phase (schedule, plan, forward + sampling up to the sampled ids on the host)
        self.counters = dict(steps=0, decode_steps=0, graph_steps=0, prefill_tokens=0, decode_tokens=0,
                             schedule_s=0.0, plan_s=0.0, forward_s=0.0, step_s=0.0, errors=0)

    @staticmethod
    def _eos_ids(model, tokenizer) -> tuple[int, ...]:
        ids: set[int] = set()
        for src in (getattr(model, "generation_config", None), tokenizer):
            eos = getattr(src, "eos_token_id", None)
            if eos is None:
                continue
            ids.update([eos] if isinstance(eos, int) else list(eos))
        return tuple(sorted(i for i in ids if isinstance(i, int) and i >= 0))

    # ---- the Engine interface ------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise RequestError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self._requests:
            raise RequestError(f"request_id {request_id!r} is already in flight")
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        try:
            params.validate()
        except ValueError as e:
            raise RequestError(str(e)) from None
        if params.stop and self.tokenizer is None:
            raise RequestError("stop: stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        ids = self._prompt_ids(prompt)
        if len(ids) >= self.max_seq_len:
            raise RequestError(
                f"prompt: {len(ids)} tokens; this engine holds sequences of at most {self.max_seq_len} tokens "
                f"(pool of {self.cache.allocator.num_blocks - self.reserved_blocks} blocks of "
                f"{self.spec.tokens_per_block} tokens), so a prompt may have at most {self.max_seq_len - 1}")
        gen = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
            gen = make_generator(seed, self.device)
        seq = SeqState(request_id, ids, prompt_len=len(ids), order=self._arrivals,
                       max_len=min(len(ids) + params.max_tokens, self.max_seq_len),
                       extra=_Request(params, gen, RequestText(self.tokenizer, ids, params.stop)))
        self._arrivals += 1
        self._requests[request_id] = seq
        self.scheduler.add(seq)

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("prompt: a text prompt needs a tokenizer; this engine has none (give token ids)")
            if not prompt:
                raise RequestError("prompt must not be empty")
            ids = list(self.tokenizer(prompt)["input_ids"])
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise RequestError("prompt: token ids must be ints")
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise RequestError(f"prompt: token ids must be in [0, {self.vocab_size}), got {bad[:4]}")
        else:
            raise RequestError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise RequestError("prompt must not be empty (it tokenized to no tokens)")
        return ids

    def abort(self, request_id: str) -> None:
        seq = self._requests.pop(request_id, None)
        if seq is None:
            return
        self.scheduler.remove(seq)
        self._events.append(TokenEvent(request_id, [], "", finished=True, finish_reason="abort"))

    def has_unfinished(self) -> bool:
        return bool(self._requests) or bool(self._events)

    def stats(self) -> dict:
        s = self.scheduler
        return dict(num_running=len(s.running), num_waiting=len(s.waiting),
                    free_blocks=self.cache.allocator.num_free,
                    total_blocks=self.cache.allocator.num_blocks - self.reserved_blocks,
                    num_preemptions=s.num_preemptions, num_forks=s.num_forks, max_seq_len=self.max_seq_len,
                    kv_format=self.spec.kv_format,
                    cuda_graphs=self.graphs is not None and self.graphs.capture, **self.counters)

    def step(self) -> list[TokenEvent]:
        t0 = time.perf_counter()
        events, self._events = self._events, []
        sched = self.scheduler.schedule()
        if not sched.seqs:
            return events
        seqs, counts = sched.seqs, sched.num_new_tokens
        ids, pos, rows, samplers = [], [], [], []
        for s, n in zip(seqs, counts):
            ids += s.tokens[s.num_cached:s.num_cached + n]
            pos += range(s.num_cached, s.num_cached + n)
            if s.num_cached + n == len(s.tokens):
                rows.append(len(ids) - 1)
                samplers.append(s)
        graph_step = self.graphs is not None and len(ids) == len(seqs) == len(rows)  # a pure decode step
        t_plan = time.perf_counter()
        self.counters["schedule_s"] += t_plan - t0
        plan = None
        if not graph_step:  # (a graph step is planned by the graphs, into their bucket's buffers)
            try:
                plan = self.cache.plan([s.seq_id for s in seqs], counts)
            except Exception as e:  # the schedule fits the pool by construction: this is a bug, not a bad request
                return events + self._fail(seqs, e)
        t1 = time.perf_counter()
        self.counters["plan_s"] += t1 - t_plan
        use_engine_attention(self.model)  # the model may be shared (e.g. generate() switched it meanwhile)
        try:
            with torch.inference_mode():
                if graph_step:
                    logits = self.graphs.run([s.seq_id for s in seqs], ids, pos)
                    self.counters["graph_steps"] += 1
                else:
                    dev = self.device
                    step = Step(self.cache, plan, self.geometry)
                    logits = forward_step(self.model, torch.tensor(ids, device=dev), torch.tensor(pos, device=dev),
                                          step, torch.tensor(rows, dtype=torch.long, device=dev))
                new = choose_tokens(logits, [s.extra.params for s in samplers], [s.extra.generator for s in samplers])
        except Exception as e:
            log.exception("engine step failed")
            return events + self._fail(seqs, e)
        self.counters["forward_s"] += time.perf_counter() - t1
        for s, n in zip(seqs, counts):
            s.num_cached += n
        self.counters["steps"] += 1
        self.counters["decode_steps"] += int(len(ids) == len(seqs))
        self.counters["decode_tokens"] += sum(1 for n in counts if n == 1)
        self.counters["prefill_tokens"] += sum(n for n in counts if n > 1)
        for s, token in zip(samplers, new):
            events.append(self._accept(s, token))
        self.counters["step_s"] += time.perf_counter() - t0
        return events

    def warm_up(self, decode_widths: list[int] | None = None) -> dict:
        """Launch, before serving, every kernel variant that steps will launch, so none compiles mid-run.

        Triton compiles a variant of a kernel the first time a launch needs it, inside the step that made
        the launch (kernels/variants.py). The per-step counts the kernels take are left unspecialised; what
        still selects a variant is how many sequences a prefill step holds, bucketed by powers of two
        (kernels/prefill.py prefill_batch_pad). One step per bucket up to max_batch launches each: one-token
        prompts and one two-token prompt (a step where every sequence adds one token is a decode step), and
        the decode step that follows captures the decode graph of that batch. Then the decode graphs of
        every batch bucket are captured at `decode_widths` (block-table widths in blocks; default: every
        width bucket up to max_seq_len). The engine must be idle; the counters are left as they were.
        Returns what it did: steps, batches, graph captures, seconds."""
        if self.has_unfinished():
            raise RuntimeError("warm_up() runs on an idle engine; this one has requests in flight")
        t0 = time.perf_counter()
        counters = dict(self.counters)
        captures = self.graphs.num_captures if self.graphs is not None else 0
        max_batch = max(1, min(self.scheduler.max_batch, self.scheduler.max_step_tokens - 1))
        batches = sorted({1, max_batch} | {n + 1 for n in (1 << k for k in range(max_batch.bit_length()))
                                           if n + 1 <= max_batch})
        params = SamplingParams(max_tokens=2, ignore_eos=True)
        for n in batches:
            prompts = [[i % self.vocab_size] for i in range(n + 1)]
            self.generate(prompts[:n - 1] + [prompts[n - 1] + prompts[n]], params)
        if self.graphs is not None:
            every_width = {self.graphs.width_bucket(w) for w in range(1, self.graphs.max_width + 1)}
            decode_batch = min(self.scheduler.max_batch, self.scheduler.max_step_tokens)
            self.graphs.prepare(decode_batch, decode_widths or sorted(every_width))
        done = dict(steps=self.counters["steps"] - counters["steps"], batches=batches,
                    graph_captures=(self.graphs.num_captures if self.graphs is not None else 0) - captures,
                    seconds=time.perf_counter() - t0)
        self.counters = counters
        return done

    # ---- internals -----------------------------------------------------------------------------
    def _fail(self, seqs: list[SeqState], error: Exception) -> list[TokenEvent]:
        self.counters["errors"] += 1
        message = f"{type(error).__name__}: {error}"
        out = []
        for s in seqs:
            if self._requests.pop(s.request_id, None) is not None:
                self.scheduler.remove(s)
                out.append(TokenEvent(s.request_id, [], "", finished=True, finish_reason="error", error=message))
        return out

    def _accept(self, seq: SeqState, token: int) -> TokenEvent:
        req: _Request = seq.extra
        p = req.params
        seq.tokens.append(token)
        req.num_generated += 1
        reason = None
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            reason, text = "stop", req.text.finish()
        else:
            text = req.text.add(token)
            if req.text.stopped:
                reason = "stop"
            elif req.num_generated >= p.max_tokens or len(seq.tokens) >= self.max_seq_len:
                reason = "length"
                text += req.text.finish()
        if reason is not None:
            del self._requests[seq.request_id]
            self.scheduler.remove(seq)
        return TokenEvent(seq.request_id, [token], text, finished=reason is not None, finish_reason=reason)

    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Offline helper: run prompts to completion (all queued at once); their generated token ids."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"_generate_{self._arrivals + i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params):
            self.add_request(rid, prompt, p)
        out: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for e in self.step():
                if e.request_id in out:
                    out[e.request_id] += e.token_ids
                    if e.finish_reason == "error":
                        raise RuntimeError(f"request {e.request_id} failed: {e.error}")
        return [out[rid] for rid in ids]
