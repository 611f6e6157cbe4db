import pytest
import torch

from recsys.ops import jagged


def _case(seed=0, batch=7, dim=3, max_len=9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 3, (batch,), generator=g)
    lengths[:2] = torch.tensor([max_len + 2, 0])  # always one row to cut and one empty row
    values = torch.randn(int(lengths.sum()), dim, generator=g, dtype=torch.float32)
    return lengths, values, max_len


def test_fbgemm_is_used_on_cpu():
    assert jagged.fbgemm_supports("cpu"), "fbgemm-gpu-cpu is installed, its CPU kernels must be picked"
    assert jagged.kernel_backend(torch.device("cpu")) == "fbgemm"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_offsets_match(seed):
    lengths, _, _ = _case(seed)
    assert torch.equal(jagged.lengths_to_offsets(lengths), jagged.lengths_to_offsets_torch(lengths))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_padding_forward_and_backward_match(seed):
    lengths, values, max_len = _case(seed)
    offsets = jagged.lengths_to_offsets_torch(lengths)
    a = values.clone().requires_grad_()
    b = values.clone().requires_grad_()
    dense_fb = jagged.jagged_to_padded_dense(a, offsets, max_len, -1.0)
    dense_pt = jagged.jagged_to_padded_dense_torch(b, offsets, max_len, -1.0)
    assert torch.equal(dense_fb, dense_pt)
    weight = torch.randn_like(dense_fb)
    (dense_fb * weight).sum().backward()
    (dense_pt * weight).sum().backward()
    assert torch.allclose(a.grad, b.grad)
    # rows longer than max_len are cut to their first max_len values, shorter ones padded with the pad value
    assert int(lengths.max()) > max_len and int(lengths.min()) < max_len  # the case has both kinds of rows
    for row, start in enumerate(offsets[:-1].tolist()):
        kept = min(int(lengths[row]), max_len)
        assert torch.equal(dense_fb[row, :kept], values[start : start + kept])
        assert bool((dense_fb[row, kept:] == -1.0).all())


def test_dense_to_jagged_round_trip():
    lengths = torch.tensor([2, 0, 3])
    offsets = jagged.lengths_to_offsets(lengths)
    values = torch.arange(10.0).view(5, 2)
    dense = jagged.jagged_to_padded_dense(values, offsets, 3)
    assert torch.equal(jagged.dense_to_jagged(dense, offsets), values)
    assert torch.equal(jagged.dense_to_jagged_torch(dense, offsets), values)
    assert dense[1].abs().sum() == 0


def test_workspace_pool_keeps_at_most_its_limit_and_drops_the_smallest():
    from recsys.ops.workspace import _MAX_FREE, Workspace

    pool, like = Workspace(), torch.zeros(1)
    taken = [pool.take(rows, 10, like)[0] for rows in range(1, _MAX_FREE + 3)]  # buffers of different sizes
    for flat in taken:
        pool.give(flat)  # used to raise: list.remove compared tensors of different sizes element-wise
    assert len(pool.free) == _MAX_FREE
    assert min(f.numel() for f in pool.free) > min(f.numel() for f in taken)
    flat, view = pool.take(3, 10, like)
    assert view.shape == (3, 10) and flat.numel() >= 30
