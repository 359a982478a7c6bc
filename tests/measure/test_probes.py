"""Each probe against allocations of known size (within 1 %)."""

import pytest
import torch

from bench.measure.probes import CudaProbe, FakeProbe, TrackedProbe

MIB = 2**20


def within_1_percent(measured, expected):
    return abs(measured - expected) <= 0.01 * expected


def test_tracked_counts_live_storages_once_and_keeps_the_peak():
    probe = TrackedProbe()
    with probe.session():
        a = torch.empty(4 * MIB, dtype=torch.uint8)
        view = a[: MIB].view(torch.int32)  # a view: no new memory
        assert within_1_percent(probe.current_bytes(), 4 * MIB)
        with probe.phase() as phase:
            b = torch.ones(MIB, dtype=torch.float32)  # 4 MiB
            c = b * 2  # 4 MiB more
            del b, c
            d = torch.zeros(2 * MIB, dtype=torch.uint8)
        assert within_1_percent(phase.peak_bytes, 12 * MIB)
        assert within_1_percent(probe.current_bytes(), 6 * MIB)
        del a, view, d
    assert probe.current_bytes() == 0


def test_tracked_peak_of_a_module_forward():
    probe = TrackedProbe()
    with torch.inference_mode(), probe.session():
        layer = torch.nn.Linear(1024, 1024, bias=False)  # 4 MiB of weights
        x = torch.randn(256, 1024)  # 1 MiB
        assert within_1_percent(probe.current_bytes(), 5 * MIB)
        with probe.phase() as phase:
            y = layer(x)  # +1 MiB output
            z = torch.relu(y)  # +1 MiB
        assert within_1_percent(phase.peak_bytes, 7 * MIB)
        del y, z
        with probe.phase() as phase:  # the peak restarts from what is live now
            pass
        assert within_1_percent(phase.peak_bytes, 5 * MIB)


def test_tracked_limit_raises_out_of_memory():
    probe = TrackedProbe(limit_bytes=3 * MIB)
    with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
        with probe.session():
            kept = torch.empty(2 * MIB, dtype=torch.uint8)
            torch.empty(2 * MIB, dtype=torch.uint8)
    del kept
    assert probe.current_bytes() == 0  # what was allocated before the failure is released


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_probe_peak_and_reset():
    probe = CudaProbe()
    with probe.session():
        base = probe.current_bytes()
        with probe.phase() as phase:
            a = torch.empty(256 * MIB, dtype=torch.uint8, device="cuda")
            b = torch.empty(128 * MIB, dtype=torch.uint8, device="cuda")
            del b
        assert within_1_percent(phase.peak_bytes - base, 384 * MIB)
        assert phase.reserved_bytes >= phase.peak_bytes
        with probe.phase() as phase:  # reset: the 128 MiB of the last phase is not seen again
            pass
        assert within_1_percent(phase.peak_bytes - base, 256 * MIB)
        nvml = probe.nvml()
        if nvml:  # NVML sees at least what PyTorch reserved
            assert nvml["nvml_used_bytes"] >= torch.cuda.memory_reserved()
            assert nvml["nvml_scope"] in ("process", "device")
        del a


def test_fake_counts_without_allocating():
    probe = FakeProbe()
    with probe.session():
        huge = torch.empty(64 * 2**30, dtype=torch.uint8)  # 64 GiB: only its shape exists
        with probe.phase() as phase:
            doubled = huge.to(torch.bfloat16)  # +128 GiB
            del doubled
        assert within_1_percent(phase.peak_bytes, 192 * 2**30)
        assert within_1_percent(probe.current_bytes(), 64 * 2**30)
        del huge


@pytest.mark.parametrize("failing", ["nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetMemoryInfo",
                                     "nvmlDeviceGetMaxClockInfo", "nvmlDeviceGetMemoryBusWidth"])
def test_an_nvml_failure_leaves_the_nvml_columns_empty(monkeypatch, failing):
    """NVML queries unsupported in a container, or a driver older than nvidia-ml-py: the point keeps
    its memory numbers and the NVML columns (and bandwidth utilisation) stay empty."""
    pynvml = pytest.importorskip("pynvml")
    from bench.measure import machine

    def fail(*args, **kwargs):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    monkeypatch.setattr(machine, "_nvml_handle", lambda: object())  # as if a GPU were there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses", lambda handle: [])
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda handle: type("M", (), {"used": 5})())
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMaxClockInfo", lambda handle, clock: 2619)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryBusWidth", lambda handle: 5120)
    monkeypatch.setattr(pynvml, failing, fail)
    bandwidth = machine.peak_bandwidth_bytes_per_s.__wrapped__()  # uncached
    if "Clock" in failing or "Bus" in failing:
        assert bandwidth is None and machine.nvml_used_bytes() == (5, "device")
    else:
        assert machine.nvml_used_bytes() == (None, None) and CudaProbe().nvml() == {}
        assert bandwidth == 2 * 2619e6 * 5120 / 8


