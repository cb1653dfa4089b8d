"""A slot pool for fixed-size recurrent state (RecurrentGemma), with prefix sharing through state snapshots.

Contract: ``StateCache`` offers the scheduler and the engine the same operations as ``PagedKVCache`` (start,
rematch, allocate, commit, fork, free, export, import) for models whose per-sequence cache is a fixed-size state
(:class:`~gemma_sessions.models.griffin.GriffinSlots`) instead of KV pages. Every slot of the pool is one of:

    free      nothing in it
    owned     the state of one sequence (running, or parked between a session's turns)
    snapshot  the state after an exact token prefix, kept in an LRU: a system prompt (a ``checkpoint`` the
              request names), a fork's parent at the fork, a sequence that was freed or evicted

A state cannot be cut back to an earlier position (unlike KV pages), so prefix sharing is by snapshot: a new
sequence starts from the longest snapshot whose tokens begin its own, copied into its own slot when it first
computes. Unreferenced snapshots are dropped least recently used first when a slot is needed.

A *private* sequence (restored from an untrusted snapshot, ``StateSnapshot.shareable=False``) never becomes a
snapshot others can start from: not at its checkpoints, not when freed (its slot is simply freed), and a fork of it
starts from an unregistered copy only that fork can reach. Once its state is replaced by a registered snapshot
(``rematch``) or freed, it is normal again.

NOTE: a snapshot is registered under its full token tuple (no hashing collisions to reason about); a lookup tries
each distinct snapshot length once, longest first, which is cheap at the tens to thousands of slots a pool holds.

Thread-compatibility: called only from the engine loop thread.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable

import torch

from ..errors import CapacityError, SessionFileError
from .protocol import adopt_cached_prefix, resume_sequence


@dataclasses.dataclass(frozen=True, kw_only=True)
class StateSnapshot:
    """A copy (CPU) of one sequence's recurrent state after ``tokens``: what session files and the store save."""

    tokens: tuple[int, ...]
    state: dict[str, torch.Tensor]   # GriffinSlots.read(): conv.i, rnn.i, k.i, v.i, kpos
    shareable: bool = True           # False: restored as a private sequence (never a snapshot others start from)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())


class _Snapshot:
    __slots__ = ("key", "slot", "refs", "private")

    def __init__(self, key: tuple[int, ...], slot: int, private: bool = False):
        self.key, self.slot, self.refs = key, slot, 0
        self.private = private  # not in the LRU: only the forks holding it reach it; its slot is freed with the last


class SeqState:
    """One sequence: its tokens, how many are in its state, and where that state is (a slot, or a snapshot to copy
    from when it first computes)."""

    __slots__ = ("tokens", "num_computed", "cached_at_start", "slot", "base", "checkpoints", "private")

    def __init__(self, tokens: list[int]):
        self.tokens = tokens
        self.num_computed = 0
        self.cached_at_start = 0
        self.slot: int | None = None
        self.base: _Snapshot | None = None
        self.checkpoints: tuple[int, ...] = ()
        self.private = False  # state from an untrusted snapshot: never registered as a snapshot


