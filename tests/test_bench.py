"""bench.py's rollout comparison at a small size: the KV-cache engine and the naive baseline (re-encode, then
model.generate, every turn) write the same tokens, so its speed ratio compares equal work."""
import bench


def test_engine_and_baseline_write_the_same_tokens():
    model, processor = bench.load("scratch", None, "cpu")
    # 2 prompts x group 2, 2 scripted Crop calls each (every call returns an image), then the answer
    r = bench.time_rollout(model, processor, bench.bench_examples(2), group=2, turns=2, free=2)
    assert r["identical_tokens"] is True
    assert r["trajectories"] == 4 and r["tool_calls"] == 8 and r["image_observations"] == 8
    assert r["finish_reasons"] == ["response"]
    # the engine's own timings name every phase it spent time in
    assert {"prefill", "decode", "vision"} <= set(r["engine_split_s"])
