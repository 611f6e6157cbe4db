"""The torch id map (:meth:`IdMapper.to_torch`, :class:`~recsys.ops.id_map.DeviceIdMap`) returns the numpy
``IdMapper``'s rows for every form of map (dense table, sorted search over a wide id range, identity) on ids
seen, unseen, below and above the map's range, at the int64 extremes, and in int32 or int64 tensors of any
shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.bundle import IdMapper

I64 = np.iinfo(np.int64)


def mappers(rng: np.random.Generator) -> dict[str, tuple[IdMapper, np.ndarray]]:
    """Each form of map with the raw ids it holds (none for the identity map)."""
    narrow = rng.choice(np.arange(-50, 10**5), 700, replace=False)
    wide = np.concatenate([rng.choice(np.arange(10**6), 300, replace=False), [-(10**15), 10**15, 2**62]])
    forms = {
        "dense": (IdMapper(narrow, rng.permutation(700) + 1, 700), narrow),
        "search": (IdMapper(wide, rng.permutation(len(wide)) + 1, len(wide)), wide),
        "identity": (IdMapper(None, None, 500), np.arange(1, 501)),
        "one id": (IdMapper(np.array([7]), np.array([3]), 3), np.array([7])),
    }
    assert forms["dense"][0]._dense is not None and forms["search"][0]._dense is None
    return forms


def query(rng: np.random.Generator, raw: np.ndarray) -> np.ndarray:
    """``[40, 50]`` ids: half held by the map, the rest unseen (inside, below and above its range) and extremes."""
    extremes = [I64.max, I64.min, 0, -1, 1, raw.min() - 1, raw.max() + 1, raw.min(), raw.max(), 2**31, -(2**31)]
    unseen = rng.integers(int(raw.min()) - 1000, int(raw.max()) + 1000, 1000 - len(extremes))
    ids = np.concatenate([rng.choice(raw, 1000), unseen, extremes])
    return rng.permutation(ids).reshape(40, 50)


def check_on(device: str) -> None:
    rng = np.random.default_rng(0)
    for name, (mapper, raw) in mappers(rng).items():
        ids = query(rng, raw)
        expected = mapper(ids)
        assert (expected < 0).any() and (expected > 0).any(), name
        table = mapper.to_torch(device)
        got = table(torch.from_numpy(ids).to(device))
        assert got.dtype == torch.int64 and got.device.type == torch.device(device).type, name
        np.testing.assert_array_equal(got.cpu().numpy(), expected, err_msg=name)
        small = ids[(ids >= np.iinfo(np.int32).min) & (ids <= np.iinfo(np.int32).max)]  # as pad_jagged's int32
        got32 = table(torch.from_numpy(small.astype(np.int32)).to(device))
        np.testing.assert_array_equal(got32.cpu().numpy(), mapper(small), err_msg=f"{name}, int32")


def test_torch_id_map_equals_the_numpy_map():
    check_on("cpu")


def test_torch_id_map_of_an_empty_sorted_map_sees_nothing():
    mapper = IdMapper(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 0)
    assert mapper.to_torch()(torch.tensor([[0, 1], [5, -3]])).tolist() == [[-1, -1], [-1, -1]]


@pytest.mark.gpu
def test_torch_id_map_on_cuda_equals_the_numpy_map():
    check_on("cuda")