class StateCache:
    """The slot pool and its snapshot LRU (see the module docstring)."""

    kind = "recurrent"

    def __init__(self, net, num_slots: int, device: torch.device):
        if num_slots < 2:
            raise ValueError("a state cache needs at least 2 slots")
        self.net = net
        self.device = device
        self.pool = net.new_slots(num_slots)
        self.slot_bytes = self.pool.slot_bytes()
        self.dtype = net.dtype
        self._free = list(range(num_slots - 1, -1, -1))
        self._snapshots: collections.OrderedDict[tuple[int, ...], _Snapshot] = collections.OrderedDict()  # LRU
        self._lengths: collections.Counter[int] = collections.Counter()
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0
        self.evictions = 0
        self.snapshots_taken = 0

    # ------------------------------------------------------------------------------------------ capacity
    @property
    def num_blocks(self) -> int:
        return self.pool.num_slots

    def could_ever_fit(self, num_tokens: int) -> bool:
        return True  # one slot holds any length

    def has_room(self, num_tokens: int) -> bool:
        return bool(self._free) or any(s.refs == 0 for s in self._snapshots.values())

    def describe(self) -> str:
        return f"{self.pool.num_slots} state slots of {self.slot_bytes} bytes"

    def bytes_held(self, seq: SeqState) -> int:
        return self.slot_bytes if seq.slot is not None else 0

    # ------------------------------------------------------------------------------------------ sequences
    def start(self, tokens: list[int], checkpoints: Iterable[int] = ()) -> SeqState:
        """A new sequence starting from the longest snapshot that is a proper prefix of ``tokens``."""
        seq = SeqState(tokens)
        seq.checkpoints = tuple(sorted(c for c in checkpoints if 0 < c < len(tokens)))
        snap = self._match(tokens, len(tokens) - 1)
        self.prefix_queried_tokens += len(tokens)
        if snap is not None:
            self._use(seq, snap)
            self.prefix_hit_tokens += len(snap.key)
        return seq

    def resume(self, seq: SeqState, tokens: list[int]) -> bool:
        """Continue a parked ``seq`` with ``tokens`` if they extend its computed ones (False, unchanged, if not)."""
        return resume_sequence(self, seq, tokens)

    def shared_prefix(self, seq: SeqState, tokens: list[int]) -> int:
        """0: a state is shared through snapshots at checkpoints, taken as the sequence passes them (not held
        back for)."""
        return 0

    def rematch(self, seq: SeqState) -> int:
        """Before a sequence computes anything: a longer snapshot may exist now. Returns the tokens gained."""
        if seq.slot is not None:
            return 0
        snap = self._match(seq.tokens, len(seq.tokens) - 1)
        if snap is None or len(snap.key) <= seq.num_computed:
            return 0
        gained = len(snap.key) - seq.num_computed
        self._drop_base(seq)
        self._use(seq, snap)
        seq.private = False  # it starts from a registered snapshot now; nothing of the untrusted state is left
        self.prefix_hit_tokens += gained
        return gained

    def allocate(self, seq: SeqState, n: int) -> int:
        """Give ``seq`` its own slot (copying its snapshot in) before it computes; returns ``n``, or fewer to cut a
        prefill chunk at the next checkpoint so the state there can be snapshotted. Raises CapacityError."""
        if seq.slot is None:
            slot = self._take_slot()
            if seq.base is not None:
                self.pool.copy(seq.base.slot, slot)
                self._drop_base(seq)
            else:
                self.pool.reset(slot)
            seq.slot = slot
        for c in seq.checkpoints:
            if seq.num_computed < c < seq.num_computed + n:
                return c - seq.num_computed
        return n

    def commit(self, seq: SeqState, n: int) -> None:
        seq.num_computed += n
        if seq.num_computed in seq.checkpoints and not seq.private:
            self._snapshot(seq)

    def fork(self, seq: SeqState) -> SeqState:
        """A new sequence with the same tokens, starting from a snapshot of ``seq``'s state (taken now; a private
        sequence's is an unregistered copy the child alone holds)."""
        child = SeqState(list(seq.tokens[:seq.num_computed]))
        if seq.slot is None:
            snap = seq.base
        else:
            snap = self._private_copy(seq) if seq.private else self._snapshot(seq)
        if snap is not None:
            self._use(child, snap)
            child.private = seq.private
        return child

    def free(self, seq: SeqState) -> None:
        """Release a sequence; its state stays as a snapshot (reusable until its slot is needed) unless private."""
        self._drop_base(seq)
        if seq.slot is not None:
            key = tuple(seq.tokens[:seq.num_computed])
            if key and key not in self._snapshots and not seq.private:
                self._register(key, seq.slot)
            else:
                self._free.append(seq.slot)
            seq.slot = None
        seq.private = False  # it holds nothing now

    def discard(self, seq: SeqState) -> None:
        """Release a sequence without keeping its state as a snapshot (a failed step: the state may be bad)."""
        seq.private = True
        self.free(seq)

    # ------------------------------------------------------------------------------------------ snapshots
    def adopt_prefix(self, tokens: list[int]) -> SeqState:
        return adopt_cached_prefix(self, tokens)

    def export(self, seq: SeqState) -> StateSnapshot | None:
        if seq.slot is not None:
            return StateSnapshot(tokens=tuple(seq.tokens[:seq.num_computed]), state=self.pool.read(seq.slot),
                                 shareable=not seq.private)
        if seq.base is not None:
            return StateSnapshot(tokens=seq.base.key, state=self.pool.read(seq.base.slot), shareable=not seq.private)
        return None

    def import_snapshot(self, snap: StateSnapshot) -> SeqState:
        """A new sequence holding ``snap``'s state (private unless ``snap.shareable``). Raises ValueError for a KV
        snapshot (a caller's mistake), SessionFileError when it does not fit (:meth:`check_snapshot`), CapacityError
        when no slot can be had."""
        if not isinstance(snap, StateSnapshot):
            raise ValueError("a KV snapshot cannot restore a recurrent model's state")
        self.check_snapshot(snap)
        slot = self._take_slot()
        try:
            self.pool.write(slot, snap.state)
        except ValueError:
            self._free.append(slot)
            raise
        seq = SeqState(list(snap.tokens))
        seq.slot, seq.num_computed = slot, snap.num_tokens
        seq.private = not snap.shareable
        return seq

    def check_snapshot(self, snap: object) -> None:
        """Raise SessionFileError unless ``snap`` fits this pool: a StateSnapshot with exactly the pool's state tensors
        (names, per-slot shapes, dtypes) and ring positions (``kpos``) in ``-1 .. num_tokens - 1``.

        Reads only the pool's tensor shapes and dtypes, fixed at construction: safe from any thread. Values (NaN,
        magnitudes) are the session file's check (``sessionfile.decode_session``).
        """
        if not isinstance(snap, StateSnapshot):
            raise SessionFileError("the snapshot is paged KV, not a recurrent state; it does not fit this model")
        if not isinstance(snap.state, dict):
            raise SessionFileError("the recurrent state must be a dict of tensors")
        mine = self.pool.tensors()
        if set(snap.state) != set(mine):
            raise SessionFileError(f"the recurrent state holds {len(snap.state)} tensors that do not match this "
                                   f"model's {len(mine)} (conv / rnn / k / v per layer, kpos)")
        for name, t in mine.items():
            s = snap.state[name]
            if not isinstance(s, torch.Tensor) or s.dtype != t.dtype or tuple(s.shape) != tuple(t.shape[1:]):
                got = f"{s.dtype} {list(s.shape)}" if isinstance(s, torch.Tensor) else type(s).__name__
                raise SessionFileError(f"recurrent state {name}: {got}, expected {t.dtype} {list(t.shape[1:])}")
        kpos = snap.state.get("kpos")
        if kpos is not None and kpos.numel() and (int(kpos.min()) < -1 or int(kpos.max()) >= snap.num_tokens):
            raise SessionFileError("recurrent state kpos: positions outside the snapshot's tokens")

    def reserve(self) -> None:
        for t in self.pool.tensors().values():
            t.zero_()

    def stats(self) -> dict:
        used = self.pool.num_slots - len(self._free) - len(self._snapshots)
        return {
            "cache_kind": self.kind, "state_slots_total": self.pool.num_slots, "state_slots_used": used,
            "state_slots_snapshot": len(self._snapshots), "state_slots_free": len(self._free),
            "state_slot_bytes": self.slot_bytes, "state_snapshots_taken": self.snapshots_taken,
            "blocks_total": self.pool.num_slots, "blocks_used": used + len(self._snapshots),
            "blocks_free": len(self._free), "blocks_cached": len(self._snapshots), "block_size": 0,
            "kv_bytes_total": self.pool.num_slots * self.slot_bytes,
            "kv_bytes_used": (self.pool.num_slots - len(self._free)) * self.slot_bytes,
            "prefix_queried_tokens": self.prefix_queried_tokens, "prefix_hit_tokens": self.prefix_hit_tokens,
            "cache_block_evictions": self.evictions,
        }

    # ------------------------------------------------------------------------------------------ internals
    def _match(self, tokens: list[int], limit: int) -> _Snapshot | None:
        for n in sorted(self._lengths, reverse=True):
            if n <= limit:
                snap = self._snapshots.get(tuple(tokens[:n]))
                if snap is not None:
                    self._snapshots.move_to_end(snap.key)
                    return snap
        return None

    def _use(self, seq: SeqState, snap: _Snapshot) -> None:
        snap.refs += 1
        seq.base = snap
        seq.num_computed = seq.cached_at_start = len(snap.key)

    def _drop_base(self, seq: SeqState) -> None:
        base = seq.base
        if base is not None:
            base.refs -= 1
            seq.base = None
            if base.private and base.refs == 0:
                self._free.append(base.slot)  # unregistered: nobody else can reach it

    def _private_copy(self, seq: SeqState) -> _Snapshot | None:
        """Copy a private sequence's state into an unregistered snapshot (None when no slot can be had)."""
        try:
            slot = self._take_slot()
        except CapacityError:
            return None  # the fork recomputes from its token ids instead
        self.pool.copy(seq.slot, slot)
        return _Snapshot(tuple(seq.tokens[:seq.num_computed]), slot, private=True)

    def _snapshot(self, seq: SeqState) -> _Snapshot | None:
        """Copy ``seq``'s current state into a snapshot slot (None when no slot can be had)."""
        key = tuple(seq.tokens[:seq.num_computed])
        snap = self._snapshots.get(key)
        if snap is not None:
            self._snapshots.move_to_end(key)
            return snap
        try:
            slot = self._take_slot()
        except CapacityError:
            return None  # a snapshot is an optimisation: without room, later sequences recompute
        self.pool.copy(seq.slot, slot)
        self.snapshots_taken += 1
        return self._register(key, slot)

    def _register(self, key: tuple[int, ...], slot: int) -> _Snapshot:
        snap = _Snapshot(key, slot)
        self._snapshots[key] = snap
        self._lengths[len(key)] += 1
        return snap

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        for key, snap in self._snapshots.items():  # least recently used first
            if snap.refs == 0:
                del self._snapshots[key]
                self._lengths[len(key)] -= 1
                if not self._lengths[len(key)]:
                    del self._lengths[len(key)]
                self.evictions += 1
                return snap.slot
        raise CapacityError(f"all {self.pool.num_slots} state slots are in use")

