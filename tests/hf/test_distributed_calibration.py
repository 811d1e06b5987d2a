"""Calibration on two processes (gloo, CPU): each rank calibrates its shard, the merged records give every rank the
thresholds of one process calibrating on the union of the shards.

The shards differ in their longest row (24 keys on rank 0, 100 on rank 1), so the merge must first agree on the
record capacity; one batch is left-padded and one setting samples rows (``max_rows``).
"""

import pytest
import torch
from sa_distributed import CALIBRATION_SETTINGS, gloo_skip_reason, run_scenario

import sparse_attention as sa
from sparse_attention.ops import distributed

SKIP = gloo_skip_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

# Float32 rounding: the merged float64 sums differ from the single-process ones only in summation order, so the
# float32 thresholds may differ by one unit in the last place (measured: bitwise equal).
FLOAT32_ULP = 2.0**-23


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_scenario("calibration", tmp_path_factory.mktemp("calibration"))


def assert_same_thresholds(got: dict, want: dict) -> None:
    assert torch.equal(got["n_points"], want["n_points"])
    for name in ("theta", "sdc_table"):
        torch.testing.assert_close(got[name], want[name], rtol=FLOAT32_ULP, atol=0.0, msg=name)


@pytest.mark.parametrize("setting", sorted(CALIBRATION_SETTINGS))
@pytest.mark.parametrize("batches", ["sharded", "replicated"], ids=["shards", "every-rank-all-batches"])
def test_two_ranks_equal_one_process_on_the_union(ranks, setting, batches):
    for rank in ranks:
        assert_same_thresholds(rank[setting][batches], rank[setting]["single"])
    # Every rank holds the very same tensors.
    for name in ("n_points", "theta", "sdc_table"):
        assert torch.equal(ranks[0][setting][batches][name], ranks[1][setting][batches][name])


def test_rows_of_both_shards_reach_the_table(ranks):
    # Rows up to 100 keys were on rank 1 only: rank 0's table reaches them through the merge.
    assert [r["shard_sizes"] for r in ranks] == [3, 3]
    assert int(ranks[0]["pre"]["sharded"]["n_points"][-1]) == 100


def test_a_failed_write_on_rank_0_fails_every_rank(ranks):
    assert ranks[0]["rank0_write_failure"] == "OSError: disk full"
    assert ranks[1]["rank0_write_failure"].startswith("UsageError: rank 0 failed to write")


def test_single_process_helpers_and_bad_groups():
    assert not torch.distributed.is_initialized()
    items = [torch.zeros(1)] * 5
    assert sa.shard(items) == items and sa.shard(items, process_group=None) == items
    assert torch.equal(sa.shard(torch.arange(4)), torch.arange(4))
    assert distributed.resolve_group("auto") is None and distributed.resolve_group(None) is None
    with pytest.raises(TypeError, match="items must be a sequence"):
        sa.shard(iter(items))
    with pytest.raises(ValueError, match="process_group must be 'auto', None"):
        sa.shard(items, process_group="world")
    with pytest.raises(ValueError, match="process_group must be 'auto', None"):
        sa.calibrate(torch.nn.Linear(1, 1), [], k=2, process_group=0)
