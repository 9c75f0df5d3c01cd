"""The continuous-batching scheduler: which requests run this step, with how many new tokens each.

Pure bookkeeping over the cache's block allocator (no model, no tensors), so its policy is testable alone:

* Running requests go first, oldest first: a decoding request adds 1 token, a request still in its
  prompt adds a chunk (chunked prefill), both in the same step, within `max_step_tokens` new tokens per
  step (chunks leave room for the decodes behind them).
* When the pool cannot hold a running request's next tokens, the newest running request is preempted:
  its blocks are freed and it goes back to the front of the queue with its tokens so far (prompt and
  generated), to be recomputed when it is admitted again (vLLM's recompute preemption). A request is
  never half-written and never crashes the step; the oldest request always makes progress.
* Waiting requests are admitted in arrival order while the step has token budget, the batch has room
  (`max_batch`) and the pool keeps `watermark` blocks free after their first chunk; nothing is admitted in
  a step that preempted. With `reserve_output` (TensorRT-LLM's GUARANTEED_NO_EVICT policy) a request is
  admitted only when the pool can also hold every running request's and its own longest possible sequence
  (prompt + max_tokens), so nothing is ever preempted; without it (vLLM's policy, the default) the pool is
  used fully and preemption makes room.
* Prefix sharing by fork: a waiting request whose prompt starts with at least one block's worth of tokens
  that a running request is about to compute (or has computed exactly so far) waits for that request's
  prefill to reach the shared prefix (its chunk is cut there), then starts as a fork of it -- sharing its
  full blocks, copying the partial last one -- and prefills only the rest. The paged cache's fork shares a
  sequence's whole length, so a request already past the shared prefix cannot be forked for it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..cache import PagedKVCache


@dataclass(eq=False)
class SeqState:
    """One request as the scheduler sees it."""

    request_id: str
    tokens: list[int]  # prompt, then generated tokens
    prompt_len: int
    order: int  # arrival order (preempted requests keep theirs)
    max_len: int = 0  # longest the sequence can grow (prompt + max_tokens, capped); 0 = unknown
    seq_id: int | None = None  # paged sequence while running
    num_cached: int = 0  # tokens of `tokens` whose K/V are in the cache
    admitted: int = -1  # admission order while running (the newest is preempted first)
    fork_parent: "SeqState | None" = None  # waiting to start as a fork of this request ...
    fork_at: int = 0  # ... once it has exactly this many tokens cached
    preemptions: int = 0
    forked: bool = False  # started as a fork (for stats)
    extra: object = field(default=None, repr=False)  # the engine's per-request state

    @property
    def running(self) -> bool:
        return self.seq_id is not None

    @property
    def remaining(self) -> int:
        """Tokens not yet in the cache (1 for a decoding request)."""
        return len(self.tokens) - self.num_cached


@dataclass
class ScheduledStep:
    seqs: list[SeqState]
    num_new_tokens: list[int]
    preempted: list[SeqState]
    forked: list[SeqState]


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix (binary search over C-speed slice comparisons)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Scheduler:
    def __init__(self, cache: PagedKVCache, max_batch: int, max_step_tokens: int, watermark: int = 1,
                 prefix_sharing: bool = True, reserve_output: bool = False):
        if max_batch < 1 or max_step_tokens < 1:
            raise ValueError(f"max_batch and max_step_tokens must be >= 1, got {max_batch}, {max_step_tokens}")
        self.cache = cache
        self.allocator = cache.allocator
        self.tokens_per_block = cache.spec.tokens_per_block
        self.max_batch = max_batch
        self.max_step_tokens = max_step_tokens
        self.watermark = watermark
        self.prefix_sharing = prefix_sharing
        self.reserve_output = reserve_output
        self.waiting: deque[SeqState] = deque()
        self.running: list[SeqState] = []  # in admission order
        self._admissions = 0
        self.num_preemptions = 0
        self.num_forks = 0

    # ---- membership ----------------------------------------------------------------------------
    def add(self, seq: SeqState) -> None:
        self.waiting.append(seq)

    def remove(self, seq: SeqState) -> None:
        """Drop a request (finished or aborted) and free its blocks now."""
        if seq.running:
            self.running.remove(seq)
            self.cache.free(seq.seq_id)
            seq.seq_id = None
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._unlink_children(seq)

    def _unlink_children(self, parent: SeqState) -> None:
        for w in self.waiting:
            if w.fork_parent is parent:
                w.fork_parent, w.fork_at = None, 0

    def _preempt(self, seq: SeqState) -> None:
        self.running.remove(seq)
        self.cache.free(seq.seq_id)
        seq.seq_id, seq.num_cached, seq.admitted = None, 0, -1
        seq.preemptions += 1
        self.num_preemptions += 1
        self._unlink_children(seq)
        # back to the queue in arrival order (ahead of everything that arrived after it)
        i = 0
        while i < len(self.waiting) and self.waiting[i].order < seq.order:
            i += 1
        self.waiting.insert(i, seq)

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        """Decide this step's batch. Preemptions and forks happen here; blocks for the new tokens are
        reserved by the caller's `cache.plan(...)`, which this schedule is guaranteed to fit."""
        forked = self._start_pending_forks()
        budget = self.max_step_tokens
        plan: dict[int, int] = {}  # id(seq) -> new tokens this step
        picked: list[SeqState] = []
        preempted: list[SeqState] = []

        free = self.allocator.num_free
        decodes_left = sum(1 for s in self.running if s.remaining == 1)
        for seq in list(self.running):
            if seq not in self.running:  # preempted earlier in this pass
                continue
            if budget <= 0:
                break
            if seq.remaining == 1:
                n = 1
                decodes_left -= 1
            else:  # a prompt chunk leaves room for the decodes behind it
                n = min(seq.remaining, budget - max(0, decodes_left), self._fork_cut(seq))
                if n <= 0:
                    continue
            need = self.allocator.blocks_needed(seq.seq_id, n)
            while need > free:
                victim = self.running[-1]
                if victim.remaining == 1 and victim not in picked:
                    decodes_left -= 1
                self._preempt(victim)
                preempted.append(victim)
                if victim in picked:
                    picked.remove(victim)
                    budget += plan.pop(id(victim))
                free = self._free(picked, plan)
                if victim is seq:
                    break
            if seq in self.running:
                picked.append(seq)
                plan[id(seq)] = n
                budget -= n
                free -= need

        if not preempted:
            budget = self._admit(picked, plan, forked, budget)
        return ScheduledStep(picked, [plan[id(s)] for s in picked], preempted, forked)

    def _free(self, picked: list[SeqState], plan: dict[int, int]) -> int:
        """Free blocks left once the picked requests' new tokens are placed."""
        return self.allocator.num_free - sum(self.allocator.blocks_needed(s.seq_id, plan[id(s)]) for s in picked)

    def _fork_cut(self, seq: SeqState) -> int:
        """How many tokens `seq` may add before it reaches a prefix that a waiting request will fork."""
        cuts = [w.fork_at - seq.num_cached for w in self.waiting
                if w.fork_parent is seq and w.fork_at > seq.num_cached]
        return min(cuts) if cuts else seq.remaining

    def _make_running(self, seq: SeqState) -> None:
        self.waiting.remove(seq)
        seq.admitted = self._admissions
        self._admissions += 1
        self.running.append(seq)

    def _fork(self, seq: SeqState) -> None:
        seq.seq_id = self.cache.fork(seq.fork_parent.seq_id)
        seq.num_cached = seq.fork_at
        seq.fork_parent, seq.fork_at = None, 0
        seq.forked = True
        self.num_forks += 1
        self._make_running(seq)

    def _start_pending_forks(self) -> list[SeqState]:
        """Fork the waiting requests whose parent has reached their shared prefix; a fork that finds no room
        now is dropped (the request prefills on its own), so a parent never waits for it."""
        forked = []
        for seq in list(self.waiting):
            parent = seq.fork_parent
            if parent is None or parent.num_cached != seq.fork_at:
                continue
            copy = 1 if seq.fork_at % self.tokens_per_block else 0
            if len(self.running) < self.max_batch and self.allocator.num_free >= copy + self.watermark:
                self._fork(seq)
                forked.append(seq)
            else:
                seq.fork_parent, seq.fork_at = None, 0
        return forked

    def _admit(self, picked, plan, forked, budget: int) -> int:
        t = self.tokens_per_block
        if not self.waiting or len(self.running) >= self.max_batch or budget <= 0:
            return budget
        first = self.waiting[0]
        if first.fork_parent is None and not self.prefix_sharing and \
                -(-min(len(first.tokens), budget) // t) + self.watermark > self.allocator.num_free:
            return budget  # the head of the queue cannot start even in an empty step: skip the full count
        free = self._free(picked, plan)
        if self.reserve_output:  # what running requests may still take, besides this step's tokens
            free -= sum(self._growth(s, plan.get(id(s), 0)) for s in self.running)
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_batch:
                break
            if seq.fork_parent is None and self.prefix_sharing:
                given_back = self._find_fork_parent(seq, picked, plan)
                if given_back:
                    budget += given_back
                    free = self._free(picked, plan)
            parent = seq.fork_parent
            if parent is not None and parent.num_cached != seq.fork_at:
                continue  # waits for its parent to reach the shared prefix; admit the ones behind it
            start = seq.fork_at if parent is not None else 0
            n = min(len(seq.tokens) - start, budget)
            need = (1 if start % t else 0) + -(-(start + n) // t) - -(-start // t)
            growth = 0
            if self.reserve_output:
                growth = -(-max(seq.max_len, len(seq.tokens)) // t) - -(-(start + n) // t)
            if need + growth + self.watermark > free:
                break
            if parent is not None:
                self._fork(seq)
                forked.append(seq)
            else:
                seq.seq_id = self.cache.add_sequence()
                seq.num_cached = 0
                self._make_running(seq)
            picked.append(seq)
            plan[id(seq)] = n
            budget -= n
            free -= need + growth
        return budget

    def _growth(self, seq: SeqState, n: int) -> int:
        """Blocks a running request may still need after this step's n tokens, up to its max_len."""
        longest = max(seq.max_len, len(seq.tokens))
        return max(0, self.allocator.blocks_needed(seq.seq_id, max(0, longest - seq.num_cached))
                   - self.allocator.blocks_needed(seq.seq_id, n))

    def _find_fork_parent(self, seq: SeqState, picked: list[SeqState], plan: dict[int, int]) -> int:
        """Link `seq` to a running request whose prefill covers a shared prefix of its prompt (at least one
        block, at most all but its last token); cut that request's chunk of this step at the prefix. Returns
        the step tokens the cut gave back."""
        t = self.tokens_per_block
        best, best_len = None, 0
        for cand in self.running:
            if cand.num_cached >= cand.prompt_len:
                continue  # past its prompt: its cache holds generated tokens beyond any shared prefix
            p = min(common_prefix_len(cand.tokens[:cand.prompt_len], seq.tokens), len(seq.tokens) - 1)
            if p >= t and p >= cand.num_cached and p > best_len:
                best, best_len = cand, p
        if best is None:
            return 0
        seq.fork_parent, seq.fork_at = best, best_len
        given_back = 0
        if best_len > best.num_cached and best in picked and best.num_cached + plan[id(best)] > best_len:
            keep = best_len - best.num_cached
            given_back = plan[id(best)] - keep
            plan[id(best)] = keep
        return given_back
