"""T5's per-request cross-attention cache and relative-position tables (worker/layers/encdec.py,
worker/layers/position.py): rows written once, freed and reused; a step reads a view (or one
gather) of the rows; lengths that differ within a step are masked; the per-distance bias table
gives exactly the bucketed bias; the encoder's attention over several requests back to back equals
each request's own."""

import torch

from worker.context import StepContext
from worker.layers.encdec import S_ALIGN, CrossCache, full_attend
from worker.layers.position import RelativePositionBias

H, D, LAYERS = 2, 4, 3


def _states(S: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(S, H, D, generator=g), torch.randn(S, H, D, generator=g)) for _ in range(LAYERS)]


def _ctx(B: int) -> StepContext:
    ones = torch.ones(B, dtype=torch.long)
    return StepContext(slot_mapping=torch.zeros(B, dtype=torch.long), block_tables=torch.zeros(B, 1, dtype=torch.long),
                       context_lens=ones, query_lens=ones, query_start=torch.arange(B + 1), max_query_len=1,
                       max_context_len=1, block_size=16)


def _check_rows(cache: CrossCache, slots: list[int], states: dict):
    step = cache.step(slots, _ctx(len(slots)))
    S = max(states[s][0][0].shape[0] for s in slots)
    assert step.kv.shape == (2, LAYERS, len(slots), H, S, D)
    for b, s in enumerate(slots):
        n = states[s][0][0].shape[0]
        for layer, (k, v) in enumerate(states[s]):
            assert torch.equal(step.kv[0, layer, b, :, :n], k.transpose(0, 1))
            assert torch.equal(step.kv[1, layer, b, :, :n], v.transpose(0, 1))
        if step.mask is not None:
            assert (step.mask[b, 0, 0, :n] == 0).all() and torch.isinf(step.mask[b, 0, 0, n:]).all()
    assert (step.mask is None) == (len({states[s][0][0].shape[0] for s in slots}) == 1)
    return step


def test_rows_are_written_once_freed_and_reused_and_steps_read_them():
    cache = CrossCache()
    states = {slot: _states(S, slot) for slot, S in [(10, 5), (11, 9), (12, 3)]}
    for slot in (10, 11, 12):
        cache.put(slot, states[slot])
    assert len(cache) == 3 and cache.rows == {10: 0, 11: 1, 12: 2}
    step = _check_rows(cache, [10, 11, 12], states)  # rows side by side: a view of the buffer
    assert step.kv.data_ptr() == cache.buf.data_ptr()
    step = _check_rows(cache, [12, 10], states)  # out of order: one gather
    assert step.kv.data_ptr() != cache.buf.data_ptr()
    cache.drop(10)
    cache.drop(10)  # twice is harmless
    assert 10 not in cache and len(cache) == 2
    states[13] = _states(7, 13)
    cache.put(13, states[13])
    assert cache.rows[13] == 0  # the freed row is reused
    _check_rows(cache, [12, 13], states)  # the gathered view of before must not be served stale
    _check_rows(cache, [13, 11, 12], states)


def test_the_buffer_grows_in_rows_and_length_keeping_every_row():
    cache = CrossCache()
    states = {}
    for slot in range(5):  # more rows than the first allocation
        states[slot] = _states(3 + slot, slot)
        cache.put(slot, states[slot])
    states[9] = _states(S_ALIGN + 5, 9)  # longer than the buffer holds
    cache.put(9, states[9])
    assert cache.buf.shape[4] >= S_ALIGN + 5 and cache.buf.shape[2] >= 6
    _check_rows(cache, [0, 1, 2, 3, 4, 9], states)
    _check_rows(cache, [4, 0], states)


def test_pipeline_stage_keeps_only_its_own_layers():
    cache = CrossCache()
    k, v = torch.randn(4, H, D), torch.randn(4, H, D)
    cache.put(0, [None, (k, v), None])
    assert cache.layer_index == {1: 0} and cache.buf.shape[1] == 1
    cache.put(1, [None, None, None])  # a stage without decoder layers keeps nothing
    assert 1 not in cache


def test_distance_table_equals_the_bucketed_bias():
    torch.manual_seed(0)
    for bidirectional in (True, False):
        rb = RelativePositionBias(32, 4, 128, bidirectional)
        rb.weight.data.normal_()
        S = 300  # past max_distance, and past the table's first size (it grows)
        pos = torch.arange(S)
        assert torch.equal(rb.square(S), rb(pos[None, :] - pos[:, None]))
        q_start = torch.tensor([0, 17, 250])
        Q, K = 3, 260
        q_pos = q_start[:, None] + torch.arange(Q)[None, :]
        assert torch.equal(rb.span(q_start, Q, K), rb(torch.arange(K)[None, None, :] - q_pos[:, :, None]))


def test_encoder_attention_of_requests_back_to_back_equals_each_alone():
    g = torch.Generator().manual_seed(3)
    lens = [5, 1, 9]
    q, k, v = (torch.randn(sum(lens), H, D, generator=g) for _ in range(3))
    bias = [torch.randn(H, n, n, generator=g) for n in lens]
    out = full_attend(q, k, v, bias, 1.0)
    at = 0
    for n, b in zip(lens, bias):
        alone = full_attend(q[at:at + n], k[at:at + n], v[at:at + n], [b], 1.0)
        torch.testing.assert_close(out[at:at + n], alone, rtol=0, atol=0)
        at += n
