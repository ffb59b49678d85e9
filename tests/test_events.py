"""The KV event stream: vLLM 0.32.0's wire format, gap-free sequences, replay, Watch, bounds."""

from __future__ import annotations

import queue
import random
import socket
import threading
import time
from typing import Any

import msgspec
import numpy as np
import pytest
import zmq

from conftest import running_daemon
from kvstore import events as ev
from kvstore.errors import InvalidArgument
from kvstore.keys import block_keys

# vLLM 0.32.0's published schema (vllm/distributed/kv_events.py), written here on its own so
# that a change to kvstore.events cannot change what the tests expect.


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[bytes | int]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


VLLM = msgspec.msgpack.Decoder(KVEventBatch)
END_SEQ = b"\xff" * 8  # -1 as 8 signed big-endian bytes
TOPIC = "kv@node-a@model"
WAIT_MS = 10_000  # a poll this long failing means the stream is broken, not slow


def random_keys(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(16) for _ in range(n)]


@pytest.fixture
def log():
    # batches by flush(); room for the 400k keys of the replay tests' 7 MiB
    with ev.EventLog(block_size=16, flush_interval=3600, retained_keys=1 << 20) as event_log:
        yield event_log


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def publisher(log):
    with ev.ZmqPublisher(log, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", TOPIC) as pub:
        yield pub


def subscriber(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
    sub.connect(endpoint)
    return sub


def receive(sub: zmq.Socket) -> tuple[bytes, int, bytes]:
    assert sub.poll(WAIT_MS), "no batch arrived"
    topic, seq, payload = sub.recv_multipart()
    assert len(seq) == 8
    return topic, int.from_bytes(seq, "big"), payload


def join_live(log: ev.EventLog, sub: zmq.Socket) -> int:
    """Publish until `sub` gets the newest batch (PUB drops what it sends before a SUB has
    joined, and what finds the SUB's queue full); return its sequence."""
    deadline = time.monotonic() + WAIT_MS / 1000
    seq = newest = -1
    while seq < 0 or seq < newest:
        if sub.poll(50):
            seq = receive(sub)[1]
        else:
            assert time.monotonic() < deadline, "the subscriber never caught up"
            log.cleared()
            log.flush()
        newest = log.next_sequence - 1
    return seq


def replay(
    ctx: zmq.Context, endpoint: str, start: int, *, busy_for: float = 0
) -> list[tuple[bytes, int, bytes]]:
    """vLLM's replay request from a DEALER, read up to the end marker; asked again while the
    answer is "busy" (as many replays served already), for up to `busy_for` seconds."""
    deadline = time.monotonic() + busy_for
    while True:
        with ctx.socket(zmq.DEALER) as dealer:
            dealer.connect(endpoint)
            dealer.send_multipart([b"", start.to_bytes(8, "big")])
            got = []
            while True:
                assert dealer.poll(WAIT_MS), "the replay stalled"
                frames = dealer.recv_multipart()
                if frames[2] == END_SEQ:
                    break
                empty, topic, seq, payload = frames
                assert empty == b""
                got.append((topic, int.from_bytes(seq, "big"), payload))
        if frames != [b"", b"", END_SEQ, b"busy"] or time.monotonic() > deadline:
            assert frames == [b"", b"", END_SEQ, b""]
            return got


# the wire format


def test_payload_is_vllm_schema_field_by_field(log):
    keys = random_keys(5)
    log.stored(keys[:2], "host", parent=keys[4], token_ids=np.arange(32))
    log.removed(keys[2:3], "disk")
    log.cleared()
    log.stored(keys[3:4], "device")
    batch = log.flush()

    raw = msgspec.msgpack.decode(batch.payload)  # untyped: the shape on the wire
    assert isinstance(raw, list) and len(raw) == 3
    ts, events, dp_rank = raw
    assert isinstance(ts, float) and ts == batch.ts
    assert dp_rank == 0  # vLLM's publisher fills in its rank, 0 without data parallelism
    stored_fields = ["type", "block_hashes", "parent_block_hash", "token_ids", "block_size"]
    stored_fields += ["lora_id", "medium", "lora_name"]  # defaults after these are left out
    assert list(events[0]) == stored_fields and list(events[3]) == stored_fields
    assert list(events[1]) == ["type", "block_hashes", "medium"]
    assert events[2] == {"type": "AllBlocksCleared"}
    assert [e["type"] for e in events] == [
        "BlockStored",
        "BlockRemoved",
        "AllBlocksCleared",
        "BlockStored",
    ]

    stored, removed, cleared, device = VLLM.decode(batch.payload).events
    assert type(stored) is BlockStored and type(removed) is BlockRemoved
    assert type(cleared) is AllBlocksCleared and type(device) is BlockStored
    assert stored.block_hashes == keys[:2]
    assert all(type(h) is bytes and len(h) == 16 for h in stored.block_hashes)
    assert stored.parent_block_hash == keys[4]
    assert stored.token_ids == list(range(32)) and all(type(t) is int for t in stored.token_ids)
    assert stored.block_size == 16
    assert (stored.lora_id, stored.lora_name, stored.extra_keys, stored.group_idx) == (None,) * 4
    assert stored.medium == "CPU"
    assert removed.block_hashes == keys[2:3] and removed.medium == "STORAGE"
    assert device.medium == "GPU" and device.token_ids == [] and device.parent_block_hash is None

    # a vLLM producer holding the same values writes the very same bytes
    same = KVEventBatch(
        ts=batch.ts,
        events=[
            BlockStored(keys[:2], keys[4], list(range(32)), 16, None, "CPU", None),
            BlockRemoved(keys[2:3], "STORAGE"),
            AllBlocksCleared(),
            BlockStored(keys[3:4], None, [], 16, None, "GPU", None),
        ],
        data_parallel_rank=0,
    )
    assert msgspec.msgpack.encode(same) == batch.payload


def test_int_hashes_are_vllms_64_bit_form():
    key, parent = b"\x01" * 8 + b"\xff" * 8, random_keys(1)[0]  # the top bit set: a uint64
    with ev.EventLog(int_hashes=True, flush_interval=3600) as log:
        log.stored([key], "host", parent=parent)
        log.removed([key], "host")
        stored, removed = VLLM.decode(log.flush().payload).events
    vllm_int = int.from_bytes(key, "big") & ((1 << 64) - 1)  # maybe_convert_block_hash
    assert stored.block_hashes == [vllm_int] == [2**64 - 1] == removed.block_hashes
    assert stored.parent_block_hash == int.from_bytes(parent[-8:], "big")
    assert type(stored.block_hashes[0]) is int


@pytest.mark.parametrize(
    ("tier", "medium"), [("device", "GPU"), ("host", "CPU"), ("disk", "STORAGE"), ("nvme", "NVME")]
)
def test_tiers_are_vllm_mediums(log, tier, medium):
    log.stored(random_keys(1), tier)
    log.removed(random_keys(1), tier)
    assert [e.medium for e in VLLM.decode(log.flush().payload).events] == [medium, medium]


def test_no_keys_no_event(log):
    log.stored([], "host")
    log.removed([], "host")
    assert log.flush() is None and log.next_sequence == 0


def test_decodes_a_vllm_engine_payload():
    engine = KVEventBatch(
        ts=1.5,
        events=[BlockStored([7], None, [1, 2], 2, None, "GPU", None, group_idx=0, session_id="s")],
        data_parallel_rank=0,
    )
    (event,) = ev.decode_batch(msgspec.msgpack.encode(engine)).events
    assert isinstance(event, ev.BlockStored)
    assert (event.block_hashes, event.group_idx, event.session_id) == ([7], 0, "s")


# sequencing and batching


def test_sequences_have_no_gaps_across_threads():
    threads, per_thread = 4, 500
    with ev.EventLog(max_batch_events=7, flush_interval=0.001) as log:
        watched: list[ev.Batch] = []
        watcher = threading.Thread(target=lambda: watched.extend(log.watch(0)))
        watcher.start()
        start = threading.Barrier(threads)

        def put(thread: int) -> None:
            start.wait()
            for i in range(per_thread):
                log.stored([thread.to_bytes(8, "big") + i.to_bytes(8, "big")], "host")

        workers = [threading.Thread(target=put, args=(t,)) for t in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    watcher.join()  # the log closed: the watch ends once it has read every batch

    batches = log.retained(0)
    assert [b.sequence for b in batches] == list(range(len(batches)))
    assert watched == batches and len(batches) >= -(-threads * per_thread // 7)
    seen: dict[int, list[int]] = {t: [] for t in range(threads)}
    for batch in batches:
        for event in VLLM.decode(batch.payload).events:
            (key,) = event.block_hashes
            seen[int.from_bytes(key[:8], "big")].append(int.from_bytes(key[8:], "big"))
    assert seen == {t: list(range(per_thread)) for t in range(threads)}  # each in its order


def test_batches_seal_by_size_and_by_interval():
    with ev.EventLog(max_batch_events=3, flush_interval=3600) as log:
        log.cleared()
        log.cleared()
        assert log.next_sequence == 0
        log.cleared()
        assert log.next_sequence == 1  # sealed by the third append itself
    with ev.EventLog(flush_interval=0.01) as log:
        log.stored(random_keys(1), "host")
        batch = next(log.watch(0, timeout=WAIT_MS / 1000))  # sealed by the flusher alone
        assert batch.sequence == 0 and len(batch.events) == 1


def test_close_seals_the_tail_and_ends_watchers(log):
    got: queue.Queue[ev.Batch | None] = queue.Queue()
    watch = log.watch()

    def drain() -> None:
        for batch in watch:
            got.put(batch)
        got.put(None)

    thread = threading.Thread(target=drain)
    thread.start()
    log.stored(random_keys(1), "host")
    log.close()
    assert got.get(timeout=WAIT_MS / 1000).sequence == 0
    assert got.get(timeout=WAIT_MS / 1000) is None
    thread.join()
    log.stored(random_keys(1), "host")  # ignored, never raised into a put
    assert log.next_sequence == 1


# Watch


def test_watch_yields_missed_batches_then_live_ones(log):
    for i in range(10):
        log.stored(random_keys(1, seed=i), "host")
        log.flush()
    got: queue.Queue[ev.Batch] = queue.Queue()
    watch = log.watch(3)
    thread = threading.Thread(target=lambda: [got.put(b) for b in watch])
    thread.start()
    missed = [got.get(timeout=WAIT_MS / 1000) for _ in range(7)]
    assert [b.sequence for b in missed] == list(range(3, 10))
    assert [b.payload for b in missed] == [b.payload for b in log.retained(3)]
    log.removed(random_keys(1), "host")
    live = log.flush()
    assert got.get(timeout=WAIT_MS / 1000) is live
    watch.cancel()
    thread.join()
    assert got.empty()


def test_watch_defaults_to_the_live_end(log):
    log.cleared()
    log.flush()
    watch = log.watch(timeout=0)
    assert list(watch) == []
    log.cleared()
    assert [b.sequence for b in (log.flush(), *watch)] == [1, 1]


def test_watch_of_a_dropped_sequence_is_too_old():
    with ev.EventLog(retained_batches=4, flush_interval=3600) as log:
        early = log.watch(0)
        skipping = log.watch(0, skip_lost=True)
        for _ in range(10):
            log.cleared()
            log.flush()
        assert log.oldest_sequence == 6
        with pytest.raises(ev.SequenceTooOld) as too_old:
            next(log.watch(2))
        assert (too_old.value.requested, too_old.value.oldest) == (2, 6)
        with pytest.raises(ev.SequenceTooOld):
            next(early)  # overtaken while it was not reading
        assert next(skipping).sequence == 6 and skipping.lost == 6
        assert [b.sequence for b in log.watch(6, timeout=0)] == [6, 7, 8, 9]


def test_retention_is_bounded_by_keys_too():
    with ev.EventLog(retained_keys=10, flush_interval=3600) as log:
        for i in range(5):
            log.stored(random_keys(4, seed=i), "host")
            log.flush()
        assert [b.sequence for b in log.retained(0)] == [3, 4]


def test_watch_rejects_a_sequence_not_reached(log):
    log.cleared()
    log.flush()
    with pytest.raises(InvalidArgument) as bad:
        log.watch(2)
    assert bad.value.field == "from_sequence"


def test_watch_times_out_and_cancels(log):
    assert list(log.watch(timeout=0.01)) == []
    watch = log.watch()
    ended = threading.Event()
    thread = threading.Thread(target=lambda: (list(watch), ended.set()))
    thread.start()
    watch.cancel()
    assert ended.wait(WAIT_MS / 1000)
    thread.join()


# ZMQ: vLLM's publisher protocol


def test_publishes_vllm_frames(log, publisher, ctx):
    host, port = publisher.endpoint.rsplit(":", 1)
    assert host == "tcp://127.0.0.1" and int(port) > 0
    sub = subscriber(ctx, publisher.endpoint)
    join_live(log, sub)
    log.stored(random_keys(3), "disk")
    batch = log.flush()
    frames = receive(sub)
    assert frames == (TOPIC.encode(), batch.sequence, batch.payload)
    assert VLLM.decode(frames[2]).events[0].medium == "STORAGE"


def test_late_subscriber_replays_what_it_missed(log, publisher, ctx):
    early = subscriber(ctx, publisher.endpoint)
    first = join_live(log, early)
    for i in range(25):
        log.stored(random_keys(2, seed=i), "host")
        log.flush()
    live = dict(receive(early)[1:] for _ in range(log.next_sequence - first - 1))

    late = subscriber(ctx, publisher.endpoint)
    joined = join_live(log, late)
    replayed = replay(ctx, publisher.replay_endpoint, 0)
    assert [seq for _, seq, _ in replayed] == list(range(len(replayed)))
    assert len(replayed) >= joined  # every batch before the first it got live, and no gap
    assert {topic for topic, _, _ in replayed} == {TOPIC.encode()}
    for _, seq, payload in replayed:
        assert payload == log.retained(seq, seq + 1)[0].payload
        if seq in live:
            assert payload == live[seq]  # byte for byte what PUB sent
    assert set(live) <= {seq for _, seq, _ in replayed}


def test_replay_ignores_malformed_requests_and_ends_with_the_marker(log, publisher, ctx):
    sub = subscriber(ctx, publisher.endpoint)
    joined = join_live(log, sub)
    log.cleared()
    log.flush()
    assert receive(sub)[1] == joined + 1  # sent: every batch before it can be replayed
    with ctx.socket(zmq.DEALER) as dealer:
        dealer.connect(publisher.replay_endpoint)
        dealer.send_multipart([b"", b"abc"])  # not 8 bytes: no answer at all
        dealer.send_multipart([b"", (joined + 100).to_bytes(8, "big")])  # past the end
        assert dealer.poll(WAIT_MS)
        assert dealer.recv_multipart() == [b"", b"", END_SEQ, b""]
    replayed = [seq for _, seq, _ in replay(ctx, publisher.replay_endpoint, 0)]
    assert replayed[: joined + 1] == list(range(joined + 1))  # the replay socket still serves


def test_replay_larger_than_zmq_default_high_water_mark(ctx):
    with (
        ev.EventLog(retained_batches=2000, flush_interval=3600) as log,
        ev.ZmqPublisher(log, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", TOPIC) as publisher,
    ):
        for _ in range(1500):
            log.cleared()
            log.flush()
        joined = join_live(log, subscriber(ctx, publisher.endpoint))
        assert len(replay(ctx, publisher.replay_endpoint, 0)) >= joined >= 1499  # 0..joined-1


def test_publisher_connects_to_a_router_that_binds(log, ctx):
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind("tcp://127.0.0.1:*")  # as llm-d's indexer does
    endpoint = sub.getsockopt_string(zmq.LAST_ENDPOINT)
    with ev.ZmqPublisher(log, endpoint) as pub:
        assert pub.endpoint == endpoint and pub.replay_endpoint is None
        assert join_live(log, sub) >= 0


def test_ipc_endpoints(log, ctx, tmp_path):
    with ev.ZmqPublisher(log, f"ipc://{tmp_path}/pub", f"ipc://{tmp_path}/replay", TOPIC) as pub:
        joined = join_live(log, subscriber(ctx, pub.endpoint))
        assert len(replay(ctx, pub.replay_endpoint, 0)) >= joined


def test_appends_never_block_without_readers(ctx):
    """Nobody reads the PUB socket or the Watch; appends run on, the log stays bounded."""
    with ev.EventLog(max_batch_events=10, retained_batches=50, flush_interval=3600) as log:
        pub = ev.ZmqPublisher(log, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", hwm=1)
        stalled = subscriber(ctx, pub.endpoint)
        idle = log.watch(0)
        keys = random_keys(64)
        appender = threading.Thread(
            target=lambda: [log.stored(keys[i % 64 : i % 64 + 1], "host") for i in range(20_000)]
        )
        appender.start()
        appender.join(timeout=120)
        assert not appender.is_alive()
        assert log.next_sequence == 2_000
        assert len(log.retained(0)) == 50 and log.oldest_sequence == 1_950
        with pytest.raises(ev.SequenceTooOld):
            next(idle)
        pub.close()
        stalled.close(linger=0)


def test_close_publishes_the_tail(ctx):
    log = ev.EventLog(flush_interval=3600)
    pub = ev.ZmqPublisher(log, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", TOPIC)
    sub = subscriber(ctx, pub.endpoint)
    join_live(log, sub)
    log.removed(random_keys(1), "host")  # pending, not flushed
    log.close()  # the daemon's shutdown order: the log, then the publisher
    pub.close()
    _, seq, payload = receive(sub)
    assert seq == log.next_sequence - 1 and VLLM.decode(payload).events[0].medium == "CPU"


def test_a_failed_bind_leaves_nothing_open(log, ctx):
    taken = ctx.socket(zmq.ROUTER)
    taken.bind("tcp://127.0.0.1:*")
    with pytest.raises(zmq.ZMQError):
        ev.ZmqPublisher(log, "tcp://127.0.0.1:*", taken.getsockopt_string(zmq.LAST_ENDPOINT))
    with ev.ZmqPublisher(log, "tcp://127.0.0.1:*", topic=TOPIC) as pub:  # the log still works
        assert join_live(log, subscriber(ctx, pub.endpoint)) >= 0


# slow readers: what they may cost the node


def stalled_dealer(ctx: zmq.Context, endpoint: str, start: int = 0) -> zmq.Socket:
    """A replay client that asks and never reads, taking as little as it can on its side."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVHWM, 1)
    dealer.setsockopt(zmq.RCVBUF, 4096)
    dealer.connect(endpoint)
    dealer.send_multipart([b"", start.to_bytes(8, "big")])
    return dealer


def test_replays_past_the_limit_are_refused_with_an_end_marker(log, ctx):
    keys = random_keys(2000)
    for _ in range(200):  # 7 MiB: a client that does not read cannot have it all yet
        log.stored(keys, "host")
        log.flush()
    opts = {"replay_clients": 2, "replay_hwm": 4, "replay_stall": 3600}
    with ev.ZmqPublisher(log, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", TOPIC, **opts) as pub:
        join_live(log, subscriber(ctx, pub.endpoint))  # every batch before it: replayable
        stalled = [stalled_dealer(ctx, pub.replay_endpoint) for _ in range(2)]
        for dealer in stalled:
            assert dealer.poll(WAIT_MS)  # served: its first batch arrived
        with ctx.socket(zmq.DEALER) as third:
            third.connect(pub.replay_endpoint)
            third.send_multipart([b"", (0).to_bytes(8, "big")])
            assert third.poll(WAIT_MS)
            assert third.recv_multipart() == [b"", b"", END_SEQ, b"busy"]
        # the stalled ones read again: each gets its whole replay, paced by its queue
        for dealer in stalled:
            seqs = []
            while True:
                assert dealer.poll(WAIT_MS), "the replay stalled"
                frames = dealer.recv_multipart()
                if frames[2] == END_SEQ:
                    assert frames == [b"", b"", END_SEQ, b""]
                    break
                seqs.append(int.from_bytes(frames[2], "big"))
            assert seqs == list(range(len(seqs))) and len(seqs) >= 200
            dealer.close(linger=0)
        assert len(replay(ctx, pub.replay_endpoint, 0)) >= 200  # the slots are free again


def test_a_replay_client_that_stops_reading_is_dropped(log, ctx):
    keys = random_keys(2000)
    for _ in range(200):  # 7 MiB: more than the sockets' buffers between the two ends hold
        log.stored(keys, "host")
        log.flush()
    opts = {"replay_clients": 1, "replay_hwm": 4, "replay_stall": 0.2}
    with ev.ZmqPublisher(log, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", TOPIC, **opts) as pub:
        join_live(log, subscriber(ctx, pub.endpoint))
        stalled = stalled_dealer(ctx, pub.replay_endpoint)
        assert stalled.poll(WAIT_MS)
        # its one slot frees once it has taken nothing for replay_stall seconds
        assert len(replay(ctx, pub.replay_endpoint, 0, busy_for=WAIT_MS / 1000)) >= 200
        seqs = []
        while True:  # it reads again: a gap-free start, then the end marker saying why
            assert stalled.poll(WAIT_MS)
            frames = stalled.recv_multipart()
            if frames[2] == END_SEQ:
                assert frames == [b"", b"", END_SEQ, b"dropped"]
                break
            seqs.append(int.from_bytes(frames[2], "big"))
        assert seqs == list(range(len(seqs))) and len(seqs) < 200
        stalled.close(linger=0)


def test_batches_are_bounded_by_keys(log):
    with ev.EventLog(block_size=2, max_batch_keys=4, flush_interval=3600) as small:
        keys = random_keys(10)
        small.stored(keys, "host", parent=b"p" * 16, token_ids=list(range(20)))
        small.removed(keys[:3], "host")
        small.flush()
        batches = small.retained(0)
    assert [b.key_count for b in batches] == [4, 4, 2, 3]
    stored = [VLLM.decode(b.payload).events[0] for b in batches[:3]]
    assert [e.block_hashes for e in stored] == [keys[:4], keys[4:8], keys[8:]]
    assert [e.parent_block_hash for e in stored] == [b"p" * 16, keys[3], keys[7]]  # a chain
    assert [e.token_ids for e in stored] == [list(range(8)), list(range(8, 16)), [16, 17, 18, 19]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_readers_that_never_read_cost_the_daemon_little_memory():
    """20 replay clients and 5 subscribers that never read, against a daemon whose event log
    holds ~12 MiB of batches (all it keeps). Unbounded, each replay client cost a copy of the
    log and each subscriber every batch since it stopped: the daemon grew by ~370 MiB here.
    Bounded, 8 replays are served at once (the others refused) with 16 batches queued each,
    a subscriber queues 128 batches, batches here are ~23 KiB: (5 * 128 + 8 * 17 + 12) *
    23 KiB ~ 18 MiB; the log itself is full already."""
    pub, rep = free_port(), free_port()
    flags = (
        "--host-capacity", "16MiB",  # puts evict: every put is a stored and a removed event
        "--events-address", f"tcp://*:{pub}",  # "*": bound (without it, connected to)
        "--events-replay", f"tcp://127.0.0.1:{rep}", "--events-topic", TOPIC,
    )  # fmt: skip
    ctx = zmq.Context()
    rounds, more, per_put = 100, 20, 1000  # more: ~300 batches, past every queue's bound
    puts = [block_keys(np.arange(per_put * 16), 16, b"put %d" % i) for i in range(rounds + more)]
    with running_daemon(*flags) as daemon, daemon.client() as client:

        def put(first: int, last: int) -> None:
            for keys in puts[first:last]:
                client.put(keys, [b"x"] * per_put)

        def replay_has(last_keys: list[bytes]) -> list[tuple[bytes, int, bytes]]:
            """A well-behaved replay from 0, asked until it holds the last put's keys."""
            deadline = time.monotonic() + 60
            while True:
                got = replay(ctx, f"tcp://127.0.0.1:{rep}", 0, busy_for=60)
                stored = {
                    key
                    for _, _, payload in got[-50:]
                    for event in VLLM.decode(payload).events
                    if type(event) is BlockStored
                    for key in event.block_hashes
                }
                if set(last_keys) <= stored or time.monotonic() > deadline:
                    return got

        put(0, rounds)
        before = replay_has(puts[rounds - 1])
        assert sum(len(payload) for _, _, payload in before) > 8 << 20  # the log: > 8 MiB
        baseline = rss_mib(daemon.process.pid)

        subs = []
        for _ in range(5):
            sub = subscriber(ctx, f"tcp://127.0.0.1:{pub}")
            sub.setsockopt(zmq.RCVHWM, 1)
            subs.append(sub)
        deadline = time.monotonic() + WAIT_MS / 1000
        while not all(sub.poll(0) for sub in subs):  # joined: a batch waits, unread
            assert time.monotonic() < deadline, "the subscribers never joined"
            client.put(puts[0][:1], [b"y"])
            client.delete(puts[0][:1])
        dealers = [stalled_dealer(ctx, f"tcp://127.0.0.1:{rep}") for _ in range(20)]
        put(rounds, rounds + more)  # live batches for the stopped subscribers' queues

        got = replay_has(puts[-1])  # served after every stalled request, whole
        grown = rss_mib(daemon.process.pid) - baseline
        seqs = [seq for _, seq, _ in got]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # gap-free from the oldest kept
        assert seqs[-1] > before[-1][1]
        events = [e for _, _, payload in got for e in VLLM.decode(payload).events]
        stored = {k for e in events if type(e) is BlockStored for k in e.block_hashes}
        assert all(key in stored for keys in puts[rounds:] for key in keys)  # nothing lost
        assert grown < 64, f"the daemon grew by {grown:.0f} MiB"
        for sock in subs + dealers:
            sock.close(linger=0)
    ctx.destroy(linger=0)
