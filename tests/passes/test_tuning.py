"""The tuning cache: miss, hit, corrupt file, location override; tuning is off without a GPU."""

import json

import pytest
import torch

from attnopt.kernels import AttentionSpec
from attnopt.passes import tuning


def _spec(n=128):
    q = torch.empty(1, 2, n, 16, device="meta")
    return AttentionSpec.from_tensors(q, q, q, causal=True).with_(device=torch.device("cuda"))


def test_miss_then_hit_and_buckets(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(tuning, "time_kernel", lambda name, spec: calls.append(name) or 1e-3)
    cache = tuning.TuningCache(tmp_path)
    first = tuning.measured_seconds(_spec(), ["a", "b"], cache)
    assert first == {"a": 1e-3, "b": 1e-3} and calls == ["a", "b"] and cache.misses == 1
    again = tuning.measured_seconds(_spec(100), ["a", "b"], cache)  # 100 buckets with 128
    assert again == first and calls == ["a", "b"] and cache.hits == 1
    tuning.measured_seconds(_spec(100), ["a", "c"], cache)  # a new kernel is measured, the rest kept
    assert calls == ["a", "b", "c"]
    assert tuning.cache_key(_spec(300)) != tuning.cache_key(_spec(128))


def test_corrupt_file_is_a_miss_and_is_rewritten(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "time_kernel", lambda name, spec: 2e-3)
    cache = tuning.TuningCache(tmp_path)
    path = cache.path(tuning.cache_key(_spec()))
    path.write_text("{not json")
    assert tuning.measured_seconds(_spec(), ["a"], cache) == {"a": 2e-3}
    assert cache.misses == 1
    assert json.loads(path.read_text())["seconds"] == {"a": 2e-3}
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries


def test_location_override(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "env"))
    assert tuning.cache_dir() == tmp_path / "env"
    assert tuning.cache_dir(str(tmp_path / "opt")) == tmp_path / "opt"
    monkeypatch.delenv(tuning.CACHE_ENV)
    assert tuning.cache_dir().parts[-3:] == (".cache", "attnopt", "tuning")


def test_off_on_cpu():
    q = torch.randn(1, 2, 8, 16)
    assert not tuning.enabled(AttentionSpec.from_tensors(q, q, q), True)


@pytest.mark.gpu
def test_tuning_measures_on_gpu(tmp_path, capsys):
    from attnopt.passes.plan import candidates

    q = torch.randn(1, 8, 4096, 64, device="cuda", dtype=torch.bfloat16)
    spec = AttentionSpec.from_tensors(q, q, q, causal=True)
    cache = tuning.TuningCache(tmp_path)
    found = candidates(spec, tune=True, cache=cache)
    timed = [c for c in found if c.supported]
    assert len(timed) > 1 and all(c.measured for c in timed), found
    print({c.kernel: c.cost for c in timed})
    again = candidates(spec, tune=True, cache=cache)
    assert cache.hits == 1 and [c.cost for c in again if c.supported] == [c.cost for c in timed]