# -- the fake probe's speed-ups (bench/measure/probes.py, FakeLiveTensors): the same bytes as plain fake dispatch

BYTES = ["baseline_bytes", "kv_bytes_measured", "peak_prefill_bytes", "peak_decode_bytes",
         *(f"{phase}_{c}_bytes" for phase in ("prefill", "decode") for c in ("weights", "kv", "activations"))]


def _fake_point(**kw):
    from bench.config import BenchConfig, resolve

    # 11 chunks: 0 .. 9 of 96 tokens and one of 40, so chunks 4 .. 8 are skipped
    base = dict(size="tiny", seq_len=1000, chunk_size=96, new_tokens=3, loops=3, probe="fake", repeats=0, warmup=0)
    return resolve(BenchConfig(**{**base, **kw}))


def _plain_fake_dispatch(monkeypatch, model_class):
    """Every fake op through FakeTensorMode's own path, every chunk run: the probe before its speed-ups."""
    from bench.measure import probes
    from bench.measure.fake_dispatch import CachedFakeTensorMode

    monkeypatch.setattr(CachedFakeTensorMode, "_memo_key", lambda self, func, args, kwargs: None)
    monkeypatch.setattr(probes, "META_QUERIES", {})
    monkeypatch.setattr(model_class, "affine_chunks", False)


@pytest.mark.parametrize("model, options", [
    ("standard", {}), ("ouro", {}), ("ouro", {"kv_sharing": "mean_loops"}), ("ouro", {"kv_sharing": "first_writes"}),
    ("ouro", {"exit_policy": "threshold"}), ("melt", {}), ("melt", {"cache_update": "ema", "batch": 2}),
    # 10 chunks of 96, the final one ending at the cache's last row (its read is an alias, not a slice)
    ("standard", {"scenario": "prefill", "seq_len": 960}), ("melt", {"scenario": "prefill", "seq_len": 960}),
])
def test_the_fake_probe_s_shortcuts_keep_every_byte(model, options, monkeypatch):
    """The memo of FakeTensorMode's dispatch cache, the metadata queries answered directly and the
    prefill chunks skipped (FakeLiveTensors.prefill_chunks) change no byte of the row."""
    import models
    from bench.measure.probes import FakeLiveTensors
    from bench.measure.point import measure

    ran = []
    prefill_chunks = FakeLiveTensors.prefill_chunks
    with monkeypatch.context() as m:
        m.setattr(FakeLiveTensors, "prefill_chunks", lambda self, bounds: (
            ran.append(chunk) or chunk for chunk in prefill_chunks(self, bounds)))
        fast = measure(_fake_point(model=model, **options))
    assert fast["status"] == "ok", fast["error"]
    final = -(-options.get("seq_len", 1000) // 96) - 1
    assert [begin // 96 for begin, _ in ran] == [0, 1, 2, 3, final - 1, final]  # 4 .. final-2 skipped
    _plain_fake_dispatch(monkeypatch, models.MODEL_CLASSES[model])
    plain = measure(_fake_point(model=model, **options))
    assert {c: fast[c] for c in BYTES} == {c: plain[c] for c in BYTES}


def test_a_model_whose_chunks_are_not_affine_fails_the_check(monkeypatch):
    """LoopCoder's window attention gathers min(start, W - 1) earlier rows: claimed affine, the
    chunks 2, 3 and 9 it runs give it away (the row is an error, not a wrong number)."""
    import models
    from bench.measure.point import measure

    monkeypatch.setattr(models.LoopCoderLM, "affine_chunks", True)
    row = measure(_fake_point(model="loopcoder", kv_window=500))
    assert row["status"] == "error" and "do not run the same ops" in row["error"]


@pytest.mark.parametrize("options", [dict(size="tiny", seq_len=1000, chunk_size=300),
                                     dict(size="small", seq_len=600, chunk_size=128, dtype="bfloat16", batch=2),
                                     dict(size="small", seq_len=700, prefill="one_pass")])
def test_the_fake_probe_estimates_the_peer_s_prefill_as_tracked_measures_it(options):
    """hf_llama under the fake probe: its prefill (transformers' forward into a DynamicCache) only."""
    from bench.config import BenchConfig, resolve
    from bench.measure.point import measure

    rows = [measure(resolve(BenchConfig(model="hf_llama", scenario="prefill", probe=probe, repeats=0,
                                        warmup=0, **{"dtype": "float32", **options})))
            for probe in ("tracked", "fake")]
    assert all(row["status"] == "ok" for row in rows), [row["error"] for row in rows]
    columns = ["baseline_bytes", "kv_bytes_measured", "peak_prefill_bytes",
               *(f"prefill_{c}_bytes" for c in ("weights", "kv", "activations"))]
    assert [rows[0][c] for c in columns] == [rows[1][c] for c in columns]
