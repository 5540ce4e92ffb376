"""Gradient partitioning and all-to-all micro-op splits (pure functions, no processes)."""

import pytest
import torch

from lina.comm.partition import (
    a2a_micro_rows,
    chunk_count,
    chunk_counts,
    is_view_of,
    partition,
    reassemble,
    split_a2a,
)
from lina.errors import ConfigError


def test_partition_contiguous_gives_equal_views_last_shorter():
    grad = torch.arange(1000, dtype=torch.float32).reshape(10, 100)
    chunks = partition(grad, chunk_bytes=256)  # 64 float32 per chunk
    assert [c.numel() for c in chunks] == [64] * 15 + [40]
    assert all(c.dim() == 1 for c in chunks)
    assert is_view_of(chunks, grad)
    # views: writing into a chunk writes into the gradient, so reassembly is free
    for c in chunks:
        c.mul_(2)
    assert torch.equal(grad.view(-1), torch.arange(1000, dtype=torch.float32) * 2)
    assert reassemble(chunks, grad) is grad
    assert torch.equal(torch.cat(chunks), grad.view(-1))


def test_partition_rounds_chunk_down_to_whole_elements():
    grad = torch.zeros(10, dtype=torch.float64)
    assert [c.numel() for c in partition(grad, chunk_bytes=20)] == [2] * 5  # 20 B -> 2 doubles
    assert chunk_count(10, 8, 20) == 5


def test_partition_one_chunk_when_tensor_is_small_and_empty_tensor_has_none():
    grad = torch.ones(3, 3)
    chunks = partition(grad, chunk_bytes=30 * 2**20)
    assert len(chunks) == 1 and chunks[0].numel() == 9 and is_view_of(chunks, grad)
    assert partition(torch.empty(0, 4), chunk_bytes=64) == []
    assert chunk_count(0, 4, 64) == 0


def test_partition_non_contiguous_copies_then_reassemble_writes_back():
    base = torch.arange(200, dtype=torch.float32).reshape(10, 20)
    grad = base.t()  # [20, 10], not contiguous
    chunks = partition(grad, chunk_bytes=28)  # 7 floats per chunk
    assert [c.numel() for c in chunks] == [7] * 28 + [4]
    assert not is_view_of(chunks, grad)
    assert torch.equal(torch.cat(chunks), grad.reshape(-1))
    for c in chunks:
        c.add_(1)
    reassemble(chunks, grad)
    assert torch.equal(base, torch.arange(200, dtype=torch.float32).reshape(10, 20) + 1)


def test_reassemble_copies_when_chunks_are_not_views_and_checks_sizes():
    grad = torch.zeros(2, 5)
    chunks = [torch.full((4,), 1.0), torch.full((4,), 2.0), torch.full((2,), 3.0)]
    reassemble(chunks, grad)
    assert grad.view(-1).tolist() == [1.0] * 4 + [2.0] * 4 + [3.0] * 2
    with pytest.raises(ConfigError, match="chunks"):
        reassemble(chunks[:2], grad)


def test_is_view_of_rejects_views_out_of_order():
    grad = torch.zeros(8)
    a, b = partition(grad, chunk_bytes=16)
    assert is_view_of([a, b], grad)
    assert not is_view_of([b, a], grad)
    assert not is_view_of([a], grad)


def test_chunk_counts_per_parameter_never_mixes_tensors():
    params = [torch.zeros(100), torch.zeros(3, 7, dtype=torch.float16), torch.zeros(0), torch.zeros(64)]
    # 64 B chunks: 16 float32 or 32 float16 per chunk
    assert chunk_counts(params, 64) == [7, 1, 0, 4]
    assert sum(chunk_counts(params, 64)) == sum(len(partition(p, 64)) for p in params)


def test_bad_chunk_bytes_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match="chunk_bytes"):
        partition(torch.zeros(4), chunk_bytes=2)
    with pytest.raises(ConfigError, match="chunk_bytes"):
        chunk_counts([torch.zeros(4)], chunk_bytes=1.5)


def test_split_a2a_near_equal_contiguous_pieces_and_zero_peers():
    splits = [10, 0, 3, 7]
    out = split_a2a(splits, 3)
    assert out == [[4, 0, 1, 3], [3, 0, 1, 2], [3, 0, 1, 2]]
    for p, total in enumerate(splits):
        pieces = [out[j][p] for j in range(3)]
        assert sum(pieces) == total and max(pieces) - min(pieces) <= 1
    assert split_a2a(splits, 1) == [splits]
    assert split_a2a([2, 0], 4) == [[1, 0], [1, 0], [0, 0], [0, 0]]


def test_split_a2a_receive_side_matches_senders_cut():
    # rank r sends send[r][p] tokens to p; p receives piece j of r's count in micro-op j
    send = [[5, 2, 0], [1, 9, 4], [0, 3, 8]]
    m = 3
    for p in range(3):
        recv_counts = [send[r][p] for r in range(3)]
        recv_pieces = split_a2a(recv_counts, m)
        for j in range(m):
            assert recv_pieces[j] == [split_a2a(send[r], m)[j][p] for r in range(3)]


def test_split_a2a_validates_inputs():
    with pytest.raises(ConfigError, match="m"):
        split_a2a([1, 2], 0)
    with pytest.raises(ConfigError, match="send_splits"):
        split_a2a([1, -2], 2)


def test_a2a_micro_rows_cover_the_send_buffer_once_in_peer_order():
    splits = [5, 0, 4]
    rows = a2a_micro_rows(splits, 2)
    # peer 0 owns rows 0..4, peer 2 rows 5..8
    assert rows[0].tolist() == [0, 1, 2, 5, 6]
    assert rows[1].tolist() == [3, 4, 7, 8]
    assert sorted(torch.cat(rows).tolist()) == list(range(9))
    pieces = split_a2a(splits, 2)
    assert [r.numel() for r in rows] == [sum(p) for p in pieces]
    assert a2a_micro_rows([0, 0], 2)[1].numel() == 0
