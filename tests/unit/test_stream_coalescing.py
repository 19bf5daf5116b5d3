"""The worker's per-request stream queue: events that piled up while the controller was behind
leave as one message; and the controller's Codec decodes exactly as transformers does."""

import queue
import random
from pathlib import Path

from worker.engine.sequence import Finish
from worker.stream import coalesce


def test_coalesce_merges_queued_tokens_in_order_and_stops_at_finish():
    q = queue.SimpleQueue()
    for t in (5, 6, 7):
        q.put(([t], [-0.1 * t], None, ""))
    q.put(([8], [-0.8], Finish.LENGTH, ""))
    q.put(([99], [0.0], None, ""))  # never happens in the engine; shows coalescing stops at the finish
    assert coalesce(q) == ([5, 6, 7, 8], [-0.5, -0.6000000000000001, -0.7000000000000001, -0.8], Finish.LENGTH, "")
    assert coalesce(q)[0] == [99]


def test_coalesce_one_event_and_errors_pass_through():
    q = queue.SimpleQueue()
    q.put(([3], [], None, ""))
    assert coalesce(q) == ([3], [], None, "")
    q.put(([], [], Finish.ERROR, "boom"))
    assert coalesce(q) == ([], [], Finish.ERROR, "boom")


def test_codec_decode_matches_transformers():
    from controller.acquire.demo_model import demo_model_path
    from controller.tokenizer import Codec

    codec = Codec(demo_model_path(Path.home() / ".cache" / "shardserve" / "bench"))
    assert codec._rust_decode is not None  # the demo tokenizer is a fast one: the direct path is taken
    rng = random.Random(0)
    special = list(codec.tok.all_special_ids)
    for _ in range(200):
        ids = [rng.randrange(codec.vocab_size) for _ in range(rng.randrange(0, 12))] + rng.sample(special, 1)
        rng.shuffle(ids)
        want = codec.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert codec.decode(ids) == want
